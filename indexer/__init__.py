"""The indexer: catalog -> embeddings -> Faiss indexes + product store, and `ProductIndex` to search them
(or `QdrantIndex`, the same versions searched by Qdrant).

    from indexer import ProductIndex, build_index
    index = ProductIndex.open("indexes/fashion")
    hits = index.search(query_emb, k=10, filters={"gender": "women"})

Names load on first use so `vitrine --help` does not pay for faiss. Never imports torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from vitrine.lazy import lazy_exports

_EXPORTS = {
    "Hit": "indexer.product_index",
    "ProductIndex": "indexer.product_index",
    "ProductRecord": "indexer.store",
    "ProductStore": "indexer.store",
    "SqliteProductStore": "indexer.store",
    "FilterError": "indexer.filters",
    "UnknownFilterError": "indexer.filters",
    "IndexBuildResult": "indexer.build",
    "build_index": "indexer.build",
    "upsert_index": "indexer.build",
    "delete_from_index": "indexer.build",
    "update_index": "indexer.build",
    "IndexLayout": "indexer.layout",
    "IndexManifest": "indexer.manifest",
    "QdrantEngine": "indexer.qdrant_index",
    "QdrantIndex": "indexer.qdrant_index",
    "ProductError": "indexer.manifest",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from indexer.build import IndexBuildResult, build_index, delete_from_index, update_index, upsert_index
    from indexer.filters import FilterError, UnknownFilterError
    from indexer.layout import IndexLayout
    from indexer.manifest import IndexManifest, ProductError
    from indexer.product_index import Hit, ProductIndex
    from indexer.qdrant_index import QdrantEngine, QdrantIndex
    from indexer.store import ProductRecord, ProductStore, SqliteProductStore


__getattr__ = lazy_exports(__name__, _EXPORTS)
