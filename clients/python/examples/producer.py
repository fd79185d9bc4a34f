"""Publishes a random walk for one symbol, one batch per second, and prints each ack.
`publish` resends exactly the ticks the server refused with backpressure.

    python clients/python/examples/producer.py ws://127.0.0.1:8080/ingest ACME --batches 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time

import tickfan


async def run(url: str, symbol: str, batches: int, size: int) -> None:
    price = 100.0
    async with tickfan.Producer(url, token=os.environ.get("TICKFAN_INGEST_TOKEN")) as producer:
        for b in range(batches):
            ticks = []
            for i in range(size):
                price = max(0.01, price * (1 + random.gauss(0, 0.001)))
                ticks.append({"symbol": symbol, "ts": int(time.time() * 1000), "price": round(price, 4),
                              "volume": random.randint(1, 100), "id": f"{symbol}-{time.time_ns()}-{i}"})
            ack = await producer.publish(ticks)
            print(f"batch {b}: accepted {ack.accepted}, duplicates {ack.duplicates}, "
                  f"rejected {len(ack.rejected)}, resent {ack.resent}")
            await asyncio.sleep(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", nargs="?", default="ws://127.0.0.1:8080/ingest")
    ap.add_argument("symbol", nargs="?", default="ACME")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--size", type=int, default=100)
    a = ap.parse_args()
    asyncio.run(run(a.url, a.symbol, a.batches, a.size))


if __name__ == "__main__":
    main()
