"""The typed seams between layers: what the evaluation harness, the indexer and the service need
from an encoder, a search index and a reranker.

Implementations: `vitrine.runtime.BundleEncoder` (an ONNX model bundle), `indexer.ProductIndex`
(Faiss + product store) and `vitrine.runtime.reranker.Reranker` (the bundle's cross-encoder);
tests give small numpy stand-ins that satisfy the same protocols.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from vitrine.catalog.record import ProductRecord
from vitrine.scoring import Alphas, Hit, QueryKind

if TYPE_CHECKING:
    from vitrine.runtime.preprocess import PatchSpec
    from vitrine.runtime.reranker import RerankerSpec


@runtime_checkable
class Encoder(Protocol):
    """Maps texts and images into one L2-normalised embedding space (what evaluation needs)."""

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """float32 (len(texts), d), rows of unit length."""
        ...

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """float32 (len(images), d), rows of unit length."""
        ...

    def describe(self) -> str:
        """One line for reports and logs."""
        ...


@runtime_checkable
class ServingEncoder(Encoder, Protocol):
    """An Encoder the indexer builds with and the service serves: knows its dimension, identity, α
    and patch features. A model bundle is one; tests use numpy stand-ins."""

    @property
    def embed_dim(self) -> int: ...

    @property
    def fingerprint(self) -> str:
        """Identifies the model: an index records it, the service refuses a bundle that differs."""
        ...

    @property
    def embeds_like(self) -> str | None:
        """The fingerprint of another model whose embedding space this one shares (an int8 copy of a
        bundle names its float original), so an index built with either serves with this one; else None."""
        ...

    @property
    def model_name(self) -> str: ...

    @property
    def path(self) -> Path | None:
        """The bundle directory (None: not a bundle on disk)."""
        ...

    @property
    def alphas(self) -> Alphas: ...

    @property
    def patch_spec(self) -> PatchSpec | None:
        """The image patch features `encode_images_with_patches` gives, or None when it gives none."""
        ...

    @property
    def reranker_spec(self) -> RerankerSpec | None:
        """The cross-encoder reranker the bundle carries, or None."""
        ...

    def encode_images_with_patches(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """(float32 (n, D) unit rows, float32 (n, P, C) patch features)."""
        ...


@runtime_checkable
class Reranker(Protocol):
    """Rescores a query's first-stage candidates from (query, title, image patches), and for an aligned
    reranker (spec.aligned_dim > 0) the rows' dual-encoder embeddings (`rerank_inputs.aligned_rows`)."""

    @property
    def spec(self) -> RerankerSpec: ...

    @property
    def layers(self) -> int: ...

    def score(
        self, query: str, titles: Sequence[str], patches: np.ndarray, *, first_stage: np.ndarray | None = None,
        aligned: np.ndarray | None = None,
    ) -> np.ndarray:
        """float32 (K,) scores for K candidates; with `first_stage`, the rerank scores including its prior.
        `aligned`: [K, 3, D] (query, title, image) embeddings; a plain reranker ignores them."""
        ...


@runtime_checkable
class SearchIndex(Protocol):
    """A searchable product index: fused text+image search, product records, thumbnails, patches."""

    @property
    def index_dir(self) -> Path: ...

    @property
    def version(self) -> str:
        """Changes whenever the served content does (keys the shared Redis product store)."""
        ...

    @property
    def manifest(self) -> dict[str, Any]: ...

    @property
    def embed_dim(self) -> int: ...

    @property
    def alphas(self) -> Alphas: ...

    @property
    def bundle_fingerprint(self) -> str: ...

    @property
    def bundle_path(self) -> str | None: ...

    @property
    def patch_spec(self) -> PatchSpec | None: ...

    def __len__(self) -> int: ...

    def ids(self) -> list[str]: ...

    def filter_fields(self) -> dict[str, list[str]]: ...

    def get(self, id: str) -> ProductRecord | None: ...

    def get_many(self, ids: Sequence[str]) -> list[ProductRecord | None]: ...

    def open_image(self, id: str) -> Image.Image: ...

    def patches(self, ids: Sequence[str]) -> np.ndarray: ...

    def search(
        self,
        query_emb: np.ndarray,
        *,
        k: int,
        kind: QueryKind = "text",
        alpha: float | None = None,
        filters: Mapping[str, str | list[str]] | None = None,
        fetch_k: int | None = None,
        include_predicted: bool = False,
    ) -> list[Hit]:
        """Top-k by fused score; `fetch_k`: candidates taken from each vector index (None: max(100, 10k));
        `include_predicted`: filters also match backfilled attribute values."""
        ...

    def lexical_search(
        self,
        query: str,
        *,
        k: int,
        filters: Mapping[str, str | list[str]] | None = None,
        include_predicted: bool = False,
    ) -> Sequence[ScoredId]:
        """Top-k by BM25 over titles and attribute values, with the same filters as `search`."""
        ...

    def score_ids(
        self, query_emb: np.ndarray, ids: Sequence[str], *, kind: QueryKind = "text", alpha: float | None = None
    ) -> list[Hit]:
        """The fused score and its parts of each of `ids`, in that order, exactly as `search` scores them."""
        ...


class ScoredId(Protocol):
    """A product id with a score (BM25's, from `SearchIndex.lexical_search`)."""

    @property
    def id(self) -> str: ...

    @property
    def score(self) -> float: ...


@runtime_checkable
class StoredVectors(Protocol):
    """An index that returns its products' stored (title, image) vectors: "more like this" needs it."""

    def vectors(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...
