"""The FastAPI app factory.

    app = create_app(Settings(index="indexes/fashion"))     # loads index + bundle at start-up
    app = create_app(settings, index=index, encoder=enc)     # tests: inject what is already open

The bundle's reranker, when it has one, is loaded too (or injected with `reranker=`); start-up
refuses an index whose stored patch features are not the ones the reranker reads.

Routers: search (/search/text, /search/image), products (/products/{id}[/image], /filters),
catalog writes with an API key (PUT and DELETE /products/{id}, POST /products:batch;
`search.service.writes`), health (/healthz, /readyz, /metrics); the web page at / and /static.
A running app follows its index: a new version (CURRENT switched by a build, an upsert or a
write, here or on another replica) is served within a poll or two (`search.service.live`).
OpenAPI docs at /docs (Swagger UI served from this app, `search.service.openapi`). Every response carries security
headers (`search.service.headers`); bodies are limited in size and read time (`search.service.limits`).
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from search.service.audit import AuditLog
from search.service.auth import require_read_key
from search.service.engine import SearchEngine, open_reranker
from search.service.errors import install_error_handlers
from search.service.headers import SecurityHeadersMiddleware
from search.service.limits import BodySizeLimitMiddleware, BodyTimeoutMiddleware
from search.service.live import VersionFollower
from search.service.metrics import MetricsMiddleware, ServiceMetrics
from search.service.openapi import install_docs
from search.service.redis_store import masked_url
from search.service.routers import catalog, health, products, search, similar
from search.service.settings import Settings
from search.service.writes import CatalogWriter
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
    if expected and expected not in (encoder.fingerprint, encoder.embeds_like):
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


def version_opener(index: SearchIndex) -> Callable[[str], SearchIndex] | None:
    """How to open another version of the served index (live updates, writes), or None when it cannot
    be done: an index that is not a `ProductIndex` over an index folder (a bare version folder)."""
    from indexer.layout import IndexLayout
    from indexer.product_index import ProductIndex

    if not isinstance(index, ProductIndex) or not IndexLayout(index.index_dir).is_index():
        return None
    root = Path(index.index_dir)
    return lambda version: ProductIndex.open(root, version=version)


def create_app(
    settings: Settings | None = None,
    *,
    index: SearchIndex | None = None,
    encoder: ServingEncoder | None = None,
    reranker: Reranker | None = None,
    owns_index: bool = False,
) -> FastAPI:
    """The service app. Without `index`/`encoder`, both are opened from settings at start-up;
    without `reranker`, the encoder's bundle's reranker is loaded when it has one. An `index` given
    here is closed by the app (once a newer version replaces it, or at shutdown) only with `owns_index`."""
    settings = settings or Settings()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served_index = index if index is not None else open_index(settings)
        served_encoder = encoder if encoder is not None else open_encoder(settings, served_index)
        served_reranker = reranker if reranker is not None else open_reranker(settings, served_index, served_encoder)
        opener = version_opener(served_index)
        engine = SearchEngine(settings, served_index, served_encoder, metrics, reranker=served_reranker,
                              owns_index=index is None or owns_index, open_version=opener)  # fmt: skip
        engine.start()
        follower = writer = None
        if opener is not None:
            root = Path(served_index.index_dir)
            follower = VersionFollower(engine, root, settings.index_poll_s)
            if settings.index_poll_s > 0:
                follower.start()
            if settings.write_keys:
                app.state.audit = AuditLog(settings.audit_log or root / "audit.jsonl")
                writer = CatalogWriter(engine, root, settings, metrics, app.state.audit, publish=follower.publish)
        app.state.writer = writer
        app.state.engine = engine
        log.info("serving %d products (index %s, bundle %s, alpha %s, reranker %s, redis %s)", engine.size,
                 engine.version, engine.fingerprint, engine.alphas,
                 f"{served_reranker.layers} layers" if served_reranker else "none",
                 masked_url(settings.redis_url) if engine.link else "off")  # fmt: skip
        try:
            yield
        finally:
            app.state.engine = None
            if writer is not None:
                writer.close()  # commits what is queued
            if follower is not None:
                follower.stop()
            engine.close()  # an index it owns is closed: its version lease is released (pruning may delete it now)

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
    app.state.writer = None
    app.state.audit = None
    install_error_handlers(app)
    # Outermost last: metrics see every response, 413s and 408s included.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(BodyTimeoutMiddleware, idle_s=settings.body_idle_timeout_s, total_s=settings.body_timeout_s)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    reads = [Depends(require_read_key)] if settings.read_keys else []  # reads are open unless keys are set
    app.include_router(search.router, dependencies=reads)
    app.include_router(products.router, dependencies=reads)
    app.include_router(similar.router, dependencies=reads)
    app.include_router(catalog.router)
    app.include_router(health.router)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if settings.docs:
        install_docs(app, settings, app.openapi_url or "/openapi.json")
    return app
