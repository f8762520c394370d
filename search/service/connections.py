"""Connection limits for `vitrine serve`: slow or stalled clients cannot hold connections for ever.

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`) and open connections
(`limit_concurrency`, a 503 beyond it), but not a request's head: a client that connects
and sends nothing, or half a header line, holds its connection indefinitely, and the
httptools parser sets no size limit on headers. `HeadLimitsProtocol` adds both:

* the head (request line and headers) must arrive within `head_timeout_s` of the connection
  opening or of its first byte: else 408 (or a plain close when nothing was sent);
* the head may be at most `max_head_bytes`: else 431. It is measured twice: by the bytes
  received while the head is still incomplete (a head that trickles in is refused before it
  is all buffered), and by the URL and header lines the parser hands over (a head that
  arrives whole in one read, or together with its body, is parsed within that read);
* a request the parser cannot read gets a 400 in the same JSON shape (uvicorn's is plain
  text). A URL over 65,535 bytes is one the parser cannot split, so it is 414 when the head
  limit is set above that.

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

_REASONS = {400: "Bad Request", 408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large"}
_MAX_URL_BYTES = 65_535  # httptools.parse_url keeps offsets in 16 bits
_HEADER_LINE_OVERHEAD = len(": \r\n")
_REQUEST_LINE_OVERHEAD = len("  HTTP/1.1\r\n") + len("\r\n")  # + method + URL; the blank line ends the head


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a request that is answered with `status`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class HeadLimitsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size limit on each request head."""

    head_timeout_s: ClassVar[float] = 10.0
    max_head_bytes: ClassVar[int] = 32 * 1024
    linger_s: ClassVar[float] = 2.0  # after a refusal, how long the rest of the request is read and dropped

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True  # the next bytes belong to a request head
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._parsed_head_bytes = 0  # of the URL and header lines of the request being parsed
        self._refusal: _HeadRefused | None = None
        self._answered = False  # a refusal was written: the connection only lingers until it closes
        self._linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # a connection that never sends a request is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return  # the rest of a refused request: read and dropped while lingering
        if self._reading_head:
            self._head_bytes += len(data)
            if self._head_timer is None:
                self._arm_head_timer()
        super().data_received(data)
        # Still in the head after parsing everything received: every byte counted belongs to it.
        if self._reading_head and self._head_bytes > self.max_head_bytes and not self._closing():
            self._refuse(431, "request_head_too_large", self._too_large_message())

    # Parser callbacks. Raising from one stops the parser; uvicorn then calls send_400_response.
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._parsed_head_bytes = 0

    def on_url(self, url: bytes) -> None:  # may come in pieces, one per read
        if not self.url:
            self._parsed_head_bytes += _REQUEST_LINE_OVERHEAD + len(self.parser.get_method())
        super().on_url(url)
        self._count_parsed_head(len(url))
        if len(self.url) > _MAX_URL_BYTES:
            self._refuse_while_parsing(414, "uri_too_long", f"the URL exceeds {_MAX_URL_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_parsed_head(len(name) + len(value) + _HEADER_LINE_OVERHEAD)
        super().on_header(name, value)

    def _count_parsed_head(self, size: int) -> None:
        self._parsed_head_bytes += size
        if self._parsed_head_bytes > self.max_head_bytes:
            self._refuse_while_parsing(431, "request_head_too_large", self._too_large_message())

    def _refuse_while_parsing(self, status: int, code: str, message: str) -> None:
        self._refusal = _HeadRefused(status, code, message)
        raise self._refusal

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request the parser refused: the refusal of a callback above, or
        a malformed request, in the app's JSON shape."""
        refusal, self._refusal = self._refusal, None
        if self._closing():
            return
        if refusal is not None:
            self._refuse(refusal.status, refusal.code, refusal.message)
        else:
            self._refuse(400, "invalid_http_request", msg)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True  # the next request's head; its timer starts with its first byte
        self._head_bytes = 0

    def _too_large_message(self) -> str:
        return f"request line and headers exceed {self.max_head_bytes} bytes"

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._reading_head or self._closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_timer()  # a response is still being written: never cut it off
            return
        if self._head_bytes:
            self._refuse(408, "request_timeout", f"the request line and headers did not arrive within {self.head_timeout_s:g} s")
        else:
            self.transport.close()  # an idle connection: nothing to answer

    def _closing(self) -> bool:
        return self._answered or self.transport.is_closing()

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer in the app's JSON error shape and close: the rest of the request is never parsed."""
        body = json.dumps(error_body(code, message)).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode("latin-1") + body)
        self._answered = True
        self._cancel_head_timer()
        self._linger()

    def _linger(self) -> None:
        """Close without losing the answer. Closing a socket with unread bytes in it makes the kernel
        send a reset, which can destroy the answer before the client has read it (a client still
        sending a large head is the usual case). So the write side is shut after the answer, what
        still arrives is read and dropped, and the connection closes when the client closes or
        after `linger_s` (a lingering connection still counts towards the connection limit)."""
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._linger_timer = self.loop.call_later(self.linger_s, self.transport.close)


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
