"""`vitrine serve`: the query service under uvicorn."""
from __future__ import annotations

import argparse
from pathlib import Path

from vitrine.cliargs import port, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the search API and web page over an index",
        description="Serve text and photo search over an index (HTTP API, web page at /, docs at /docs). "
        "Every option can also be set in the environment (VITRINE_*, REDIS_URL): see deploy/settings.md.",
    )
    parser.add_argument("--index", type=Path, help="index directory (default $VITRINE_INDEX)")
    parser.add_argument("--bundle", type=Path, help="model bundle (default: the one the index was built with)")
    parser.add_argument("--host", default=None, help="listen address (default 127.0.0.1, $VITRINE_HOST)")
    parser.add_argument("--port", type=port, default=None, help="listen port (default 8000, $VITRINE_PORT)")
    parser.add_argument("--redis-url", default=None, help="Redis for the query cache and shared product store ($REDIS_URL)")
    parser.add_argument("--threads", type=positive_int, default=None, help="onnxruntime intra-op threads per session (default 1, $VITRINE_THREADS)")
    parser.add_argument("--backend", choices=("faiss", "qdrant"), default=None,
                        help="vector engine: faiss (in process, default) or qdrant (embedded in <index>/qdrant, "
                             "or a server with --qdrant-url) ($VITRINE_BACKEND)")  # fmt: skip
    parser.add_argument("--qdrant-url", default=None, help="Qdrant server or cluster, http://host:6333 ($VITRINE_QDRANT_URL)")
    parser.add_argument("--qdrant-path", type=Path, default=None, help="embedded Qdrant folder (default <index>/qdrant, $VITRINE_QDRANT_PATH)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(func=serve)
    # The search layer also scores its pipeline on judged queries: `vitrine eval --qrels` (search.qrels).
    from search.qrels import extend_eval

    extend_eval(subparsers)


def serve(args: argparse.Namespace) -> int:
    overrides = {
        name: value
        for name, value in vars(args).items()
        if name in ("index", "bundle", "redis_url", "threads", "host", "port", "backend", "qdrant_url", "qdrant_path")
        and value is not None
    }
    return run_server(overrides, log_level=args.log_level)


def run_server(overrides: dict, *, log_level: str = "info") -> int:
    """Open index and bundle, then serve until interrupted (also used by `vitrine demo`)."""
    import uvicorn

    from search.service.app import create_app, open_encoder, open_index
    from search.service.connections import server_options
    from search.service.engine import open_reranker
    from search.service.settings import Settings
    from vitrine.errors import UserError

    try:
        settings = Settings(**overrides)
    except ValueError as exc:  # pydantic's ValidationError: a bad VITRINE_* variable
        raise UserError(f"invalid settings: {exc}") from exc
    # Open index, bundle and reranker before binding, so a wrong path or a reranker that does not
    # fit the index is one clear error, not a failed start-up.
    index = open_index(settings)
    encoder = open_encoder(settings, index)
    reranker = open_reranker(settings, index, encoder)
    app = create_app(settings, index=index, encoder=encoder, reranker=reranker, owns_index=True)
    print(f"Vitrine is serving {len(index):,} products at http://{settings.host}:{settings.port}/ (API docs at /docs)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, access_log=False, server_header=False,
                **server_options(settings))  # fmt: skip
    return 0
