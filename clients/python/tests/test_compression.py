"""permessage-deflate with the Python ``websockets`` library against the real binary: its
default offer (``permessage-deflate; client_max_window_bits``) is accepted with no context
takeover either way, compressed ticks arrive and parse, compressed requests are understood,
and ``compression=None`` (or ``[server] permessage_deflate = false``) gives a plain
connection."""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.client import connect
from websockets.extensions.permessage_deflate import PerMessageDeflate

from conftest import DEADLINE, ticks


async def next_of(ws, kind: str, **match) -> dict:
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))
        if msg.get("type") == kind and all(msg.get(k) == v for k, v in match.items()):
            return msg


async def publish(server, symbol: str, n: int) -> None:
    async with connect(server.ws("/ingest"), compression=None) as producer:
        await producer.send(json.dumps(ticks(symbol, n)))
        ack = await next_of(producer, "ingest_ack")
        assert ack["accepted"] == n, ack


async def test_websockets_negotiates_deflate_and_gets_ticks(servers):
    server = servers()
    # compression="deflate" is the library's default; said here so the test means it.
    async with connect(server.ws("/ws"), compression="deflate") as ws:
        [ext] = ws.protocol.extensions
        assert isinstance(ext, PerMessageDeflate)
        assert ext.remote_no_context_takeover, "server_no_context_takeover"
        assert ext.local_no_context_takeover, "client_no_context_takeover"
        assert (await next_of(ws, "welcome"))["protocol"] == 1
        # The request goes out compressed (websockets compresses every frame it can).
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "symbols": ["PYZ"]}))
        assert (await next_of(ws, "ack", id=1))["type"] == "ack"
        await publish(server, "PYZ", 20)
        seqs = [(await next_of(ws, "tick", symbol="PYZ"))["seq"] for _ in range(20)]
        assert seqs == list(range(1, 21))
    assert server.metric("tickfan_deflate_frames_sent_total") >= 20
    assert server.metric("tickfan_deflate_compressions_total") >= 20


async def test_websockets_without_compression_is_plain(servers):
    server = servers()
    async with connect(server.ws("/ws"), compression=None) as ws:
        assert ws.protocol.extensions == []
        await next_of(ws, "welcome")
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "symbols": ["PYP"]}))
        await next_of(ws, "ack", id=1)
        await publish(server, "PYP", 3)
        assert (await next_of(ws, "tick", symbol="PYP"))["seq"] == 1
    assert server.metric("tickfan_deflate_frames_sent_total") == 0


async def test_the_config_can_turn_it_off(servers):
    server = servers(toml="[server]\npermessage_deflate = false\n")
    async with connect(server.ws("/ws")) as ws:
        assert ws.protocol.extensions == []
        assert (await next_of(ws, "welcome"))["protocol"] == 1
