"""The connection lifecycle the two raw request-path transports share.

``features/resp.py`` (Redis) and ``inference/triton_http.py`` (Triton over HTTP) each
keep one call at a time per connection: a future (``_waiter``) that the reply, an error,
the peer closing or a deadline settles, exactly once. This base class holds that part;
each transport parses its own replies and sends its own requests.
"""

from __future__ import annotations

import asyncio
from typing import Any


class OneCallConnection(asyncio.Protocol):
    """Settles the call in flight on EOF, loss, failure or timeout; never reused after."""

    __slots__ = ("transport", "closed", "_waiter")
    PEER = "the server"  # for the error when the peer closes mid-call
    TIMEOUT_MESSAGE = ""  # TimeoutError's message when the deadline passes

    transport: asyncio.Transport | None
    closed: bool
    _waiter: asyncio.Future[Any] | None

    def eof_received(self) -> bool | None:
        self.closed = True  # never handed out again, even before connection_lost runs
        return None  # close the transport; connection_lost fails any call in flight

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc or ConnectionResetError(f"{self.PEER} closed the connection"))

    def _fail(self, exc: Exception) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.abort()

    def _expire(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError(self.TIMEOUT_MESSAGE))

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
