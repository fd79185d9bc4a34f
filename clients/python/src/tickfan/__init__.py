"""tickfan: an asyncio client that never loses a tick.

```python
import tickfan

async with tickfan.connect("ws://127.0.0.1:8080/ws") as tf:
    await tf.subscribe(["AAPL", "BTC-USD"], history=10, mode="realtime")
    async for ev in tf:                 # snapshot ticks first, then live, in seq order
        if isinstance(ev, tickfan.Tick):
            print(ev.symbol, ev.seq, ev.price)
        elif isinstance(ev, tickfan.Gap):
            print("skipped ticks of", ev.symbol, "after", ev.last_seq)
```

See docs/clients.md in the tickfan repository.
"""

from .client import Client, Event, Producer, connect
from .errors import (
    AuthError,
    Backpressure,
    ConnectionLost,
    RateLimited,
    RequestError,
    SlowConsumer,
    TickfanError,
)
from .types import Ack, EpochChange, Gap, IngestAck, Mode, Rejection, Tick

__all__ = [
    "Ack",
    "AuthError",
    "Backpressure",
    "Client",
    "ConnectionLost",
    "EpochChange",
    "Event",
    "Gap",
    "IngestAck",
    "Mode",
    "Producer",
    "RateLimited",
    "Rejection",
    "RequestError",
    "SlowConsumer",
    "Tick",
    "TickfanError",
    "connect",
]
