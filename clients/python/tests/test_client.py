"""The Python client against the real tickfan binary (target/debug/tickfan): history, resume
across a SIGTERM restart and a cut socket, ``Gap`` when history no longer reaches back,
``EpochChange`` when the store is new, typed errors, and publish that resends exactly the
refused ticks."""

from __future__ import annotations

import asyncio
from typing import Dict, List

import pytest

import tickfan
from conftest import ticks, wait_for

FAST = dict(backoff_min=0.02, backoff_max=0.2)


class Recorder:
    """Drains a client's events in a task: seqs per symbol, gaps, epochs, errors."""

    def __init__(self, client: tickfan.Client) -> None:
        self.seqs: Dict[str, List[int]] = {}
        self.snapshot = 0
        self.gaps: List[tickfan.Gap] = []
        self.epochs: List[tickfan.EpochChange] = []
        self.errors: List[tickfan.TickfanError] = []
        self.task = asyncio.ensure_future(self._drain(client))

    async def _drain(self, client: tickfan.Client) -> None:
        async for ev in client:
            if isinstance(ev, tickfan.Tick):
                self.seqs.setdefault(ev.symbol, []).append(ev.seq)
                self.snapshot += ev.snapshot
            elif isinstance(ev, tickfan.Gap):
                self.gaps.append(ev)
            elif isinstance(ev, tickfan.EpochChange):
                self.epochs.append(ev)
            else:
                self.errors.append(ev)

    def count(self, sym: str) -> int:
        return len(self.seqs.get(sym, []))


async def publish_all(server, items):
    async with tickfan.Producer(server.ws("/ingest")) as p:
        ack = await p.publish(items)
    assert ack.accepted == len(items), ack
    return ack


async def test_subscribe_with_history_then_live(servers):
    server = servers()
    await publish_all(server, ticks("AAPL", 5))
    async with tickfan.connect(server.ws("/ws"), **FAST) as tf:
        ack = await tf.subscribe(["AAPL"], history=3)
        assert ack["last_seq"]["AAPL"] == 5
        seen = []
        async for ev in tf:
            assert isinstance(ev, tickfan.Tick)
            seen.append((ev.seq, ev.snapshot))
            if len(seen) == 3:
                break
        assert seen == [(3, True), (4, True), (5, True)]
        await publish_all(server, ticks("AAPL", 2, 5))
        async for ev in tf:
            seen.append((ev.seq, ev.snapshot))
            if len(seen) == 5:
                break
        assert seen[3:] == [(6, False), (7, False)]
        assert tf.last_seq["AAPL"] == 7
        assert ev.extra["id"] == "AAPL-6"


async def test_resume_after_sigterm_restart_same_data_dir(servers, proxy, tmp_path):
    server = servers(str(tmp_path))
    await proxy.start(server.port)
    async with tickfan.connect(proxy.url("/ws"), **FAST) as tf:
        rec = Recorder(tf)
        await tf.subscribe(["BTC-USD"])
        await publish_all(server, ticks("BTC-USD", 20))
        await wait_for("first 20", lambda: rec.count("BTC-USD") == 20)
        epoch = tf.epoch
        proxy.held = True
        assert await server.stop() == 0
        await wait_for("client retrying", lambda: tf.reconnect_attempts >= 2)
        server = servers(str(tmp_path))
        proxy.upstream = server.port
        await publish_all(server, ticks("BTC-USD", 10, 20))  # replayed via since_seq
        proxy.held = False
        await wait_for("reconnected", lambda: tf.reconnects >= 1 and tf.connected)
        await publish_all(server, ticks("BTC-USD", 10, 30))  # live
        await wait_for("all 40", lambda: rec.count("BTC-USD") >= 40)
        assert rec.seqs["BTC-USD"] == list(range(1, 41))
        assert tf.epoch == epoch
        assert rec.gaps == [] and rec.epochs == []
        assert any(isinstance(e, tickfan.ConnectionLost) for e in rec.errors)


async def test_resume_after_the_socket_is_cut(servers, proxy):
    server = servers()
    await proxy.start(server.port)
    async with tickfan.connect(proxy.url("/ws"), **FAST) as tf:
        rec = Recorder(tf)
        await tf.subscribe(["ETH-USD", "SOL-USD"])
        await publish_all(server, ticks("ETH-USD", 5) + ticks("SOL-USD", 5))
        await wait_for("first", lambda: rec.count("ETH-USD") == 5 and rec.count("SOL-USD") == 5)
        proxy.held = True
        proxy.cut()
        await wait_for("client noticed", lambda: not tf.connected)
        await publish_all(server, ticks("ETH-USD", 7, 5) + ticks("SOL-USD", 3, 5))
        proxy.held = False
        await wait_for("resumed", lambda: rec.count("ETH-USD") >= 12 and rec.count("SOL-USD") >= 8)
        assert rec.seqs["ETH-USD"] == list(range(1, 13))
        assert rec.seqs["SOL-USD"] == list(range(1, 9))
        assert tf.reconnects >= 1
        assert rec.gaps == []


async def test_silent_connection_is_treated_as_dead(servers, proxy):
    # The path goes silent without closing: the heartbeat watchdog (3 heartbeats + 1 s)
    # declares it dead, the client reconnects and resumes what it missed.
    server = servers(toml="[server]\nheartbeat_ms = 200\n")
    await proxy.start(server.port)
    async with tickfan.connect(proxy.url("/ws"), **FAST) as tf:
        rec = Recorder(tf)
        await tf.subscribe(["HB"])
        await publish_all(server, ticks("HB", 3))
        await wait_for("first 3", lambda: rec.count("HB") == 3)
        proxy.freeze()
        await publish_all(server, ticks("HB", 4, 3))
        await wait_for("resumed", lambda: rec.count("HB") >= 7)
        assert rec.seqs["HB"] == list(range(1, 8))
        assert any(e.code == "heartbeat_timeout" for e in rec.errors), rec.errors
        assert tf.reconnects >= 1


async def test_slow_consumer_is_reported_and_resumed(servers):
    # A tiny outbound buffer and a consumer that stops reading: the server closes us 4008,
    # the client says so (SlowConsumer event) and resumes from the last queued tick.
    server = servers(toml="[limits]\noutbound_buffer_bytes = 4096\n")
    async with tickfan.connect(server.ws("/ws"), max_queue=10, **FAST) as tf:
        await tf.subscribe(["SLOW"])
        for k in range(20):
            await publish_all(server, ticks("SLOW", 100, k * 100))
        seqs: List[int] = []
        slow = 0
        async for ev in tf:
            if isinstance(ev, tickfan.Tick):
                seqs.append(ev.seq)
                if ev.seq == 2000:
                    break
            elif isinstance(ev, tickfan.SlowConsumer):
                slow += 1
        assert seqs == list(range(1, 2001))
        assert slow >= 1, "the server never found us slow; the test proves nothing"
        assert tf.reconnects >= 1


async def test_gap_when_history_no_longer_reaches_back(servers, proxy):
    server = servers(toml="[store]\nmax_ticks_per_symbol = 10\nretention_interval_ms = 50\n[dispatch]\nrecent_ticks = 10\n")
    await proxy.start(server.port)
    async with tickfan.connect(proxy.url("/ws"), **FAST) as tf:
        rec = Recorder(tf)
        await tf.subscribe(["GAP"])
        await publish_all(server, ticks("GAP", 3))
        await wait_for("first 3", lambda: rec.count("GAP") == 3)
        proxy.held = True
        proxy.cut()
        await publish_all(server, ticks("GAP", 60, 3))
        await wait_for("retention", lambda: (server.get_json("/api/history/GAP?limit=1")["first_seq"] or 0) > 10)
        proxy.held = False
        await wait_for("caught up", lambda: tf.last_seq.get("GAP") == 63)
        assert len(rec.gaps) == 1, rec.gaps
        g = rec.gaps[0]
        assert (g.symbol, g.last_seq, g.reason) == ("GAP", 3, "history")
        assert g.next_seq is not None and g.next_seq > 4
        s = rec.seqs["GAP"]
        assert s == sorted(set(s)), "in order, no duplicate"


async def test_epoch_change_is_an_event(servers, proxy):
    server = servers()
    await proxy.start(server.port)
    async with tickfan.connect(proxy.url("/ws"), **FAST) as tf:
        rec = Recorder(tf)
        await tf.subscribe(["EPO"])
        await publish_all(server, ticks("EPO", 5))
        await wait_for("first 5", lambda: rec.count("EPO") == 5)
        before = tf.epoch
        proxy.held = True
        await server.stop()
        server = servers()  # a new data dir: a new store and epoch
        proxy.upstream = server.port
        await publish_all(server, ticks("EPO", 3, 100))
        proxy.held = False
        await wait_for("epoch event", lambda: len(rec.epochs) == 1)
        assert rec.epochs[0].previous == before and rec.epochs[0].epoch != before
        await wait_for("new ticks", lambda: rec.count("EPO") == 8)
        assert rec.seqs["EPO"] == [1, 2, 3, 4, 5, 1, 2, 3]


async def test_bad_token_raises_auth_error(servers):
    server = servers(toml='[auth]\nclient_tokens = ["sekrit"]\n')
    with pytest.raises(tickfan.AuthError):
        async with tickfan.connect(server.ws("/ws"), token="wrong", open_timeout=5, **FAST) as tf:
            async for _ in tf:
                pass
    async with tickfan.connect(server.ws("/ws"), token="sekrit", **FAST) as tf:
        assert tf.connected


async def test_publish_resends_exactly_the_refused_ticks(servers):
    server = servers(toml="[queue]\ncapacity = 64\nretry_after_ms = 20\n")
    items = ticks("BP", 300)
    async with tickfan.connect(server.ws("/ws"), **FAST) as tf:
        ack = await tf.publish(items)
    assert (ack.accepted, ack.duplicates, ack.rejected) == (300, 0, [])
    assert ack.resent > 0, "the tiny queue refused nothing; the test proves nothing"
    assert server.metric("tickfan_queue_refused_total") == ack.resent
    assert server.metric("tickfan_ticks_received_total") == 300 + ack.resent
    assert server.metric("tickfan_ticks_duplicate_total") == 0
    stored = server.get_json("/api/history/BP?limit=1000")["ticks"]
    assert sorted(t["id"] for t in stored) == sorted(t["id"] for t in items)


async def test_publish_reports_rejections_with_original_indices(servers):
    server = servers()
    items = ticks("OK", 2)
    items.insert(1, {"symbol": "BAD SYM", "ts": items[0]["ts"], "price": 1, "volume": 1})
    async with tickfan.Producer(server.ws("/ingest")) as p:
        ack = await p.publish(items)
    assert ack.accepted == 2
    assert [(r["index"], r["code"]) for r in ack.rejected] == [(1, "invalid_symbol")]


def test_examples_run_against_the_server(servers):
    """The README points users at these: they must work as documented."""
    import subprocess
    import sys
    from pathlib import Path

    server = servers()
    ex = Path(__file__).resolve().parents[1] / "examples"
    out = subprocess.run(
        [sys.executable, str(ex / "producer.py"), server.ws("/ingest"), "ACME", "--batches", "2", "--size", "30"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("accepted 30") == 2, out.stdout
    out = subprocess.run(
        [sys.executable, str(ex / "bot.py"), server.ws("/ws"), "ACME", "--window", "5", "--history", "20", "--max-ticks", "20"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "done after 20 ticks" in out.stdout, out.stdout
