"""The fast paths of `ProductIndex.search`: one scan of blended vectors, and the exact fill-in in memory.

`exact_top_k` is the exact fill-in: for the candidate rows (the union of both indexes' candidates,
or a filtered set) it gathers the title and image vectors once, takes one row-wise product with the
query per modality (float32), fuses, and sorts by score then id. Every row is reduced the same way,
so identical vectors get identical scores and ties fall to the id; the scores are within 1e-6 of a
float64 computation (tests/indexer/test_fused_scan.py).

`FusedScan` avoids the double work of scanning the title index and the image index separately and
then filling in both similarities: for an exact (flat) index, the fused score of every product is
the inner product of the query with one blended vector α·title + (1−α)·image
(`vitrine.scoring.blend_product_vectors`). One single-threaded Faiss pass over the blended matrix
finds the top `fetch` products by fused score, and `exact_top_k` re-scores them from the stored
vectors. That answer is the exact fused top-k over the whole catalog, which the union of two top-`fetch`
lists only approximates. A blended matrix is kept per α of the index (α 0 and 1 need none), built on first use.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable

import faiss
import numpy as np

from indexer.faiss_index import single_threaded
from indexer.candidates import exact_similarities, rank_union
from vitrine.scoring import Hit, blend_product_vectors

ROW_CHUNK = 8192  # rows gathered at a time: a large filtered set never copies all its vectors at once


def row_dots(vectors: np.ndarray, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """float32 (len(rows),) inner products of the stored `vectors[rows]` with `query`: one gather (a
    contiguous copy of just these rows; mmap: from the page cache) and one reduction per block of rows."""
    out = np.empty(rows.size, dtype=np.float32)
    for start in range(0, rows.size, ROW_CHUNK):
        block = rows[start : start + ROW_CHUNK]
        out[start : start + block.size] = exact_similarities(vectors[block], query)
    return out


def exact_top_k(
    text_vectors: np.ndarray,
    image_vectors: np.ndarray,
    ids: np.ndarray,
    rows: np.ndarray,
    query: np.ndarray,
    k: int,
    alpha: float,
) -> list[Hit]:
    """Top-k of `rows` by α·sim(query, title) + (1−α)·sim(query, image), ties by id."""
    rows = np.unique(rows)
    return rank_union(ids[rows], row_dots(text_vectors, rows, query), row_dots(image_vectors, rows, query), alpha, k)


class FusedScan:
    """Top products by fused score in one pass over a blended matrix; see the module docstring.

    Only the α values given here are scanned this way (the index's own, per query kind): a request
    with any other α takes the two-index path, so no request can make the index build new matrices."""

    def __init__(self, text_vectors: np.ndarray, image_vectors: np.ndarray, alphas: Iterable[float]) -> None:
        assert text_vectors.shape == image_vectors.shape, (text_vectors.shape, image_vectors.shape)
        self._text = text_vectors
        self._image = image_vectors
        self.alphas = frozenset(float(a) for a in alphas)
        self._blended: dict[float, np.ndarray] = {}
        self._lock = threading.Lock()

    def supports(self, alpha: float) -> bool:
        return float(alpha) in self.alphas

    def matrix(self, alpha: float) -> np.ndarray:
        """(n, D) float32 C-contiguous rows whose inner product with a query is its fused score."""
        alpha = float(alpha)
        assert alpha in self.alphas, (alpha, self.alphas)
        found = self._blended.get(alpha)
        if found is not None:
            return found
        with self._lock:  # built once (tens of ms for 20k products), even when first asked by many requests
            if alpha not in self._blended:
                if alpha in (0.0, 1.0):  # the stored vectors themselves, no copy
                    source = self._text if alpha == 1.0 else self._image
                    blended = np.ascontiguousarray(source, dtype=np.float32)
                else:
                    blended = np.ascontiguousarray(blend_product_vectors(np.asarray(self._text), np.asarray(self._image), alpha))
                self._blended[alpha] = blended
            return self._blended[alpha]

    def top_rows(self, query: np.ndarray, fetch: int, alpha: float) -> np.ndarray:
        """Rows of the `fetch` best products by fused score (a float32 scan: re-score them with `exact_top_k`)."""
        blended = self.matrix(alpha)
        fetch = min(int(fetch), blended.shape[0])
        with single_threaded():
            _, rows = faiss.knn(query[None, :], blended, fetch, metric=faiss.METRIC_INNER_PRODUCT)
        rows = rows[0]
        return rows[rows >= 0]
