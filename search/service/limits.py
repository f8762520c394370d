"""Request-body limits: size (413 from the Content-Length header, or as soon as a streamed body passes
it) and time (408 when a body stalls: a client that declares 100 bytes and sends 8 cannot hold a
request open). Connection-level limits (request head, keep-alive, connection count) are uvicorn's,
set up in `search.service.connections`.
"""
from __future__ import annotations

import json

import anyio
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from search.service.errors import error_body


class BodyLimitError(HTTPException):
    """A body over a limit. An HTTPException, so FastAPI's body parsing re-raises it as it is (not as a 400),
    and the app's handler answers it in the usual JSON shape."""


class BodyTooLarge(BodyLimitError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes")


class BodyReadTimeout(BodyLimitError):
    def __init__(self, message: str) -> None:
        # The rest of the body may still be on its way: the connection cannot be reused.
        super().__init__(408, message, headers={"Connection": "close"})


class BodySizeLimitMiddleware:
    """Rejects bodies over `max_bytes` before the app buffers them.

    A declared Content-Length over the limit is answered at once. Chunked or lying
    bodies are counted while the app reads them: receive() raises BodyTooLarge, which the
    app's HTTPException handler turns into the same 413 JSON.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._reject(send)
            return
        received = 0
        response_tracker = ResponseTracker(send)

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, counting_receive, response_tracker.send)
        except BodyTooLarge:
            if response_tracker.started:
                raise
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        await send_error(send, 413, "payload_too_large", f"request body exceeds {self.max_bytes} bytes")


class BodyTimeoutMiddleware:
    """Answers 408 when a request body stalls: each chunk must arrive within `idle_s` of the
    previous one, and the whole body within `total_s` of the request's head.

    receive() raises BodyReadTimeout, which the app's HTTPException handler turns into the 408
    JSON (with Connection: close); if the app lets it through, it is answered here. Once the
    body is complete, receive() is passed through untimed (it then waits for a disconnect).
    """

    def __init__(self, app: ASGIApp, idle_s: float, total_s: float) -> None:
        self.app = app
        self.idle_s = idle_s
        self.total_s = total_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = anyio.current_time() + self.total_s
        body_complete = False
        response_tracker = ResponseTracker(send)

        async def timed_receive() -> Message:
            nonlocal body_complete
            if body_complete:
                return await receive()
            left = deadline - anyio.current_time()
            with anyio.move_on_after(max(0.0, min(self.idle_s, left))):
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    body_complete = True
                return message
            if left <= self.idle_s:
                raise BodyReadTimeout(f"the request body did not arrive within {self.total_s:g} s")
            raise BodyReadTimeout(f"the request body stalled: nothing arrived for {self.idle_s:g} s")

        try:
            await self.app(scope, timed_receive, response_tracker.send)
        except BodyReadTimeout as exc:
            if response_tracker.started:
                raise
            await send_error(send, 408, "request_timeout", exc.detail)


class ResponseTracker:
    """Wraps `send` and remembers whether the response has started: a middleware may only answer
    an error of its own while it has not."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


async def send_error(send: Send, status: int, code: str, message: str) -> None:
    """An error response in the app's JSON shape, sent from middleware (outside the app's handlers);
    the connection is closed after it (the rest of the body is not read)."""
    body = json.dumps(error_body(code, message)).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
