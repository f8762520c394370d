"""indexer.fused_scan: the exact fill-in and the one-pass fused scan against float64 numpy references."""
from __future__ import annotations

import numpy as np
import pytest

from indexer import ProductIndex
from indexer.fused_scan import ROW_CHUNK, SCAN_CODECS, FusedScan, Int8Scan, exact_top_k, row_dots
from tests.support.indexes import FIXTURE_ALPHA, IndexFixture, build_fixture_index
from vitrine.timing import recording

N, DIM = 600, 32


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(title, image, ids) with duplicated products (equal vectors) to exercise ties."""
    title, image = unit_rows(N, DIM, 1), unit_rows(N, DIM, 2)
    title[10:14], image[10:14] = title[9], image[9]  # products 9..13 are the same product
    ids = np.array([f"p{i:04d}" for i in range(N)][::-1])  # ids not in row order: ties must go by id
    return title, image, ids


def reference(title, image, ids, rows, query, k, alpha) -> list[tuple[str, float, float, float]]:
    """float64 brute force over `rows`: (id, score, title_sim, image_sim), by score then id."""
    q = query.astype(np.float64)
    t, i = title[rows].astype(np.float64) @ q, image[rows].astype(np.float64) @ q
    score = alpha * t + (1 - alpha) * i
    order = np.lexsort((ids[rows], -score))[:k]
    return [(str(ids[rows][j]), score[j], t[j], i[j]) for j in order]


def assert_same(hits, expected) -> None:
    assert [h.id for h in hits] == [e[0] for e in expected]
    for hit, (_, score, t, i) in zip(hits, expected):
        assert abs(hit.score - score) <= 1e-5 and abs(hit.title_sim - t) <= 1e-5 and abs(hit.image_sim - i) <= 1e-5


def test_row_dots_equal_rows_equal_scores_across_chunks() -> None:
    rows_per_call = ROW_CHUNK + 5  # the last rows fall in a second block
    vectors = np.repeat(unit_rows(1, DIM, 3), rows_per_call, axis=0)
    dots = row_dots(vectors, np.arange(rows_per_call), unit_rows(1, DIM, 4)[0])
    assert dots.dtype == np.float32 and np.unique(dots).size == 1


@pytest.mark.parametrize("alpha", [0.0, 0.35, 0.9, 1.0])
def test_exact_fill_in_equals_the_float64_reference(vectors, alpha: float) -> None:
    title, image, ids = vectors
    rng = np.random.default_rng(5)
    for query in unit_rows(20, DIM, 6):
        rows = rng.choice(N, size=150, replace=True)  # repeats, unsorted: a union of two candidate lists
        rows = np.concatenate([rows, [9, 10, 11, 12, 13]])
        expected = reference(title, image, ids, np.unique(rows), query, 12, alpha)
        assert_same(exact_top_k(title, image, ids, rows, query, 12, alpha), expected)


@pytest.mark.parametrize("codec", SCAN_CODECS)
@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_fused_scan_finds_the_exact_fused_top_k_over_everything(vectors, alpha: float, codec: str) -> None:
    title, image, ids = vectors
    scan = FusedScan(title, image, {alpha}, codec=codec)
    everything = np.arange(N)
    queries = list(unit_rows(20, DIM, 7)) + [title[9] * 0.6 + image[9] * 0.4]  # one that ranks the duplicates first
    for query in queries:
        query = (query / np.linalg.norm(query)).astype(np.float32)
        rows, ceiling = scan.top_rows(query, 30, alpha)
        assert rows.size == 30 and np.isfinite(ceiling)
        expected = reference(title, image, ids, everything, query, 10, alpha)
        assert_same(scan.search(query, ids, 10, 30, alpha), expected)
        # The ceiling holds: no product left out of the scan scores above it.
        left_out = np.setdiff1d(everything, rows)
        assert max(e[1] for e in reference(title, image, ids, left_out, query, 1, alpha)) <= ceiling


def test_int8_scan_stays_within_its_error_bound() -> None:
    matrix = unit_rows(500, 64, 11) * np.random.default_rng(12).uniform(0.1, 1.0, (500, 1)).astype(np.float32)
    scan = Int8Scan(matrix)
    for query in unit_rows(30, 64, 13):
        rows, approx, bound = scan.search(query, 500)
        exact = matrix[rows].astype(np.float64) @ query.astype(np.float64)
        assert 0 < bound < 0.05 and np.abs(exact - approx).max() <= bound
        assert np.all(np.diff(approx) <= 0)  # best first
    rows, approx, bound = scan.search(np.zeros(64, dtype=np.float32), 7)  # a zero query: all tie at 0
    assert rows.size == 7 and not approx.any() and bound == 0.0


def test_an_uncertain_scan_fetches_more_until_the_answer_is_exact(vectors, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many products tied at the k-th place (copies of one product): the fetched rows cannot prove the
    order, so the scan fetches 4x more (up to everything) and ties still fall to the smallest ids."""
    title, image, ids = vectors
    title, image = title.copy(), image.copy()
    title[100:200], image[100:200] = title[9], image[9]  # 100 copies of product 9
    scan = FusedScan(title, image, {0.6})
    query = title[9] * 0.6 + image[9] * 0.4
    query = (query / np.linalg.norm(query)).astype(np.float32)
    fetches: list[int] = []
    real = scan.top_rows
    monkeypatch.setattr(scan, "top_rows", lambda q, f, a: fetches.append(f) or real(q, f, a))
    assert_same(scan.search(query, ids, 10, 20, 0.6), reference(title, image, ids, np.arange(N), query, 10, 0.6))
    assert fetches[:2] == [20, 80] and fetches[-1] <= N


def test_fused_scan_keeps_one_matrix_per_alpha_and_only_its_own(vectors) -> None:
    title, image, _ = vectors
    scan = FusedScan(title, image, {0.0, 0.6, 1.0})
    assert scan.supports(0.6) and not scan.supports(0.5)
    assert scan.matrix(0.6) is scan.matrix(0.6)  # built once
    np.testing.assert_allclose(scan.matrix(0.6), 0.6 * title + 0.4 * image, atol=1e-6)
    assert np.shares_memory(scan.matrix(1.0), title) and np.shares_memory(scan.matrix(0.0), image)  # no copies
    with pytest.raises(AssertionError):
        scan.matrix(0.5)


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory) -> IndexFixture:
    return build_fixture_index(tmp_path_factory.mktemp("fused-flat"), n=48, index_type="flat")


def test_product_index_fused_path_equals_the_union_path_and_reports_its_stages(flat: IndexFixture) -> None:
    """At the index's α the fused scan answers; forcing the union path (an explicit fetch_k covering
    everything) gives the same hits. Both record their scan and fill_in timings when asked."""
    with ProductIndex.open(flat.index_dir) as index:
        for query in unit_rows(10, index.embed_dim, 8):
            timings: dict[str, float] = {}
            with recording(timings):
                fused = index.search(query, k=8, alpha=FIXTURE_ALPHA)
            assert set(timings) == {"scan", "fill_in"} and all(ms >= 0 for ms in timings.values())
            union = index.search(query, k=8, alpha=FIXTURE_ALPHA, fetch_k=len(index))
            facts = [[(h.id, h.score, h.title_sim, h.image_sim) for h in hits] for hits in (fused, union)]
            assert facts[0] == facts[1]
        assert index._fused.supports(FIXTURE_ALPHA) and not index._fused.supports(0.123)
        index.search(unit_rows(1, index.embed_dim, 9)[0], k=3, alpha=0.123)  # another α: the union path, no new matrix
        assert set(index._fused._blended) | set(index._fused._int8) <= index._fused.alphas
        assert not index._fused._blended  # the int8 scan keeps no float32 copy
