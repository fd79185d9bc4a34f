"""Harness: the real tickfan binary on 127.0.0.1:0 with a temp data dir, and an asyncio TCP
proxy in front of it so a test can cut the client's connection, hold it off, or point it at
another server process (restart, new node) while the client keeps one URL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
import json
from pathlib import Path
from typing import Any, Awaitable, Callable, List, Optional, Union

import pytest

ROOT = Path(__file__).resolve().parents[3]
BIN = os.environ.get("TICKFAN_BIN", str(ROOT / "target" / "debug" / "tickfan"))
DEADLINE = 20.0


class Server:
    def __init__(self, data_dir: str, toml: str = "") -> None:
        self.data_dir = data_dir
        args = [BIN, "serve", "--listen", "127.0.0.1:0", "--no-simulator", "--data-dir", data_dir]
        if toml:
            cfg = Path(tempfile.mkdtemp(prefix="tickfan-cfg-")) / "config.toml"
            cfg.write_text(toml)
            args += ["--config", str(cfg)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("listening on http://"):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        self.addr = line.strip().removeprefix("listening on http://")
        self.port = int(self.addr.rsplit(":", 1)[1])

    def http(self, path: str) -> str:
        return f"http://{self.addr}{path}"

    def ws(self, path: str) -> str:
        return f"ws://{self.addr}{path}"

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.http(path), timeout=DEADLINE) as r:
            return json.loads(r.read())

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.http("/metrics"), timeout=DEADLINE) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line:
                continue
            key, _, val = line.partition(" ")
            if key == name or key.startswith(name + "{"):
                total += float(val)
        return total

    async def stop(self) -> int:
        """SIGTERM and the exit code (waited for off the event loop: the proxy and client
        live there and must keep running while the server closes them)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, DEADLINE)


class Proxy:
    def __init__(self) -> None:
        self.upstream: Optional[int] = None
        self.held = False
        self.pairs: List[tuple] = []
        self.frozen: List[tuple] = []
        self.server: Optional[asyncio.base_events.Server] = None
        self.port = 0

    async def start(self, upstream: int) -> "Proxy":
        self.upstream = upstream
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self.held or not self.upstream:
            w.transport.abort()
            return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            w.transport.abort()
            return
        pair = (w, uw)
        self.pairs.append(pair)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if pair in self.frozen:
                        continue  # a black hole: the connection stays open, nothing passes
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                # A frozen path does not pass the server's close on: only the client's
                # watchdog can tell it is dead.
                uw.transport.abort()
                if pair not in self.frozen:
                    w.transport.abort()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    def freeze(self) -> None:
        """Live connections stay open but carry nothing more (a half-dead network path)."""
        self.frozen.extend(self.pairs)

    def cut(self) -> None:
        """Kills every live connection at the TCP level (no close frame)."""
        for w, uw in self.pairs:
            w.transport.abort()
            uw.transport.abort()
        self.pairs.clear()

    def close(self) -> None:
        self.cut()
        if self.server:
            self.server.close()


async def wait_for(what: str, pred: Callable[[], Union[bool, Awaitable[bool]]], timeout: float = DEADLINE) -> None:
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def ticks(symbol: str, n: int, start: int = 0) -> List[dict]:
    now = int(time.time() * 1000)
    return [
        {"symbol": symbol, "ts": now, "price": 100 + ((start + i) % 50) / 10, "volume": 1, "id": f"{symbol}-{start + i}"}
        for i in range(n)
    ]


@pytest.fixture
def servers():
    """Starts servers on demand; stops them all at the end."""
    started: List[Server] = []
    dirs: List[tempfile.TemporaryDirectory] = []

    def start(data_dir: Optional[str] = None, toml: str = "") -> Server:
        if data_dir is None:
            d = tempfile.TemporaryDirectory(prefix="tickfan-py-")
            dirs.append(d)
            data_dir = d.name
        s = Server(data_dir, toml)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()
    for d in dirs:
        d.cleanup()


@pytest.fixture
async def proxy():
    p = Proxy()
    yield p
    p.close()
