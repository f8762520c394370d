"""Prometheus metrics, on a registry per app (so several apps in one process never clash).

    vitrine_requests_total{method, route, status}
    vitrine_request_seconds{method, route}              whole request, as the ASGI app saw it
    vitrine_stage_seconds{kind, stage}                   kind: text | image; stage: decode, encode, search, fuse, rerank, total
    vitrine_query_cache_total{result}                    local | redis | miss
    vitrine_redis_up                                     1 when the last Redis call worked (absent without Redis)
    vitrine_index_products                               products in the served index
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STAGES = ("decode", "encode", "search", "fuse", "rerank", "total")
# Millisecond-scale work: buckets from 0.5 ms to 10 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                   0.1, 0.2, 0.5, 1.0, 2.5, 10.0)  # fmt: skip


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("vitrine_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry)
        self.request_seconds = Histogram(
            "vitrine_request_seconds", "HTTP request latency", ["method", "route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "vitrine_stage_seconds", "search latency per stage", ["kind", "stage"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.query_cache = Counter("vitrine_query_cache", "query-embedding cache lookups", ["result"], registry=self.registry)
        self.redis_up = Gauge("vitrine_redis_up", "1 when Redis answered the last call", registry=self.registry)
        self.index_products = Gauge("vitrine_index_products", "products in the served index", registry=self.registry)

    @contextmanager
    def stage(self, kind: str, stage: str, timings: dict[str, float] | None = None) -> Iterator[None]:
        """Time a block into vitrine_stage_seconds (and `timings[stage]` in ms, for the response)."""
        assert stage in STAGES, stage
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.stage_seconds.labels(kind, stage).observe(elapsed)
            if timings is not None:
                timings[stage] = elapsed * 1000.0

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts requests by route template (not raw path: /products/{id} is one series) and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app raises before answering, ServerErrorMiddleware answers 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.request_seconds.labels(method, template).observe(time.perf_counter() - start)
