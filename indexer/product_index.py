"""Searching an index: fused title + image scoring over both Faiss indexes (FashionKLIP §5).

A product is its title and its photo, so a query scores against both:

    score = α·sim(q, title) + (1−α)·sim(q, image)

`search` takes the top `fetch_k` labels from the title index and from the image index,
unions them, computes both similarities of every candidate exactly from the stored
vectors (a product found by one index still gets its true similarity to the other
modality, never zero), fuses, and sorts by score, ties broken by id. The fill-in is float32
numpy over the vectors in memory (`indexer.fused_scan.exact_top_k`).

Exact (flat) indexes answer unfiltered queries at the index's own α without the two scans:
one pass over int8 codes of the blended vectors α·title + (1−α)·image, re-scored exactly and
refetched while its error bound leaves any doubt, gives the exact fused top-k
(`indexer.fused_scan.FusedScan`), which the union approximates. An explicit `fetch_k` or
another α keeps the union semantics.

Filtered searches (`indexer.candidates.filtered_plan`): small filtered sets are scored exactly in
numpy; exact (flat) indexes search only the matching labels through a Faiss IDSelector (no recall
lost); approximate indexes over-fetch from about fetch_k / selectivity, doubling until `fetch_k`
matching candidates survive per index, or score the filtered set exactly when that would take more
than `overfetch_max` results per index (or everything was fetched). A broad filter on IVF-PQ can
still miss a few of its top k in unprobed lists (docs/RESULTS.md, scale at 1M).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from indexer import faiss_index, storage
from indexer.candidates import (
    MIN_FETCH_K,
    OVERFETCH_MAX,
    check_counts,
    check_query,
    default_fetch_k,
    fetch_size,
    filtered_plan,
    rows_of_ids,
    scored_hits,
)
from indexer.filters import FilterColumns, FilterError, UnknownFilterError
from indexer.fused_scan import FusedScan, exact_top_k, first_fetch, row_dots
from indexer.layout import IndexLayout, VersionLease
from indexer.lexical import LexicalSearch
from indexer.manifest import IndexManifest, IndexVersionFacts, read_manifest
from indexer.store import ProductRecord, ProductStore, SqliteProductStore
from vitrine.errors import UserError
from vitrine.images import open_image_ref
from vitrine.scoring import Hit, QueryKind
from vitrine.timing import stage

__all__ = ["MIN_FETCH_K", "FilterError", "Hit", "ProductIndex", "ProductRecord", "ProductStore", "UnknownFilterError",
           "default_fetch_k"]  # fmt: skip



class ProductIndex(LexicalSearch, IndexVersionFacts):
    """One version of an index directory, opened for search. Thread-safe for concurrent searches."""

    # Filtered sets up to this many products are scored exactly (numpy) instead of through Faiss.
    brute_force_max_rows: int = 4096
    # Approximate indexes score a filtered set exactly when over-fetching would need more than this
    # many results per index (`indexer.candidates.filtered_plan`).
    overfetch_max: int = OVERFETCH_MAX
    # Exact indexes up to this many products answer unfiltered queries at the index's own α with one
    # scan of blended vectors (indexer.fused_scan), holding one (n, D) matrix of codes per such α.
    fused_scan_max_rows: int = faiss_index.AUTO_FLAT_MAX
    # "int8": the fused scan reads n·D bytes per α (exact answers by its error bound); "float32": 4·n·D.
    fused_scan_codec: str = "int8"

    def __init__(
        self,
        *,
        index_dir: Path,
        version_dir: Path,
        manifest: IndexManifest,
        store: SqliteProductStore,
        labels: np.ndarray,
        text_vectors: np.ndarray,
        image_vectors: np.ndarray,
        text_index: Any,
        image_index: Any,
        patches: np.ndarray | None = None,
        lease: VersionLease | None = None,
    ) -> None:
        n = labels.shape[0]
        d = manifest.embed_dim
        if text_vectors.shape != (n, d) or image_vectors.shape != (n, d):
            raise UserError(f"index version {version_dir} is inconsistent: vectors {text_vectors.shape}/{image_vectors.shape}, {n} labels, dim {d}")
        if (patches is None) != (manifest.patches is None):
            raise UserError(f"index version {version_dir} is inconsistent: the manifest's patch spec and the stored patches disagree")
        if patches is not None and patches.shape != (n, *manifest.patches.shape):
            raise UserError(f"index version {version_dir} is inconsistent: patches {patches.shape}, expected {(n, *manifest.patches.shape)}")
        if text_index.ntotal != n or image_index.ntotal != n:
            raise UserError(f"index version {version_dir} is inconsistent: Faiss indexes hold {text_index.ntotal}/{image_index.ntotal} vectors, {n} stored")
        scanned = list(store.scan())
        if len(scanned) != n or any(int(label) != stored for label, (stored, _) in zip(labels, scanned)):
            raise UserError(f"index version {version_dir} is inconsistent: the product store and labels.npy disagree")
        self.index_dir = index_dir
        self.version_dir = version_dir
        self._lease = lease
        self._manifest = manifest
        self.manifest: dict[str, Any] = manifest.model_dump(mode="json")
        self._store = store
        self._labels = labels
        self._text = text_vectors
        self._image = image_vectors
        self._text_index = text_index
        self._image_index = image_index
        self._patches = patches
        self._spec = faiss_index.IndexSpec.from_dict(manifest.index)
        self._ids = np.array([record.id for _, record in scanned], dtype=str) if n else np.zeros(0, dtype="<U1")
        self._columns = FilterColumns.from_records(record for _, record in scanned)
        alphas = self.alphas
        self._fused = FusedScan(text_vectors, image_vectors, {alphas.alpha, alphas.for_kind("text"), alphas.for_kind("image")},
                                codec=self.fused_scan_codec)  # fmt: skip
        # Filters with include_predicted read backfilled values where the catalog has none.
        has_predicted = any(record.predicted for _, record in scanned)
        self._columns_with_predicted = (
            FilterColumns.from_records((record for _, record in scanned), include_predicted=True) if has_predicted else self._columns
        )

    @classmethod
    def open(cls, index_dir: str | Path, *, mmap: bool = True, version: str | None = None) -> ProductIndex:
        """Open the live version of `index_dir` (or a bare version folder), or its version named `version`.

        CURRENT is read once, so the whole object comes from one version even while a
        build switches to another. The version is leased until `close()` (or the process
        exits): pruning keeps it however many builds follow. `mmap` maps the stored vectors
        instead of reading them (a flat index of format 2 holds them in its own memory); patch
        features, when stored, are always mapped (compact ones are decoded row by row).
        """
        layout = IndexLayout(index_dir)
        folder, lease = layout.open_version(version)
        try:
            manifest = read_manifest(folder)
            paths = {name: folder / file for name, file in manifest.files.items()}
            missing = [str(p.name) for p in paths.values() if not p.is_file()]
            if missing:
                raise UserError(f"index version {folder} is incomplete: {', '.join(missing)} missing")
            labels = np.load(paths["labels"])
            # format 2 stores a flat index's vectors once: the index is built here, its memory serves the vectors
            text, image, text_index, image_index = storage.open_search_arrays(folder, manifest, labels, mmap=mmap)
            return cls(
                index_dir=layout.root,
                version_dir=folder,
                manifest=manifest,
                store=SqliteProductStore(paths["store"]),
                labels=labels,
                text_vectors=text,
                image_vectors=image,
                text_index=text_index,
                image_index=image_index,
                patches=storage.open_patches(folder, manifest),
                lease=lease,
            )
        except BaseException:
            lease.release()
            raise

    @staticmethod
    def live_version(index_dir: str | Path) -> Path:
        """The version folder `open` would read now (cheap: compare it to decide when to reopen)."""
        return IndexLayout(index_dir).resolve()

    def close(self) -> None:
        """Close the store and release the lease: from now on pruning may delete this version."""
        self._store.close()
        if self._lease is not None:
            self._lease.release()

    def __enter__(self) -> ProductIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ facts






    @property
    def index_type(self) -> str:
        return self._spec.type


    @property
    def store(self) -> SqliteProductStore:
        return self._store

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def __contains__(self, id: object) -> bool:
        return id in self._store

    def ids(self) -> list[str]:
        """Every product id, in label (insertion) order."""
        return self._ids.tolist()

    def vectors(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(title, image) float32 (len(ids), D) stored vectors; KeyError for an unknown id."""
        rows = self._rows_of_ids(ids)
        return np.asarray(self._text[rows]), np.asarray(self._image[rows])

    def patches(self, ids: Sequence[str]) -> np.ndarray:
        """float32 (len(ids), P, C) stored patch features; UserError for an unknown id or an index without them."""
        if self._patches is None:
            raise UserError(
                f"index {self.index_dir} stores no patch features: rebuild it with a bundle exported with patches"
            )
        if isinstance(ids, str):
            raise UserError("patches expects a list of product ids, got a single string")
        try:
            rows = self._rows_of_ids(ids)
        except KeyError as exc:
            raise UserError(f"product {exc.args[0]!r} is not in the index {self.index_dir}") from None
        return np.asarray(self._patches[rows], dtype=np.float32)

    def filter_fields(self) -> dict[str, list[str]]:
        """Filterable field -> its known values."""
        return self._columns.fields()

    def filter_mask(self, filters: Mapping[str, str | list[str]], *, include_predicted: bool = False) -> np.ndarray:
        """Boolean (n,) in label order (as `ids()`): the products a search with these filters may return."""
        return (self._columns_with_predicted if include_predicted else self._columns).mask(filters)

    def get(self, id: str) -> ProductRecord | None:
        return self._store.get(id)

    def get_many(self, ids: Sequence[str]) -> list[ProductRecord | None]:
        return self._store.get_many(ids)

    def open_image(self, id: str) -> Image.Image:
        """The product's image, decoded (for thumbnails); KeyError for an unknown id."""
        ref = self._store.image_ref(id)
        if ref is None:
            raise KeyError(id)
        return open_image_ref(ref, id)

    # ------------------------------------------------------------ search

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
        """Top-k products for one query embedding (D,), by fused score; see the module docstring.

        `alpha` None: the bundle's α for this query `kind`. `include_predicted`: filters also match
        backfilled attribute values where the catalog has none."""
        query = check_query(query_emb, self.embed_dim)
        check_counts(k, fetch_k)
        alpha = self.alphas.resolve(kind, alpha)
        mask = self.filter_mask(filters, include_predicted=include_predicted) if filters else None  # validates fields even on an empty index
        n = len(self)
        if n == 0:
            return []
        fetch = fetch_size(n, k, fetch_k)
        # An explicit fetch_k below MIN_FETCH_K asks for the union of two short lists (the backends'
        # parity tests); any deeper request gets the exact fused top-k from one scan.
        deep = fetch_k is None or fetch_k >= MIN_FETCH_K
        if mask is None and deep and self._spec.exact and n <= self.fused_scan_max_rows and self._fused.supports(alpha):
            return self._fused.search(query, self._ids, int(k), min(n, first_fetch(k)), alpha)
        with stage("scan"):
            if mask is None:
                rows = self._candidates(query, fetch)
            else:
                allowed = np.flatnonzero(mask)
                if allowed.size == 0:
                    return []
                plan, first = filtered_plan(n, int(allowed.size), fetch, exact_index=self._spec.exact,
                                            brute_force_max_rows=self.brute_force_max_rows,
                                            overfetch_max=self.overfetch_max)  # fmt: skip
                if plan == "exact":
                    rows = allowed
                elif plan == "selector":
                    rows = self._candidates(query, fetch, allowed_labels=self._labels[allowed])
                else:
                    rows = self._overfetch(query, fetch, mask, allowed, first)
        with stage("fill_in"):
            return exact_top_k(self._text, self._image, self._ids, rows, query, int(k), alpha)

    def score_ids(self, query_emb: np.ndarray, ids: Sequence[str], *, kind: QueryKind = "text",
                  alpha: float | None = None) -> list[Hit]:  # fmt: skip
        """The fused score and its parts of each of `ids` (in that order), exactly as `search` scores
        them: for hybrid search, whose lexical candidates the vector search may not have fetched."""
        query = check_query(query_emb, self.embed_dim)
        alpha = self.alphas.resolve(kind, alpha)
        if not len(ids):
            return []
        rows = self._rows_of_ids(ids)
        return scored_hits(list(ids), row_dots(self._text, rows, query), row_dots(self._image, rows, query), alpha)

    def _rows(self, labels: np.ndarray) -> np.ndarray:
        rows = np.searchsorted(self._labels, labels)
        assert (rows < self._labels.size).all() and (self._labels[rows] == labels).all(), "Faiss returned a label the store does not hold"
        return rows

    def _rows_of_ids(self, ids: Sequence[str]) -> np.ndarray:
        return rows_of_ids(self._store, self._labels, ids)

    def _candidates(self, query: np.ndarray, fetch: int, allowed_labels: np.ndarray | None = None) -> np.ndarray:
        """Rows of the union of the top-`fetch` of the title index and of the image index."""
        found = [
            faiss_index.search(self._spec, index, query, fetch, allowed_labels=allowed_labels)
            for index in (self._text_index, self._image_index)
        ]
        return self._rows(np.union1d(*found))

    def _overfetch(self, query: np.ndarray, fetch: int, mask: np.ndarray, allowed: np.ndarray, first: int) -> np.ndarray:
        """Approximate index + filter: fetch `first` (about fetch / selectivity), doubling until `fetch`
        matches survive per index.

        With IVF the probed lists can hold too few matches for a selective filter, and the loop ends
        in an exact scan of the filtered set: correct, but O(filtered set). Probing more lists instead
        was measured and rejected: recall@10 0.69 against 0.996 (docs/RESULTS.md, “Index memory and speed at scale”).
        """
        n = len(self)
        wanted = min(fetch, allowed.size)
        f = first
        while f < n:
            per_index = []
            for index in (self._text_index, self._image_index):
                rows = self._rows(faiss_index.search(self._spec, index, query, f))  # best first
                per_index.append(rows[mask[rows]][:wanted])
            if all(r.size >= wanted for r in per_index):
                return np.union1d(*per_index)
            f = min(n, 2 * f)
        return allowed  # everything would be fetched: score the filtered set exactly
