"""Connection limits for `vitrine serve`: slow or stalled clients cannot hold connections for ever.

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`) and open connections
(`limit_concurrency`, a 503 beyond it), but not a request's head: a client that connects
and sends nothing, or half a header line, holds its connection indefinitely, and the
httptools parser sets no size limit on headers. `HeadLimitsProtocol` adds both:

* the head (request line and headers) must arrive within `head_timeout_s` of the connection
  opening or of its first byte: else 408 (or a plain close when nothing was sent);
* the head may be at most `max_head_bytes`: else 431.

Bodies are bounded by `search.service.limits` (413 over the size, 408 when they stall).

    uvicorn.run(app, **server_options(settings))
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from search.service.errors import error_body
from search.service.settings import Settings

_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}


class HeadLimitsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size limit on each request head."""

    head_timeout_s: ClassVar[float] = 10.0
    max_head_bytes: ClassVar[int] = 32 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True  # the next bytes belong to a request head
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # a connection that never sends a request is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._reading_head:
            self._head_bytes += len(data)
            if self._head_timer is None:
                self._arm_head_timer()
        super().data_received(data)
        # Still in the head after parsing everything received: every byte counted belongs to it.
        if self._reading_head and self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
            self._refuse(431, "request_head_too_large", f"request line and headers exceed {self.max_head_bytes} bytes")

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True  # the next request's head; its timer starts with its first byte
        self._head_bytes = 0

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._reading_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_timer()  # a response is still being written: never cut it off
            return
        if self._head_bytes:
            self._refuse(408, "request_timeout", f"the request line and headers did not arrive within {self.head_timeout_s:g} s")
        else:
            self.transport.close()  # an idle connection: nothing to answer

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer in the app's JSON error shape and close: the rest of the head is never read."""
        body = json.dumps(error_body(code, message)).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode("latin-1") + body)
        self.transport.close()


def head_limits_protocol(head_timeout_s: float, max_head_bytes: int) -> type[HeadLimitsProtocol]:
    """A HeadLimitsProtocol class with these limits (uvicorn instantiates the class it is given)."""
    return type(
        "ConfiguredHeadLimitsProtocol", (HeadLimitsProtocol,), {"head_timeout_s": head_timeout_s, "max_head_bytes": max_head_bytes}
    )


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for the connection limits in `settings`."""
    return {
        "http": head_limits_protocol(settings.request_head_timeout_s, settings.max_request_head_bytes),
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "limit_concurrency": settings.max_connections,
    }
