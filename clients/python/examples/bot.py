"""A tiny trading bot: follows a few symbols with a moving average and says when the price
crosses it. Survives server restarts without losing or repeating a tick, and says so when the
server could not fill a hole (Gap) or its store was reset (EpochChange).

    pip install ./clients/python
    python clients/python/examples/bot.py ws://127.0.0.1:8080/ws AAPL BTC-USD

With a token: TICKFAN_TOKEN=... python clients/python/examples/bot.py URL SYMBOLS...
Stops after --max-ticks ticks (default: never).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import deque
from typing import Deque, Dict

import tickfan


async def run(url: str, symbols: list[str], window: int, history: int, max_ticks: int) -> None:
    prices: Dict[str, Deque[float]] = {}
    above: Dict[str, bool] = {}
    seen = 0
    async with tickfan.connect(url, token=os.environ.get("TICKFAN_TOKEN")) as tf:
        ack = await tf.subscribe(symbols, history=history, mode="realtime")
        print(f"subscribed {ack.get('symbols')} (epoch {tf.epoch})")
        async for ev in tf:
            if isinstance(ev, tickfan.Tick):
                seen += 1
                p = prices.setdefault(ev.symbol, deque(maxlen=window))
                p.append(ev.price)
                if len(p) == window:
                    avg = sum(p) / window
                    now_above = ev.price > avg
                    if above.get(ev.symbol) is not None and now_above != above[ev.symbol]:
                        side = "above" if now_above else "below"
                        print(f"{ev.symbol} #{ev.seq}: {ev.price} crossed {side} its {window}-tick average {avg:.4f}")
                    above[ev.symbol] = now_above
                if max_ticks and seen >= max_ticks:
                    print(f"done after {seen} ticks; last seqs {tf.last_seq}")
                    return
            elif isinstance(ev, tickfan.Gap):
                print(f"{ev.symbol}: ticks after #{ev.last_seq} are gone from the server's history (next #{ev.next_seq})")
                prices.pop(ev.symbol, None)
            elif isinstance(ev, tickfan.EpochChange):
                print(f"server store reset (epoch {ev.previous} -> {ev.epoch}); starting over")
                prices.clear()
                above.clear()
            else:  # a recovered error: slow_consumer, a dropped connection, ...
                print(f"note: {ev}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", nargs="?", default="ws://127.0.0.1:8080/ws")
    ap.add_argument("symbols", nargs="*", default=["AAPL", "BTC-USD"])
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--history", type=int, default=20, help="stored ticks per symbol to start from")
    ap.add_argument("--max-ticks", type=int, default=0)
    a = ap.parse_args()
    try:
        asyncio.run(run(a.url, a.symbols, a.window, a.history, a.max_ticks))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
