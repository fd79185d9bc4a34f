"""What the client hands you: ticks, gap and epoch events, acks (docs/protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, TypedDict

Mode = Literal["realtime", "throttled", "batch", "smart"]
"""Delivery modes (docs/protocol.md "Delivery modes")."""

_CORE = ("symbol", "seq", "ts", "price", "volume", "quality", "t_in")


@dataclass(frozen=True)
class Tick:
    """A delivered tick. ``extra`` holds the optional ingest fields (bid, ask, open, high, low,
    close, id, priority, conflated) exactly as the server sent them. ``snapshot`` is True for
    ticks that came from history or a resume replay, False for live ones."""

    symbol: str
    seq: int
    ts: int
    price: float
    volume: float
    quality: int = 0
    t_in: int = 0
    snapshot: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, m: Dict[str, Any], snapshot: bool) -> "Tick":
        extra = {k: v for k, v in m.items() if k not in _CORE and k != "type"}
        return cls(
            symbol=m["symbol"],
            seq=int(m["seq"]),
            ts=int(m.get("ts", 0)),
            price=float(m.get("price", 0.0)),
            volume=float(m.get("volume", 0.0)),
            quality=int(m.get("quality", 0)),
            t_in=int(m.get("t_in", 0)),
            snapshot=snapshot,
            extra=extra,
        )


@dataclass(frozen=True)
class Gap:
    """Ticks of ``symbol`` after ``last_seq`` were skipped: the server's history no longer
    reaches back to where the client resumed (``reason="history"``), or a live seq jumped
    where nothing explains it (``reason="seq_hole"``). ``next_seq`` is the first seq delivered
    after the hole (None when the replay was empty)."""

    symbol: str
    last_seq: int
    next_seq: Optional[int]
    reason: Literal["history", "seq_hole"]


@dataclass(frozen=True)
class EpochChange:
    """The server's store was reset (new data dir, lost store): seqs started over. The client
    forgot its seqs and resumed every symbol from the new store's start."""

    previous: int
    epoch: int


class Ack(TypedDict, total=False):
    """A subscribe/unsubscribe/configure ack."""

    type: str
    id: int
    op: str
    symbols: List[str]
    rejected: List[Dict[str, str]]
    last_seq: Dict[str, int]
    mode: str


class Rejection(TypedDict):
    """One rejected tick; ``index`` is its position in the list given to ``publish``."""

    index: int
    code: str
    message: str


@dataclass
class IngestAck:
    """The ack of one ``publish`` call, merged over every resend.

    ``resent`` counts ticks sent again after a ``backpressure`` refusal; ``attempts`` counts
    frames sent (1 when nothing was refused)."""

    accepted: int = 0
    duplicates: int = 0
    rejected: List[Rejection] = field(default_factory=list)
    rejected_total: int = 0
    resent: int = 0
    attempts: int = 0
