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
vectors. `FusedScan.search` returns the exact fused top-k over the whole catalog, which the union of
two top-`fetch` lists only approximates.

The scan reads int8 codes by default (`codec="int8"`): the blended matrix and the query are each
scaled to ±127 and rounded (Faiss `QT_8bit_direct_signed`, exact integer arithmetic), a quarter of
float32's bytes and about half its time. The scan is then approximate, but its error has a bound
(`Int8Scan.error_bound`), so no product left out of the fetched rows can score above the fetch-th
approximate score plus that bound; when the exact k-th score of the fetched rows is not above this
ceiling, the scan fetches 4× more, up to everything. The answer is therefore exact, not just likely so.
Codes (or the float32 matrix) are kept per α of the index, built on first use.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable

import faiss
import numpy as np

from indexer.candidates import exact_similarities, rank_union
from indexer.faiss_index import single_threaded
from vitrine.scoring import Hit, blend_product_vectors
from vitrine.timing import stage

ROW_CHUNK = 8192  # rows gathered at a time: a large filtered set never copies all its vectors at once
SCAN_CODECS = ("int8", "float32")
# Slack for float rounding between a scan's score and the fill-in's (float32 dots fused in float64).
SCORE_SLACK = 1e-4
REFETCH_FACTOR = 4
# The first scan fetches 3k rows (at least 30): the exact answer never depends on it (an uncertain scan
# fetches more), only the time does; 30 rows were enough for 97 % of 600 test titles at k 10, and the
# fill-in of 30 rows costs a third of 100's.
FIRST_FETCH_PER_RESULT = 3
FIRST_FETCH_MIN = 30


def first_fetch(k: int) -> int:
    return max(FIRST_FETCH_PER_RESULT * int(k), FIRST_FETCH_MIN)


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


class Int8Scan:
    """Symmetric int8 inner-product scan of a (n, D) float matrix, with a bound on its error.

    Rows are stored as c = rint(s·b) with s = 127 / max|b|, a query as rint(t·q) with t = 127 / max|q|;
    the approximate score (rint(t·q)·c) / (s·t) differs from q·b by at most
    0.5/t·max‖b‖₁ + ‖rint(t·q)‖₁/t·0.5/s. Integer products of 256-d codes stay below 2^24: exact in float32."""

    def __init__(self, matrix: np.ndarray) -> None:
        assert matrix.ndim == 2 and matrix.shape[1] >= 1, matrix.shape
        # Block by block (the peak and the largest row L1 norm, then the codes): temporaries stay one block.
        blocks = [slice(start, start + ROW_CHUNK) for start in range(0, matrix.shape[0], ROW_CHUNK)]
        peak, self.row_l1_max = 0.0, 0.0
        for block in blocks:
            magnitudes = np.abs(np.asarray(matrix[block], dtype=np.float32))
            peak = max(peak, float(magnitudes.max()))
            self.row_l1_max = max(self.row_l1_max, float(magnitudes.sum(axis=1).max()))
        self.scale = 127.0 / peak if peak > 0 else 1.0
        self.index = faiss.IndexScalarQuantizer(matrix.shape[1], faiss.ScalarQuantizer.QT_8bit_direct_signed,
                                                faiss.METRIC_INNER_PRODUCT)  # fmt: skip
        self.index.train(np.zeros((1, matrix.shape[1]), dtype=np.float32))  # direct codes: nothing to learn
        for block in blocks:
            self.index.add(np.rint(np.asarray(matrix[block], dtype=np.float32) * self.scale))

    def error_bound(self, query_codes: np.ndarray, query_scale: float) -> float:
        return 0.5 / query_scale * self.row_l1_max + float(np.abs(query_codes).sum()) / query_scale * 0.5 / self.scale

    def search(self, query: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(rows best first, their approximate scores, the error bound of any row's score)."""
        peak = float(np.abs(query).max())
        if peak == 0.0:  # every product scores 0: no order to find, and no bound is needed to say so
            rows = np.arange(min(fetch, self.index.ntotal))
            return rows, np.zeros(rows.size, dtype=np.float32), 0.0
        query_scale = 127.0 / peak
        codes = np.rint(query * query_scale).astype(np.float32)
        with single_threaded():
            scores, rows = self.index.search(codes[None, :], fetch)
        keep = rows[0] >= 0
        return rows[0][keep], scores[0][keep] / (self.scale * query_scale), self.error_bound(codes, query_scale)


class FusedScan:
    """Top products by fused score in one pass over a blended matrix; see the module docstring.

    Only the α values given here are scanned this way (the index's own, per query kind): a request
    with any other α takes the two-index path, so no request can make the index build new matrices."""

    def __init__(
        self, text_vectors: np.ndarray, image_vectors: np.ndarray, alphas: Iterable[float], *, codec: str = "int8"
    ) -> None:
        assert text_vectors.shape == image_vectors.shape, (text_vectors.shape, image_vectors.shape)
        if codec not in SCAN_CODECS:
            raise ValueError(f"codec must be one of {SCAN_CODECS}, got {codec!r}")
        self._text = text_vectors
        self._image = image_vectors
        self.codec = codec
        self.alphas = frozenset(float(a) for a in alphas)
        self._blended: dict[float, np.ndarray] = {}
        self._int8: dict[float, Int8Scan] = {}
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return int(self._text.shape[0])

    def supports(self, alpha: float) -> bool:
        return float(alpha) in self.alphas

    def _blend(self, alpha: float) -> np.ndarray:
        if alpha in (0.0, 1.0):  # the stored vectors themselves, no copy
            return np.ascontiguousarray(self._text if alpha == 1.0 else self._image, dtype=np.float32)
        return np.ascontiguousarray(blend_product_vectors(np.asarray(self._text), np.asarray(self._image), alpha))

    def matrix(self, alpha: float) -> np.ndarray:
        """(n, D) float32 C-contiguous rows whose inner product with a query is its fused score."""
        alpha = float(alpha)
        assert alpha in self.alphas, (alpha, self.alphas)
        found = self._blended.get(alpha)
        if found is not None:
            return found
        with self._lock:  # built once (tens of ms for 20k products), even when first asked by many requests
            if alpha not in self._blended:
                self._blended[alpha] = self._blend(alpha)
            return self._blended[alpha]

    def int8_scan(self, alpha: float) -> Int8Scan:
        """The int8 codes of the blended matrix at `alpha` (its float32 copy is not kept)."""
        alpha = float(alpha)
        assert alpha in self.alphas, (alpha, self.alphas)
        found = self._int8.get(alpha)
        if found is not None:
            return found
        with self._lock:
            if alpha not in self._int8:
                blended = self._blended.get(alpha)
                self._int8[alpha] = Int8Scan(blended if blended is not None else self._blend(alpha))
            return self._int8[alpha]

    def top_rows(self, query: np.ndarray, fetch: int, alpha: float) -> tuple[np.ndarray, float]:
        """Rows of the `fetch` best products by the scan's fused score, and the ceiling: the highest exact
        fused score a product not among them can have (−inf when every product is returned)."""
        fetch = min(int(fetch), self.size)
        if self.codec == "int8":
            rows, scores, bound = self.int8_scan(alpha).search(query, fetch)
        else:
            with single_threaded():
                found, labels = faiss.knn(query[None, :], self.matrix(alpha), fetch, metric=faiss.METRIC_INNER_PRODUCT)
            keep = labels[0] >= 0
            rows, scores, bound = labels[0][keep], found[0][keep], 0.0
        if rows.size >= self.size or rows.size == 0:
            return rows, -np.inf
        return rows, float(scores[-1]) + bound + SCORE_SLACK

    def search(self, query: np.ndarray, ids: np.ndarray, k: int, fetch: int, alpha: float) -> list[Hit]:
        """The exact fused top-k over every product: scan, fill in exactly, and fetch 4× more while a product
        left out could still beat the k-th (`top_rows`' ceiling). Times the `scan` and `fill_in` stages."""
        while True:
            with stage("scan"):
                rows, ceiling = self.top_rows(query, fetch, alpha)
            with stage("fill_in"):
                hits = exact_top_k(self._text, self._image, ids, rows, query, k, alpha)
            if len(hits) < k or hits[-1].score > ceiling or fetch >= self.size:
                return hits
            fetch = min(self.size, REFETCH_FACTOR * fetch)
