"""GET /healthz (liveness), GET /readyz (readiness) and GET /metrics (Prometheus).

/healthz: 200 while the process serves HTTP.
/readyz:  200 {"status": "ready"} when the index is loaded and Redis (if configured) answers;
          200 {"status": "degraded"} when Redis is configured but unreachable: requests still
          succeed (cache misses, disk store), so a load balancer should keep routing here;
          503 {"status": "not_ready"} until the index is loaded.
          `reranker` says whether the bundle's reranker is loaded, its layers, and the default N.
          `redis.url` is the configured URL with its password masked.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from search.service.deps import get_metrics
from search.service.metrics import ServiceMetrics
from search.service.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="Liveness")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "index not loaded"}},
    summary="Readiness (ready | degraded | not_ready)",
)
async def readyz(request: Request) -> JSONResponse:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        return JSONResponse(ReadyResponse(status="not_ready").model_dump(), status_code=503)
    index = {"products": engine.size, "version": engine.version, "bundle_fingerprint": engine.fingerprint,
             "alpha": engine.alphas.alpha, "alpha_text": engine.alphas.for_kind("text"),
             "alpha_image": engine.alphas.for_kind("image")}  # fmt: skip
    redis = None
    status = "ready"
    if engine.link is not None:
        up = await run_in_threadpool(engine.link.ping)
        redis = {"configured": True, "url": engine.link.display_url, "reachable": up, "product_store_synced": engine.store_synced}
        if not up:
            status = "degraded"
            redis["error"] = engine.link.last_error
    ready = ReadyResponse(status=status, index=index, redis=redis, reranker=engine.reranker_info())
    return JSONResponse(ready.model_dump())


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
def metrics(metrics: Annotated[ServiceMetrics, Depends(get_metrics)]) -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
