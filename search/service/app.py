"""The FastAPI app factory.

    app = create_app(Settings(index="indexes/fashion"))     # loads index + bundle at start-up
    app = create_app(settings, index=index, encoder=enc)     # tests: inject what is already open

The bundle's reranker, when it has one, is loaded too (or injected with `reranker=`); start-up
refuses an index whose stored patch features are not the ones the reranker reads.

Routers: search (/search/text, /search/image), products (/products/{id}[/image], /filters),
health (/healthz, /readyz, /metrics); the web page at / and /static. OpenAPI docs at /docs
(Swagger UI served from this app, `search.service.openapi`). Every response carries security
headers (`search.service.headers`); bodies are limited in size and read time (`search.service.limits`).
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from search.service.engine import SearchEngine, open_reranker
from search.service.errors import install_error_handlers
from search.service.headers import SecurityHeadersMiddleware
from search.service.limits import BodySizeLimitMiddleware, BodyTimeoutMiddleware
from search.service.metrics import MetricsMiddleware, ServiceMetrics
from search.service.openapi import install_docs
from search.service.redis_store import masked_url
from search.service.routers import health, products, search
from search.service.settings import Settings
from vitrine.errors import UserError
from vitrine.protocols import Reranker, SearchIndex, ServingEncoder

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


def open_index(settings: Settings) -> SearchIndex:
    """The live index version, searched by settings.backend (Faiss, or Qdrant: `search.service.backends`)."""
    from search.service.backends import open_backend_index

    return open_backend_index(settings)


def open_encoder(settings: Settings, index: SearchIndex) -> ServingEncoder:
    """The bundle the index was built with (or settings.bundle), checked against the index's fingerprint."""
    from vitrine.runtime import load_bundle

    bundle = settings.bundle or _manifest_bundle(index)
    if bundle is None:
        raise UserError("the index does not record its bundle: pass --bundle or set VITRINE_BUNDLE")
    encoder = load_bundle(bundle, threads=settings.threads)
    expected = index.bundle_fingerprint
    if expected and encoder.fingerprint != expected:
        raise UserError(
            f"bundle {bundle} (fingerprint {encoder.fingerprint}) is not the one index {index.index_dir} "
            f"was built with ({expected}): queries would be embedded by another model"
        )
    return encoder


def _manifest_bundle(index: SearchIndex) -> Path | None:
    """The bundle the index records (relative paths are relative to the index)."""
    if not index.bundle_path:
        return None
    path = Path(index.bundle_path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return Path(index.index_dir) / path  # relative to the index


def create_app(
    settings: Settings | None = None,
    *,
    index: SearchIndex | None = None,
    encoder: ServingEncoder | None = None,
    reranker: Reranker | None = None,
) -> FastAPI:
    """The service app. Without `index`/`encoder`, both are opened from settings at start-up;
    without `reranker`, the encoder's bundle's reranker is loaded when it has one."""
    settings = settings or Settings()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served_index = index if index is not None else open_index(settings)
        served_encoder = encoder if encoder is not None else open_encoder(settings, served_index)
        served_reranker = reranker if reranker is not None else open_reranker(settings, served_index, served_encoder)
        engine = SearchEngine(settings, served_index, served_encoder, metrics, reranker=served_reranker)
        engine.start()
        app.state.engine = engine
        log.info("serving %d products (index %s, bundle %s, alpha %s, reranker %s, redis %s)", engine.size,
                 engine.version, engine.fingerprint, engine.alphas,
                 f"{served_reranker.layers} layers" if served_reranker else "none",
                 masked_url(settings.redis_url) if engine.link else "off")  # fmt: skip
        try:
            yield
        finally:
            app.state.engine = None
            engine.close()
            if index is None and hasattr(served_index, "close"):
                served_index.close()  # opened here: release its version lease (pruning may delete it now)

    app = FastAPI(
        title="Vitrine",
        summary="Cross-modal product search: text and photo queries over a fashion catalog.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served by install_docs, from local assets
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = None
    install_error_handlers(app)
    # Outermost last: metrics see every response, 413s and 408s included.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(BodyTimeoutMiddleware, idle_s=settings.body_idle_timeout_s, total_s=settings.body_timeout_s)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.include_router(search.router)
    app.include_router(products.router)
    app.include_router(health.router)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if settings.docs:
        install_docs(app, settings, app.openapi_url or "/openapi.json")
    return app
