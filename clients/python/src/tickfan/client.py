"""The self-healing ``/ws`` client and the ``/ingest`` producer.

Data flow: one runner task owns the WebSocket. It reads a message, handles replies (resolving
the request that waits for them), and turns ``snapshot``/``tick``/``batch`` messages into
``Tick`` events after dropping anything at or below the symbol's last seq. Events go into one
bounded ``asyncio.Queue`` that ``async for`` reads. When the connection ends for any reason
other than a bad token, the runner waits a jittered, growing delay, reconnects, and subscribes
again with ``since_seq`` = the last seq delivered per symbol, so every tick comes exactly once
and in seq order per symbol. What it cannot hide, it yields as an event: ``Gap``,
``EpochChange``, ``SlowConsumer``, ``ConnectionLost``...

Bounds: the event queue holds ``max_queue`` events (default 10,000). When it is full the
runner stops reading the socket until you take events out; the server then sees a slow
client (realtime/batch: it closes with ``slow_consumer`` and the client resumes from the last
tick it queued), so memory stays bounded and nothing is lost. At most ``max_pending`` requests
wait for replies (default 1,000; more raise ``RequestError("too_many_requests")``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Union

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .errors import (
    AuthError,
    Backpressure,
    ConnectionLost,
    RateLimited,
    RequestError,
    SlowConsumer,
    TickfanError,
    from_server,
)
from .types import Ack, EpochChange, Gap, IngestAck, Mode, Rejection, Tick

Event = Union[Tick, Gap, EpochChange, TickfanError]
"""What ``async for ev in client`` yields. Errors the client recovered from are yielded, not
raised; ``AuthError`` is raised."""

_END = object()
_REQUEST_OPS = ("subscribe", "configure", "unsubscribe")


def _headers(token: Optional[str]) -> Dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class Client:
    """A ``/ws`` connection that survives restarts, node changes and cut sockets.

    Use it as ``async with tickfan.connect(url) as tf:``, then ``await tf.subscribe(...)``
    and ``async for ev in tf:``. ``last_seq`` maps each symbol to the last seq delivered.
    """

    def __init__(
        self,
        url: str,
        *,
        token: Optional[str] = None,
        ingest_token: Optional[str] = None,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
        max_queue: int = 10_000,
        max_pending: int = 1_000,
        open_timeout: float = 10.0,
        max_publish_attempts: int = 50,
    ) -> None:
        self.url = url
        self.token = token
        self.ingest_token = ingest_token if ingest_token is not None else token
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.open_timeout = open_timeout
        self.max_pending = max_pending
        self.max_publish_attempts = max_publish_attempts
        #: Last seq delivered per symbol.
        self.last_seq: Dict[str, int] = {}
        #: The server's epoch (from the latest welcome).
        self.epoch: Optional[int] = None
        #: The latest welcome message.
        self.welcome: Optional[Dict[str, Any]] = None
        #: Successful reconnections after the first connection.
        self.reconnects = 0
        #: Connection attempts after a disconnect.
        self.reconnect_attempts = 0
        #: Ticks dropped because they were at or below the last seq (the resume seam).
        self.duplicates = 0
        self._queue: "asyncio.Queue[Any]" = asyncio.Queue(max_queue)
        self._pending: Dict[int, "asyncio.Future[Dict[str, Any]]"] = {}
        self._ids = itertools.count(1)
        self._ws: Any = None
        self._connected = asyncio.Event()
        self._runner: Optional["asyncio.Task[None]"] = None
        self._closed = False
        self._fatal: Optional[TickfanError] = None
        self._symbols: Dict[str, None] = {}  # ordered set
        self._sub: Dict[str, Any] = {}
        self._history_for: Set[str] = set()
        self._baseline: Dict[str, int] = {}
        self._gap_armed: Set[str] = set()
        self._producer: Optional[Producer] = None

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> "Client":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Starts the runner and waits for the first welcome (``open_timeout`` seconds)."""
        if self._runner is None:
            self._runner = asyncio.ensure_future(self._run())
        waiter = asyncio.ensure_future(self._connected.wait())
        done, _ = await asyncio.wait(
            {waiter, self._runner}, timeout=self.open_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if waiter not in done:
            waiter.cancel()
            if self._fatal:
                raise self._fatal
            raise ConnectionLost("connect_timeout", f"no welcome from {self.url} in time")

    async def close(self) -> None:
        """Closes for good: no more reconnects; ``async for`` ends after the queued events."""
        self._closed = True
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except (asyncio.CancelledError, Exception):
                pass
        if self._producer is not None:
            await self._producer.close()
        try:
            self._queue.put_nowait(_END)
        except asyncio.QueueFull:
            pass  # __anext__ sees _closed once the queue is drained

    @property
    def connected(self) -> bool:
        """Whether a connection is up right now."""
        return self._connected.is_set()

    # ---------------------------------------------------------------- requests

    async def subscribe(
        self,
        symbols: Sequence[str],
        *,
        history: int = 0,
        mode: Optional[Mode] = None,
        interval_ms: Optional[int] = None,
        min_quality: Optional[float] = None,
        min_volume: Optional[float] = None,
    ) -> Ack:
        """Subscribes to ``symbols`` (``["*"]`` for all). ``history`` = last N stored ticks per
        symbol first. Mode and filters are connection-wide and re-sent after reconnects."""
        opts = {"mode": mode, "interval_ms": interval_ms, "min_quality": min_quality, "min_volume": min_volume}
        self._sub.update({k: v for k, v in opts.items() if v is not None})
        fresh = [s for s in symbols if s not in self._symbols]
        for s in symbols:
            self._symbols[s] = None
        msg: Dict[str, Any] = {"op": "subscribe", "symbols": list(symbols), **self._sub}
        since = self._resume_points(symbols)
        if since:
            msg["since_seq"] = since
        if history > 0:
            msg["history"] = history
            self._history_for.update(fresh)
        ack: Ack = await self._request(msg)  # type: ignore[assignment]
        for sym, seq in (ack.get("last_seq") or {}).items():
            if sym not in self.last_seq and sym not in self._history_for:
                self._baseline[sym] = seq
        for r in ack.get("rejected") or []:
            self._symbols.pop(r.get("symbol", ""), None)
        return ack

    async def unsubscribe(self, symbols: Sequence[str]) -> Ack:
        """Unsubscribes; no message for these symbols arrives after the ack."""
        for s in symbols:
            self._symbols.pop(s, None)
            self.last_seq.pop(s, None)
            self._baseline.pop(s, None)
        return await self._request({"op": "unsubscribe", "symbols": list(symbols)})  # type: ignore[return-value]

    async def configure(
        self,
        *,
        mode: Optional[Mode] = None,
        interval_ms: Optional[int] = None,
        min_quality: Optional[float] = None,
        min_volume: Optional[float] = None,
    ) -> Ack:
        """Changes mode and filters for the whole connection (kept across reconnects)."""
        opts = {"mode": mode, "interval_ms": interval_ms, "min_quality": min_quality, "min_volume": min_volume}
        opts = {k: v for k, v in opts.items() if v is not None}
        self._sub.update(opts)
        return await self._request({"op": "configure", **opts})  # type: ignore[return-value]

    async def publish(self, ticks: Sequence[Dict[str, Any]]) -> IngestAck:
        """Publishes ticks over ``/ingest`` (same host as the client URL) and returns the ack,
        resending exactly the refused ticks on ``backpressure``. See ``Producer.publish``."""
        if self._producer is None:
            base = self.url.split("?", 1)[0]
            ingest = base[: -len("/ws")] + "/ingest" if base.endswith("/ws") else base.rstrip("/") + "/ingest"
            self._producer = Producer(ingest, token=self.ingest_token, max_attempts=self.max_publish_attempts)
        return await self._producer.publish(ticks)

    async def _request(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        """Sends a request and waits for its reply, retrying after ``rate_limited`` and after a
        reconnect."""
        for attempt in range(10):
            if self._fatal:
                raise self._fatal
            try:
                await asyncio.wait_for(self._connected.wait(), self.open_timeout)
            except asyncio.TimeoutError:
                raise ConnectionLost("disconnected", "not connected") from None
            if len(self._pending) >= self.max_pending:
                raise RequestError("too_many_requests", f"{self.max_pending} requests already wait for replies")
            rid = next(self._ids)
            fut: "asyncio.Future[Dict[str, Any]]" = asyncio.get_running_loop().create_future()
            self._pending[rid] = fut
            try:
                await self._ws.send(json.dumps({**msg, "id": rid}))
                reply = await fut
            except (ConnectionClosed, ConnectionLost):
                continue  # the reconnect re-subscribes; send this one again too
            finally:
                self._pending.pop(rid, None)
            if reply.get("type") == "error":
                err = from_server(reply.get("code", "error"), reply.get("message", ""), reply.get("retry_after_ms"))
                if isinstance(err, RateLimited) and attempt < 9:
                    await asyncio.sleep(min(err.retry_after_ms or 1000, 10_000) / 1000)
                    continue
                raise err
            return reply
        raise ConnectionLost("disconnected", "request not answered after 10 attempts")

    def _resume_points(self, symbols: Iterable[str]) -> Dict[str, int]:
        symbols = list(symbols)
        known = dict(self._baseline)
        known.update(self.last_seq)
        if "*" in symbols:
            return known
        return {s: known[s] for s in symbols if s in known}

    # ---------------------------------------------------------------- iteration

    def __aiter__(self) -> "Client":
        return self

    async def __anext__(self) -> Event:
        if self._closed and self._queue.empty():
            raise StopAsyncIteration
        ev = await self._queue.get()
        if ev is _END:
            raise StopAsyncIteration
        if isinstance(ev, AuthError):
            raise ev
        return ev  # type: ignore[no-any-return]

    # ---------------------------------------------------------------- the runner

    async def _run(self) -> None:
        attempt = 0
        while not self._closed:
            try:
                async with ws_connect(
                    self.url,
                    additional_headers=_headers(self.token),
                    open_timeout=self.open_timeout,
                    max_size=None,
                    max_queue=16,
                    ping_interval=None,
                    compression=None,
                    # close() should not hang on a dead path for websockets' default 10 s.
                    close_timeout=2,
                ) as ws:
                    welcome = json.loads(await asyncio.wait_for(ws.recv(), self.open_timeout))
                    await self._on_welcome(ws, welcome)
                    attempt = 0
                    hb = max(0.1, float(welcome.get("heartbeat_ms", 15000)) / 1000)
                    pinger = asyncio.ensure_future(self._ping_loop(ws, hb))
                    try:
                        while True:
                            # Silent for 3 heartbeats: the connection is dead even if TCP
                            # never says so.
                            raw = await asyncio.wait_for(ws.recv(), 3 * hb + 1)
                            if isinstance(raw, str):
                                await self._handle(json.loads(raw))
                    finally:
                        pinger.cancel()
            except asyncio.CancelledError:
                raise
            except asyncio.TimeoutError:
                await self._event(ConnectionLost("heartbeat_timeout", "the server went silent; reconnecting"))
            except ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd is not None else None
                if code == 4001:
                    self._fail(AuthError("unauthorized", e.rcvd.reason if e.rcvd else ""))
                    return
                if code != 4008:  # slow_consumer was already reported by its error message
                    await self._event(ConnectionLost("disconnected", f"connection closed ({code}); reconnecting"))
            except InvalidStatus as e:
                if e.response.status_code == 401:
                    self._fail(AuthError("unauthorized", "HTTP 401"))
                    return
            except Exception:  # noqa: BLE001 - refused, reset, bad handshake or frame: retry below
                pass
            finally:
                self._ws = None
                self._connected.clear()
                for fut in self._pending.values():
                    if not fut.done():
                        fut.set_exception(ConnectionLost("disconnected", "connection lost before the reply"))
            if self._closed:
                return
            delay = min(self.backoff_max, self.backoff_min * 2**attempt) * (0.5 + random.random())
            attempt = min(attempt + 1, 20)
            self.reconnect_attempts += 1
            await asyncio.sleep(delay)

    def _fail(self, err: TickfanError) -> None:
        self._fatal = err
        self._closed = True
        try:
            self._queue.put_nowait(err)
        except asyncio.QueueFull:
            pass

    async def _event(self, ev: Any) -> None:
        # Blocks while the queue is full: that is the backpressure on the socket.
        await self._queue.put(ev)

    async def _ping_loop(self, ws: Any, hb: float) -> None:
        # The server closes a client that sent nothing for 3 heartbeats.
        try:
            while True:
                await asyncio.sleep(hb)
                await ws.send('{"op":"ping"}')
        except (ConnectionClosed, asyncio.CancelledError):
            return

    async def _on_welcome(self, ws: Any, w: Dict[str, Any]) -> None:
        if w.get("type") != "welcome":
            raise ValueError(f"expected welcome, got {w!r}")
        if self.welcome is not None:
            self.reconnects += 1
        self.welcome = w
        epoch = w.get("epoch")
        changed = self.epoch is not None and epoch != self.epoch
        previous = self.epoch
        self.epoch = epoch
        if changed:
            # The store was reset: old seqs mean nothing now.
            self.last_seq.clear()
            self._baseline.clear()
            await self._event(EpochChange(previous=previous or 0, epoch=epoch or 0))
        self._ws = ws
        if self._symbols:
            symbols = list(self._symbols)
            msg: Dict[str, Any] = {"op": "subscribe", "symbols": symbols, **self._sub}
            since = self._resume_points(symbols)
            # A symbol with no seq at all (e.g. after an epoch change) resumes from 0.
            for s in symbols:
                if s != "*" and s not in since:
                    since[s] = 0
            if since:
                msg["since_seq"] = since
            await ws.send(json.dumps(msg))
        self._connected.set()

    async def _handle(self, m: Dict[str, Any]) -> None:
        t = m.get("type")
        rid = m.get("id")
        if t in ("ack", "pong", "symbols") or (t == "error" and rid is not None):
            fut = self._pending.get(rid) if isinstance(rid, int) else None
            if fut is not None and not fut.done():
                fut.set_result(m)
            return
        if t == "tick":
            await self._deliver(m, False)
        elif t == "snapshot":
            await self._snapshot(m)
        elif t == "batch":
            for tick in m.get("ticks") or []:
                await self._deliver(tick, False)
        elif t == "error":
            await self._event(from_server(m.get("code", "error"), m.get("message", ""), m.get("retry_after_ms")))

    async def _snapshot(self, m: Dict[str, Any]) -> None:
        sym = m.get("symbol", "")
        ticks: List[Dict[str, Any]] = m.get("ticks") or []
        self._history_for.discard(sym)
        if m.get("gap") is True:
            last = self.last_seq.get(sym, self._baseline.get(sym, 0))
            self._gap_armed.add(sym)
            await self._event(Gap(sym, last, ticks[0]["seq"] if ticks else None, "history"))
        for tick in ticks:
            tick.setdefault("symbol", sym)
            await self._deliver(tick, True)

    async def _deliver(self, m: Dict[str, Any], snapshot: bool) -> None:
        sym = m.get("symbol")
        seq = m.get("seq")
        if not isinstance(sym, str) or not isinstance(seq, int):
            return
        last = self.last_seq.get(sym)
        if last is not None and seq <= last:
            self.duplicates += 1
            return
        before = last if last is not None else self._baseline.get(sym)
        explained = (
            sym in self._gap_armed
            or self._sub.get("min_quality", 0)
            or self._sub.get("min_volume", 0)
            or self._sub.get("mode") in ("throttled", "smart")
        )
        self._gap_armed.discard(sym)
        if not explained and before is not None and seq > before + 1 + int(m.get("conflated", 0)):
            await self._event(Gap(sym, before, seq, "seq_hole"))
        await self._event(Tick.from_wire(m, snapshot))
        self.last_seq[sym] = seq
        self._baseline.pop(sym, None)


class Producer:
    """A producer on ``/ingest``. ``publish`` calls run one at a time (acks come in frame
    order)."""

    def __init__(self, url: str, *, token: Optional[str] = None, max_attempts: int = 50) -> None:
        self.url = url
        self.token = token
        self.max_attempts = max_attempts
        self._ws: Any = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> "Producer":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the ingest connection."""
        if self._ws is not None:
            await self._ws.close()
            self._ws = None

    async def publish(self, ticks: Sequence[Dict[str, Any]]) -> IngestAck:
        """Sends ``ticks`` (dicts with symbol, ts in ms, price, volume, ...) as one frame and
        returns the ack. Ticks refused with ``backpressure`` are sent again, exactly those and
        in their order, after the server's ``retry_after_ms`` (doubling while nothing gets
        through), until every tick is accepted, a duplicate or rejected. ``rejected`` indices
        refer to ``ticks``.

        Raises ``Backpressure`` after ``max_attempts`` frames, ``ConnectionLost`` when the
        connection drops before every tick was acked (the unacked ones may or may not be
        stored: resend them with ids so duplicates are dropped), ``AuthError`` on 401."""
        async with self._lock:
            try:
                return await self._publish(ticks)
            except ConnectionClosed as e:
                self._ws = None
                raise ConnectionLost("disconnected", f"ingest connection closed: {e}") from None
            except InvalidStatus as e:
                if e.response.status_code == 401:
                    raise AuthError("unauthorized", "ingest token missing or wrong") from None
                raise

    async def _publish(self, ticks: Sequence[Dict[str, Any]]) -> IngestAck:
        if self._ws is None:
            self._ws = await ws_connect(self.url, additional_headers=_headers(self.token), max_size=None, compression=None)
        ws = self._ws
        total = IngestAck()
        indices = list(range(len(ticks)))
        delay = 0
        while indices:
            if total.attempts >= self.max_attempts:
                raise Backpressure("backpressure", f"{len(indices)} tick(s) still refused after {self.max_attempts} attempts")
            if delay:
                await asyncio.sleep(delay / 1000)
            total.attempts += 1
            if total.attempts > 1:
                total.resent += len(indices)
            await ws.send(json.dumps([ticks[i] for i in indices]))
            ack = json.loads(await ws.recv())
            if ack.get("type") != "ingest_ack":
                raise from_server(ack.get("code", "protocol"), ack.get("message", "expected an ingest_ack"), ack.get("retry_after_ms"))
            total.accepted += ack["accepted"]
            total.duplicates += ack["duplicates"]
            for r in ack["rejected"]:
                total.rejected.append(Rejection(index=indices[r["index"]], code=r["code"], message=r["message"]))
            rejected = ack.get("rejected_total", len(ack["rejected"]))
            total.rejected_total += rejected
            placed = ack["accepted"] + ack["duplicates"] + rejected
            if placed >= len(indices):
                break
            # Some were refused: the backpressure error follows the ack and lists which.
            bp = json.loads(await ws.recv())
            if bp.get("code") != "backpressure" or not isinstance(bp.get("refused_indices"), list):
                raise from_server(bp.get("code", "protocol"), bp.get("message", "expected backpressure"), None)
            retry = int(bp.get("retry_after_ms", 100))
            delay = retry if placed > 0 else min(max(retry, delay * 2), 5000)
            indices = [indices[i] for i in bp["refused_indices"]]
        total.rejected.sort(key=lambda r: r["index"])
        return total


def connect(url: str, **kwargs: Any) -> Client:
    """``async with tickfan.connect("ws://127.0.0.1:8080/ws", token=...) as tf:`` — see
    ``Client`` for the options."""
    return Client(url, **kwargs)
