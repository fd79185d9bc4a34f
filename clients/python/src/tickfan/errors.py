"""Typed errors. Errors the client recovers from by itself (``slow_consumer``,
``rate_limited``, a dead connection) are *yielded* by ``async for`` as instances of these
classes so you see them; fatal ones (``AuthError``) are *raised*."""

from __future__ import annotations

from typing import Optional


class TickfanError(Exception):
    """Base class. ``code`` is the server's error code where there is one."""

    def __init__(self, code: str, message: str = "", retry_after_ms: Optional[int] = None):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


class AuthError(TickfanError):
    """Missing, wrong or expired token (close 4001). Fatal: the client stops."""


class SlowConsumer(TickfanError):
    """The server closed us as a slow consumer (4008). The client resumes with since_seq."""


class RateLimited(TickfanError):
    """Too many requests; the client retries its own requests after ``retry_after_ms``."""


class ConnectionLost(TickfanError):
    """The connection dropped (or went silent) and the client is reconnecting; or, from
    ``publish``, the ingest connection dropped before every tick was acked."""


class Backpressure(TickfanError):
    """``publish`` gave up: ticks were still refused after ``max_attempts`` resends."""


class RequestError(TickfanError):
    """The server refused a request (``bad_request``, ``invalid_symbol``, ...)."""


def from_server(code: str, message: str, retry_after_ms: Optional[int]) -> TickfanError:
    """The typed error for a server ``{"type":"error"}`` message."""
    cls = {
        "unauthorized": AuthError,
        "token_expired": AuthError,
        "slow_consumer": SlowConsumer,
        "rate_limited": RateLimited,
        "backpressure": Backpressure,
    }.get(code, RequestError)
    return cls(code, message, retry_after_ms)
