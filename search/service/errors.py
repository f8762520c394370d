"""One JSON error shape for every failure, and the handlers that produce it.

    {"error": {"code": "invalid_image", "message": "...", "details": [...]}}

`code` is stable and machine-readable, `message` is for people, `details` (optional)
lists per-field problems as {"loc": [...], "msg": "..."}. Validation problems are 422,
unreadable bodies 400, oversized 413, wrong media types 415; 500 only for genuine bugs.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vitrine.errors import IndexUnavailableError

log = logging.getLogger(__name__)

# Starlette's own HTTP errors (routing, method) get a code from their status.
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "unavailable",
}


class ApiError(Exception):
    """An expected failure with its HTTP status and error code."""

    def __init__(self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers  # e.g. Retry-After on a 429, WWW-Authenticate on a 401


# A lone surrogate ("\ud800" in a JSON string) is a str Python can hold but UTF-8 cannot encode.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def printable(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD, so it can be written as UTF-8."""
    return _LONE_SURROGATE.sub("\ufffd", text)


class ErrorJSONResponse(JSONResponse):
    """JSON that can always be written: an error message may quote the client's own (invalid) text."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return printable(text).encode("utf-8")


def error_body(code: str, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return {"error": error}


def error_response(status: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    return ErrorJSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def field_error(loc: list[str | int], msg: str, status: int = 422, code: str = "validation_error") -> ApiError:
    """A one-field validation error, shaped like pydantic's."""
    where = ".".join(str(p) for p in loc if p != "body") or "request"
    return ApiError(status, code, f"{where}: {msg}", [{"loc": list(loc), "msg": msg}])


def validation_details(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic errors -> [{"loc", "msg", "type"}] without echoing inputs back (they may be huge)."""
    return [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")).removeprefix("Value error, "), "type": str(e.get("type", ""))}
        for e in errors
    ]


def validation_error(errors: list[dict[str, Any]], loc_prefix: tuple[str, ...] = ()) -> ApiError:
    """pydantic's error list -> a 422 ApiError (400 when the body is not JSON at all)."""
    details = validation_details(errors)
    for d in details:
        d["loc"] = [*loc_prefix, *d["loc"]]
    if any(d["type"] == "json_invalid" for d in details):
        return ApiError(400, "malformed_json", "request body is not valid JSON", details)
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"] if p != "body") or "request"
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return ApiError(422, "validation_error", f"{where}: {first['msg']}{more}", details)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()))
        return error_response(err.status, err.code, err.message, err.details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 400 and "parsing the body" in message:
            code = "malformed_body"
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(IndexUnavailableError)
    async def _index_unavailable(request: Request, exc: IndexUnavailableError) -> JSONResponse:
        # The vector engine (a Qdrant server) is down or slow: not a bug, and retrying later can work.
        log.warning("search index unavailable on %s %s: %s", request.method, request.url.path, exc)
        return error_response(503, "index_unavailable", "the search index cannot answer now; try again shortly",
                              headers={"Retry-After": "1"})  # fmt: skip

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # Only genuine bugs land here; every expected failure is an ApiError.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")
