"""FastAPI dependencies: the app's settings, engine and metrics, as set up by create_app.

Tests override them with `app.dependency_overrides[get_settings] = ...`.
"""
from __future__ import annotations

from fastapi import Request

from search.service.engine import SearchEngine
from search.service.errors import ApiError
from search.service.metrics import ServiceMetrics
from search.service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


async def get_engine(request: Request) -> SearchEngine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise ApiError(503, "not_ready", "the index is not loaded yet")
    return engine


async def require_json(request: Request) -> None:
    """JSON-only endpoints: a form or text body is a 415, not a confusing validation error."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        got = f"not {media_type}" if media_type else "the request has no Content-Type"
        raise ApiError(415, "unsupported_media_type", f"send application/json ({got})")
