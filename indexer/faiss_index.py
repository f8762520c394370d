"""Faiss indexes by factory string: choosing one, building it, changing it in place, searching it.

Every index maps int64 labels (the store's stable product labels) to vectors and
scores by inner product (the vectors are L2-normalised, so it is cosine similarity).

Id handling is where Faiss hurts (faiss #3339, #4656), so it is explicit here:

* Non-IVF indexes are wrapped in `IndexIDMap2` ("IDMap2,<spec>"): labels are ours.
* IVF indexes take labels natively (`add_with_ids`) and never go inside an IDMap:
  `IndexIDMap.remove_ids` assumes the inner index compacts its sequential ids in
  order, which IVF does not.
* `remove_ids` is used only where it is known to be right: IDMap over flat-code
  storage (Flat, PQ, SQ...) and native IVF. Everything else (HNSW cannot remove)
  is rebuilt from the stored vectors: `removal == "rebuild"`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from vitrine.errors import UserError

INDEX_TYPES = ("flat", "hnsw", "ivfpq", "auto")
AUTO_FLAT_MAX = 100_000  # exact search is fast enough below this many products
AUTO_HNSW_MAX = 2_000_000  # past this, HNSW's memory (vectors + graph) gets heavy: IVF-PQ
IVFPQ_MIN_PRODUCTS = 1_000  # PQ trains 256 centroids per sub-quantizer
HNSW_M = 32
DEFAULT_EF_SEARCH = 64
DEFAULT_NPROBE = 16
# ivfpq probes >= 1/40 of its lists: the probed share, not nprobe, keeps recall as nlist grows with the
# catalog (bench/scale.py at 100k: nprobe 16 of 1,264 -> recall@10 0.978, 32 -> 0.995; at 1M nprobe 16 of 4,000 -> 0.936)
IVFPQ_PROBED_SHARE = 40
REMOVE_IDS = "remove_ids"
REBUILD = "rebuild"


@dataclass(frozen=True)
class IndexSpec:
    """How to build one Faiss index: a factory string plus how labels are removed and search knobs."""

    type: str  # flat | hnsw | ivfpq | custom
    factory: str  # what faiss.index_factory gets (IDMap2 included when needed)
    removal: str = REMOVE_IDS  # remove_ids | rebuild
    exact: bool = False  # exhaustive inner product: IDSelector filtering loses nothing
    search: dict[str, int] = field(default_factory=dict)  # efSearch / nprobe
    reason: str = ""  # why `--index-type auto` picked this type (empty otherwise)

    def to_dict(self) -> dict[str, Any]:
        data = {"type": self.type, "factory": self.factory, "removal": self.removal, "exact": self.exact, "search": dict(self.search)}
        return {**data, "reason": self.reason} if self.reason else data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        return cls(data["type"], data["factory"], data["removal"], bool(data.get("exact", False)), dict(data.get("search", {})),
                   str(data.get("reason", "")))  # fmt: skip


def _pq_subquantizers(dim: int) -> int:
    """The most sub-quantizers (<= 64, each of >= 4 dims) that divide `dim`: ~dim/4 bytes per vector."""
    for m in range(min(64, dim // 4), 0, -1):
        if dim % m == 0:
            return m
    return 1


def auto_type(num_products: int) -> str:
    return auto_choice(num_products)[0]


def auto_choice(num_products: int) -> tuple[str, str]:
    """(index type, why) for a catalog of `num_products`; the figures are bench/scale.py's (docs/RESULTS.md, “Index memory and speed at scale”)."""
    if num_products <= AUTO_FLAT_MAX:
        return "flat", (
            f"auto: flat for {num_products:,} <= {AUTO_FLAT_MAX:,} products: exact, filters cost no recall, "
            "and a query scans 100k vectors in ~26 ms on one core"
        )
    if num_products <= AUTO_HNSW_MAX:
        return "hnsw", (
            f"auto: hnsw for {num_products:,} products (> {AUTO_FLAT_MAX:,}, <= {AUTO_HNSW_MAX:,}): a flat scan grows "
            f"linearly (~0.26 ms per 1k vectors); HNSW{HNSW_M} answers in ~1 ms at recall@10 0.999 after exact "
            "re-scoring, for 1,304 B a vector"
        )
    return "ivfpq", (
        f"auto: ivfpq for {num_products:,} > {AUTO_HNSW_MAX:,} products: two HNSW indexes (2 x 1,304 B a vector) "
        f"outgrow one machine's memory and take hours to build; PQ codes take ~{_pq_subquantizers(256) + 8} B a "
        "vector, and probing 1/40 of the lists then re-scoring the top 100 exactly gives recall@10 ~0.99"
    )


def resolve_spec(index_type: str, num_products: int, dim: int) -> IndexSpec:
    """flat | hnsw | ivfpq | auto (by size) | any Faiss factory string -> IndexSpec."""
    if not index_type or not index_type.strip():
        raise UserError("index type must not be empty")
    index_type = index_type.strip()
    if index_type == "auto":
        index_type, reason = auto_choice(num_products)
        return dataclasses.replace(resolve_spec(index_type, num_products, dim), reason=reason)
    if index_type == "flat":
        return IndexSpec("flat", "IDMap2,Flat", REMOVE_IDS, exact=True)
    if index_type == "hnsw":
        return IndexSpec("hnsw", f"IDMap2,HNSW{HNSW_M},Flat", REBUILD, search={"efSearch": DEFAULT_EF_SEARCH})
    if index_type == "ivfpq":
        if num_products < IVFPQ_MIN_PRODUCTS:
            raise UserError(
                f"ivfpq needs at least {IVFPQ_MIN_PRODUCTS:,} products to train, this catalog has {num_products:,}; "
                "use --index-type flat or hnsw"
            )
        nlist = max(1, min(int(4 * math.sqrt(num_products)), num_products // 39))
        # "np": no polysemous training (slow simulated annealing for a Hamming filter search never uses)
        factory = f"IVF{nlist},PQ{_pq_subquantizers(dim)}np"
        nprobe = min(nlist, max(DEFAULT_NPROBE, nlist // IVFPQ_PROBED_SHARE))
        return IndexSpec("ivfpq", factory, REMOVE_IDS, search={"nprobe": nprobe})
    return _custom_spec(index_type, dim)


def _custom_spec(factory: str, dim: int) -> IndexSpec:
    """A user's factory string: probe what it builds to decide id handling and search knobs."""
    probe = _factory(factory, dim)
    ivf = faiss.try_extract_index_ivf(probe)
    if _is_idmap(probe):
        inner = faiss.downcast_index(probe.index)
        removal = REMOVE_IDS if _is_flat_codes(inner) else REBUILD
        spec_factory, base = factory, inner
    elif ivf is not None:
        spec_factory, base, removal = factory, probe, REMOVE_IDS
    else:
        spec_factory, base = f"IDMap2,{factory}", probe
        removal = REMOVE_IDS if _is_flat_codes(probe) else REBUILD
    search: dict[str, int] = {}
    if ivf is not None:
        search["nprobe"] = min(int(ivf.nlist), DEFAULT_NPROBE)
    if _find_hnsw(base) is not None:
        search["efSearch"] = DEFAULT_EF_SEARCH
    exact = isinstance(base, faiss.IndexFlat)
    return IndexSpec("custom", spec_factory, removal, exact=exact, search=search)


def _factory(factory: str, dim: int) -> faiss.Index:
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "rejected"
        raise UserError(
            f"invalid index type {factory!r}: not flat/hnsw/ivfpq/auto nor a Faiss factory string Faiss accepts ({first})"
        ) from None


def _is_idmap(index: faiss.Index) -> bool:
    return isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2))


def _unwrap_pretransform(index: faiss.Index) -> faiss.Index:
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


def _is_flat_codes(index: faiss.Index) -> bool:
    """Storage that compacts in order on removal, as IDMap.remove_ids requires."""
    return isinstance(_unwrap_pretransform(index), faiss.IndexFlatCodes)


def _find_hnsw(index: faiss.Index) -> faiss.IndexHNSW | None:
    index = _unwrap_pretransform(faiss.downcast_index(index))
    return index if isinstance(index, faiss.IndexHNSW) else None


def _check(vectors: np.ndarray, labels: np.ndarray, dim: int | None = None) -> None:
    assert vectors.ndim == 2 and vectors.dtype == np.float32, (vectors.shape, vectors.dtype)
    assert labels.shape == (vectors.shape[0],) and labels.dtype == np.int64, (labels.shape, labels.dtype)
    assert dim is None or vectors.shape[1] == dim, (vectors.shape, dim)


def build(spec: IndexSpec, vectors: np.ndarray, labels: np.ndarray) -> faiss.Index:
    """A new index of `spec` over (n, d) float32 `vectors`, trained if it needs to be."""
    _check(vectors, labels)
    index = _factory(spec.factory, vectors.shape[1])
    if not index.is_trained:
        if vectors.shape[0] == 0:
            raise UserError(f"cannot train a {spec.factory} index on no vectors")
        try:
            index.train(np.ascontiguousarray(vectors))
        except RuntimeError as exc:
            raise UserError(f"training the {spec.factory} index on {vectors.shape[0]:,} vectors failed: {exc}") from None
    if vectors.shape[0]:
        index.add_with_ids(np.ascontiguousarray(vectors), labels)
    return index


def update(
    spec: IndexSpec,
    index: faiss.Index,
    *,
    remove: np.ndarray,
    add_vectors: np.ndarray,
    add_labels: np.ndarray,
    all_vectors: np.ndarray,
    all_labels: np.ndarray,
) -> faiss.Index:
    """Remove labels `remove`, then add (`add_vectors`, `add_labels`); returns the changed index.

    `all_vectors`/`all_labels` are the complete contents afterwards, used to rebuild index types
    that cannot remove. Index types that can remove (or changes that only add) are updated in place.
    """
    _check(add_vectors, add_labels, index.d)
    _check(all_vectors, all_labels, index.d)
    remove = np.asarray(remove, dtype=np.int64)
    if remove.size and spec.removal == REBUILD:
        return build(spec, all_vectors, all_labels)
    if remove.size:
        removed = index.remove_ids(faiss.IDSelectorBatch(remove))
        if removed != remove.size:
            raise RuntimeError(f"Faiss removed {removed} of {remove.size} labels: the index and the store disagree")
    if add_labels.size:
        index.add_with_ids(np.ascontiguousarray(add_vectors), add_labels)
    if index.ntotal != all_labels.size:
        raise RuntimeError(f"index holds {index.ntotal} vectors after the update, expected {all_labels.size}")
    return index


def search_params(
    spec: IndexSpec, index: faiss.Index, k: int, sel: faiss.IDSelector | None = None, *, nprobe: int | None = None
) -> faiss.SearchParameters | None:
    """Per-call parameters (thread-safe, unlike setting efSearch/nprobe on the index); `nprobe` overrides the spec's."""
    ef = max(spec.search.get("efSearch", 0), k) if "efSearch" in spec.search else None
    nprobe = nprobe if nprobe is not None else spec.search.get("nprobe")
    base = faiss.downcast_index(index.index) if _is_idmap(index) else faiss.downcast_index(index)
    inner = _unwrap_pretransform(base)
    if isinstance(inner, faiss.IndexHNSW) and ef is not None:
        params: faiss.SearchParameters = faiss.SearchParametersHNSW(efSearch=ef)
    elif faiss.try_extract_index_ivf(inner) is not None and nprobe is not None:
        params = faiss.SearchParametersIVF(nprobe=nprobe)
    elif sel is None:
        return None
    else:
        params = faiss.SearchParameters()
    if base is not inner:  # IndexPreTransform reads only its index_params: a selector there would bypass IDMap
        if sel is not None:
            raise ValueError("IDSelector filtering is only used with exact (flat) indexes")
        outer = faiss.SearchParametersPreTransform(index_params=params)
        outer.referenced_params = params  # SWIG holds a raw pointer: keep the inner object alive
        return outer
    if sel is not None:
        params.sel = sel
    return params


@contextmanager
def single_threaded() -> Iterator[None]:
    """One OpenMP thread for this thread's Faiss calls, restored after.

    A single query gains nothing from OpenMP, and on a busy CPU waking the team costs
    milliseconds (measured: 0.15 ms -> 22 ms median on 2 loaded cores). The setting is
    per calling thread in libgomp, so concurrent requests and builds are unaffected.
    """
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def nlist(index: faiss.Index) -> int | None:
    """The number of inverted lists of an IVF index (inside IDMap / pre-transforms), else None."""
    base = faiss.downcast_index(index.index) if _is_idmap(index) else faiss.downcast_index(index)
    ivf = faiss.try_extract_index_ivf(_unwrap_pretransform(base))
    return None if ivf is None else int(ivf.nlist)


def search(
    spec: IndexSpec, index: faiss.Index, query: np.ndarray, k: int, *, allowed_labels: np.ndarray | None = None,
    nprobe: int | None = None,
) -> np.ndarray:
    """Labels of the top-k vectors for one (d,) query (fewer when the index has fewer); -1 never returned.

    `allowed_labels` restricts the search with an IDSelectorBatch (meant for exact indexes). An IVF
    index returns at most what its `nprobe` probed lists hold (`nprobe` overrides the spec's).
    """
    assert query.shape == (index.d,) and query.dtype == np.float32, (query.shape, query.dtype)
    k = min(k, index.ntotal)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    sel = None
    if allowed_labels is not None:
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_labels, dtype=np.int64))
    params = search_params(spec, index, k, sel, nprobe=nprobe)
    with single_threaded():
        _, labels = index.search(query[None, :], k, params=params)
    labels = labels[0]
    return labels[labels >= 0]


def write(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def read(path: Path) -> faiss.Index:
    if not path.is_file():
        raise UserError(f"index file missing: {path}")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise UserError(f"{path}: unreadable Faiss index ({str(exc).strip().splitlines()[-1]})") from None
