"""The vector engine behind the served `SearchIndex`: Faiss in process (default) or Qdrant.

    VITRINE_BACKEND=qdrant                               embedded Qdrant in <index>/qdrant (or VITRINE_QDRANT_PATH)
    VITRINE_BACKEND=qdrant VITRINE_QDRANT_URL=http://qdrant:6333   a Qdrant server or cluster

Both serve the same index versions with the same results (docs/ARCHITECTURE.md, "Vector engines").
The embedded engine loads a version's collection itself the first time it opens it; a server's
collections are loaded by `vitrine index --qdrant-url` (replicas only check them), so several
replicas never race to build one.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from search.service.settings import Settings
from vitrine.errors import UserError
from vitrine.protocols import SearchIndex

if TYPE_CHECKING:
    from indexer.qdrant_index import QdrantEngine

EMBEDDED_DIR = "qdrant"  # the embedded engine's folder inside the index, unless VITRINE_QDRANT_PATH says otherwise


def embedded_path(settings: Settings) -> Path:
    if settings.qdrant_path is not None:
        return settings.qdrant_path
    if settings.index is None:
        raise UserError("no index to serve: pass --index or set VITRINE_INDEX")
    return Path(settings.index) / EMBEDDED_DIR


def open_qdrant_engine(settings: Settings) -> QdrantEngine:
    """The Qdrant client the settings name: a server/cluster URL, else the embedded engine's folder.
    It closes when the last index version opened on it is closed."""
    from indexer.qdrant_index import QdrantEngine

    if settings.qdrant_url:
        api_key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key is not None else None
        return QdrantEngine.connect(settings.qdrant_url, api_key=api_key, prefix=settings.qdrant_collection,
                                    close_when_unused=True)  # fmt: skip
    return QdrantEngine.embedded(embedded_path(settings), prefix=settings.qdrant_collection, close_when_unused=True)


def open_backend_index(settings: Settings) -> SearchIndex:
    """The live version of settings.index, searched by settings.backend."""
    if settings.index is None:
        raise UserError("no index to serve: pass --index or set VITRINE_INDEX")
    if settings.backend == "qdrant":
        from indexer.qdrant_index import QdrantIndex

        engine = open_qdrant_engine(settings)
        try:
            return QdrantIndex.open(settings.index, engine=engine)
        except BaseException:
            engine.close()
            raise
    from indexer.product_index import ProductIndex

    return ProductIndex.open(settings.index)
