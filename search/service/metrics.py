"""Prometheus metrics, on a registry per app (so several apps in one process never clash).

    vitrine_requests_total{method, route, status}
    vitrine_request_seconds{method, route}              whole request, as the ASGI app saw it
    vitrine_stage_seconds{kind, stage}                   kind: text | image | similar; stage: decode, tokenise, encode,
                                                         search, scan, fill_in, fuse (lexical / hybrid lists), records, rerank, total,
                                                         serialise (see STAGES)
    vitrine_text_batch_size                              texts per text-encoder call (micro-batching)
    vitrine_query_cache_total{result}                    local | redis | miss
    vitrine_redis_up                                     1 when the last Redis call worked (absent without Redis)
    vitrine_index_products                               products in the served index
    vitrine_index_switches_total{result}                 ok | failed: switches to another index version
    vitrine_index_switch_seconds                         opening and checking a new version before the swap
    vitrine_writes_total{action, result}                 catalog writes over HTTP (action: put | delete | batch)
    vitrine_write_seconds{action}                        a write, from accepted to durable (and served here)
    vitrine_write_queue                                  writes accepted and not yet answered
    vitrine_write_commit_seconds                         one commit of queued writes as a new index version
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# decode: text normalisation / image decoding; encode: cache lookup + model (tokenise is a part of it);
# search: the index search, made of scan (candidates) and fill_in (exact fused scores, ranking);
# records: product records for the hits; rerank; total: all of these; serialise: response model + JSON.
STAGES = ("decode", "tokenise", "encode", "search", "scan", "fill_in", "fuse", "records", "rerank", "total", "serialise")
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
# Millisecond-scale work: buckets from 0.5 ms to 10 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                   0.1, 0.2, 0.5, 1.0, 2.5, 10.0)  # fmt: skip
SLOW_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # index switches and writes


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
        self.text_batch_size = Histogram(
            "vitrine_text_batch_size", "texts per text-encoder call", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.query_cache = Counter("vitrine_query_cache", "query-embedding cache lookups", ["result"], registry=self.registry)
        self.redis_up = Gauge("vitrine_redis_up", "1 when Redis answered the last call", registry=self.registry)
        self.index_products = Gauge("vitrine_index_products", "products in the served index", registry=self.registry)
        self.index_switches = Counter("vitrine_index_switches", "switches to another index version", ["result"], registry=self.registry)
        self.index_switch_seconds = Histogram(
            "vitrine_index_switch_seconds", "opening and checking a new index version", buckets=SLOW_BUCKETS, registry=self.registry
        )
        self.writes = Counter("vitrine_writes", "catalog writes over HTTP", ["action", "result"], registry=self.registry)
        self.write_seconds = Histogram(
            "vitrine_write_seconds", "catalog write, accepted to durable", ["action"], buckets=SLOW_BUCKETS, registry=self.registry
        )
        self.write_queue = Gauge("vitrine_write_queue", "writes accepted and not yet answered", registry=self.registry)
        self.write_commit_seconds = Histogram(
            "vitrine_write_commit_seconds", "one commit of queued writes", buckets=SLOW_BUCKETS, registry=self.registry
        )

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
                message = with_app_timing(message, time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.request_seconds.labels(method, template).observe(time.perf_counter() - start)


def with_app_timing(message: Message, seconds: float) -> Message:
    """A response that has a Server-Timing header (the search routes) gets `app;dur=` added: the whole
    request as the app saw it, body read and routing included. The client's latency minus it is HTTP."""
    headers = message.get("headers") or []
    if not any(name == b"server-timing" for name, _ in headers):
        return message
    app = b"app;dur=%.3f" % (seconds * 1000.0)
    return {**message, "headers": [(name, value + b", " + app if name == b"server-timing" else value) for name, value in headers]}
