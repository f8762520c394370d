"""ProductIndex search: fused scores against numpy brute force, union fill-in, filters, lookups."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest

from indexer import ProductIndex, UnknownFilterError
from indexer.candidates import filtered_plan
from indexer.filters import FilterError
from tests.support.indexes import FIXTURE_ALPHA, FixtureEncoder, IndexFixture, build_fixture_index
from vitrine.catalog import read_catalog
from vitrine.errors import UserError

QUERIES = ["red tshirts", "women blue jeans", "black handbags", "green", "men sport shoes"]


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory) -> IndexFixture:
    return build_fixture_index(tmp_path_factory.mktemp("flat"), n=32, index_type="flat")


@pytest.fixture(scope="module")
def hnsw(tmp_path_factory: pytest.TempPathFactory) -> IndexFixture:
    return build_fixture_index(tmp_path_factory.mktemp("hnsw"), n=32, index_type="hnsw")


@pytest.fixture(scope="module")
def reference(flat: IndexFixture) -> dict:
    """Embeddings computed here, straight from the catalog (not through the indexer)."""
    products = read_catalog(flat.catalog_dir).products
    encoder = flat.encoder
    return {
        "ids": np.array([p.id for p in products]),
        "products": products,
        "title": encoder.encode_texts([p.title for p in products]).astype(np.float64),
        "image": encoder.encode_images([p.image.open() for p in products]).astype(np.float64),
    }


def brute_force(ref: dict, query: np.ndarray, alpha: float, k: int, rows: np.ndarray | None = None) -> list[tuple]:
    """Exact fused top-k over `rows` (all by default): (id, score, title_sim, image_sim), ties by id."""
    rows = np.arange(len(ref["ids"])) if rows is None else rows
    q = query.astype(np.float64)
    title, image = ref["title"][rows] @ q, ref["image"][rows] @ q
    score = alpha * title + (1 - alpha) * image
    ids = ref["ids"][rows]
    order = np.lexsort((ids, -score))[:k]
    return [(ids[i], score[i], title[i], image[i]) for i in order]


def union_reference(ref: dict, query: np.ndarray, alpha: float, k: int, fetch: int, rows: np.ndarray) -> list[tuple]:
    """The defined semantics: top-`fetch` by title and by image among `rows`, union, exact fused top-k."""
    q = query.astype(np.float64)
    by_title = rows[np.argsort(-(ref["title"][rows] @ q), kind="stable")[:fetch]]
    by_image = rows[np.argsort(-(ref["image"][rows] @ q), kind="stable")[:fetch]]
    return brute_force(ref, query, alpha, k, np.union1d(by_title, by_image))


def random_queries(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def assert_hits(hits, expected) -> None:
    assert [h.id for h in hits] == [e[0] for e in expected]
    for hit, (_, score, title, image) in zip(hits, expected):
        assert hit.score == pytest.approx(score, abs=1e-5)
        assert hit.title_sim == pytest.approx(title, abs=1e-5)
        assert hit.image_sim == pytest.approx(image, abs=1e-5)


def test_open_round_trip(flat: IndexFixture, reference: dict) -> None:
    index = ProductIndex.open(flat.index_dir)
    assert len(index) == 32 and index.ids() == list(reference["ids"])
    assert index.alphas.alpha == FIXTURE_ALPHA and index.embed_dim == FixtureEncoder.dim
    assert index.bundle_fingerprint == FixtureEncoder.fingerprint
    assert index.version_dir.parent == flat.index_dir / "versions" and index.index_type == "flat"
    manifest = index.manifest
    assert manifest["counts"]["products"] == 32 and manifest["errors"] == []
    assert manifest["index"]["factory"] == "IDMap2,Flat"
    assert manifest["catalog"]["report"]["products"] == 32
    assert manifest["build"]["products_per_s"] > 0
    title, image = index.vectors(["105", "100"])
    np.testing.assert_allclose(title, reference["title"][[5, 0]], atol=1e-6)
    np.testing.assert_allclose(image, reference["image"][[5, 0]], atol=1e-6)

    product = reference["products"][5]
    record = index.get("105")
    assert (record.id, record.title, record.category, record.subcategory) == (product.id, product.title, product.category, product.subcategory)
    assert record.attributes == product.attributes and record.image == product.image.describe()
    assert index.get("nope") is None
    assert [r.id if r else None for r in index.get_many(["101", "nope", "100"])] == ["101", None, "100"]
    assert "101" in index and "nope" not in index
    assert np.array_equal(np.asarray(index.open_image("105")), np.asarray(product.image.open()))
    with pytest.raises(KeyError):
        index.open_image("nope")
    fields = index.filter_fields()
    assert fields["gender"] == ["Men", "Unisex", "Women"] and "Red" in fields["baseColour"]
    assert {"category", "subcategory"} <= set(fields)


@pytest.mark.parametrize("alpha", [None, 0.0, 0.3, 1.0])
def test_search_equals_numpy_brute_force(flat: IndexFixture, reference: dict, alpha: float | None) -> None:
    index = ProductIndex.open(flat.index_dir)
    for text in QUERIES:
        query = flat.encoder.encode_texts([text])[0]
        expected = brute_force(reference, query, FIXTURE_ALPHA if alpha is None else alpha, 7)
        assert_hits(index.search(query, k=7, alpha=alpha), expected)
    # image queries too (i2p)
    query = flat.encoder.encode_images([reference["products"][3].image.open()])[0]
    hits = index.search(query, k=5)
    assert_hits(hits, brute_force(reference, query, FIXTURE_ALPHA, 5))
    assert hits[0].id == "103"
    # k larger than the index returns everything, sorted
    assert len(index.search(query, k=100)) == 32


def test_union_fills_in_the_missing_similarity_exactly(flat: IndexFixture, reference: dict) -> None:
    index = ProductIndex.open(flat.index_dir)
    query = flat.encoder.encode_texts(["classic red"])[0].astype(np.float64) + reference["image"][13]  # photo of 113
    query = (query / np.linalg.norm(query)).astype(np.float32)
    q = query.astype(np.float64)
    title_sims, image_sims = reference["title"] @ q, reference["image"] @ q
    by_title, by_image = np.argsort(-title_sims), np.argsort(-image_sims)
    assert title_sims[by_title[0]] > title_sims[by_title[1]] and image_sims[by_image[0]] > image_sims[by_image[1]]
    assert (by_title[0], by_image[0]) == (0, 13)  # 100 only by title, 113 only by image
    # k=1, fetch_k=1: the candidates are {100, 113}; 113 wins on its image but needs its title similarity
    (hit,) = index.search(query, k=1, fetch_k=1, alpha=0.3)
    assert hit.id == "113"
    assert hit.title_sim == pytest.approx(title_sims[13], abs=1e-6) and hit.title_sim > 0.1
    assert hit.score == pytest.approx(0.3 * title_sims[13] + 0.7 * image_sims[13], abs=1e-6)
    # with the weight on titles, 100 wins and gets its exact image similarity
    (hit,) = index.search(query, k=1, fetch_k=1, alpha=0.9)
    assert hit.id == "100" and hit.image_sim == pytest.approx(image_sims[0], abs=1e-6) and hit.image_sim > 0.1


def test_ties_are_broken_by_id(flat: IndexFixture) -> None:
    index = ProductIndex.open(flat.index_dir)
    query = np.zeros(index.embed_dim, np.float32)  # every score is 0
    hits = index.search(query, k=32)
    assert [h.id for h in hits] == sorted(index.ids())


FILTERS = [
    {"gender": "women"},
    {"gender": "WOMEN", "baseColour": ["red", "Blue"]},
    {"category": "shoes"},
    {"subcategory": ["jeans", "handbags"], "gender": ["men", "unisex"]},
    {"articleType": "Tshirts"},
    {"basecolour": "green"},  # field names match case-insensitively too
    {"gender": "nobody"},
]


def field_value(product, name: str) -> str:
    """A filter field's value: the exact name first (category, subcategory, attributes), else case-insensitively."""
    names = ["category", "subcategory", *product.attributes]
    if name not in names:
        name = next(n for n in names if n.lower() == name.lower())
    return product.attribute(name)


@pytest.mark.parametrize("path", ["numpy", "selector", "overfetch"])
def test_filters_equal_brute_force_over_the_filtered_subset(flat: IndexFixture, hnsw: IndexFixture, reference: dict, path: str) -> None:
    fixture = hnsw if path == "overfetch" else flat
    index = ProductIndex.open(fixture.index_dir)
    if path != "numpy":
        index.brute_force_max_rows = 0  # force the Faiss routes
    products = reference["products"]
    for filters in FILTERS:
        wanted = {k: [v.lower()] if isinstance(v, str) else [x.lower() for x in v] for k, v in filters.items()}
        rows = np.array(
            [i for i, p in enumerate(products) if all(field_value(p, f).lower() in vals for f, vals in wanted.items())],
            dtype=int,
        )
        for text in QUERIES[:3]:
            query = fixture.encoder.encode_texts([text])[0]
            hits = index.search(query, k=4, filters=filters, fetch_k=32)
            assert_hits(hits, brute_force(reference, query, FIXTURE_ALPHA, 4, rows) if rows.size else [])
            assert all(h.id in set(reference["ids"][rows]) for h in hits)
        if path != "numpy" and rows.size:  # a small fetch_k: the union semantics, restricted to the filter
            for query in random_queries(3, index.embed_dim, seed=len(filters)):  # random: no ties at the cut
                hits = index.search(query, k=3, filters=filters, fetch_k=2)
                assert_hits(hits, union_reference(reference, query, FIXTURE_ALPHA, 3, 3, rows))  # fetch = max(k, fetch_k)


def test_overfetch_doubles_until_enough_survive(hnsw: IndexFixture, reference: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    index = ProductIndex.open(hnsw.index_dir)
    index.brute_force_max_rows = 0
    from indexer import faiss_index

    asked: list[int] = []
    real_search = faiss_index.search
    monkeypatch.setattr(faiss_index, "search", lambda spec, ix, q, k, **kw: asked.append(k) or real_search(spec, ix, q, k, **kw))
    query = random_queries(1, index.embed_dim, seed=5)[0]
    rows = np.array([i for i, p in enumerate(reference["products"]) if p.attribute("gender") == "Women"])
    hits = index.search(query, k=3, filters={"gender": "women"}, fetch_k=4)
    assert_hits(hits, union_reference(reference, query, FIXTURE_ALPHA, 3, 4, rows))
    # 1 in 3 products matches: the first round already asks for about 4 / selectivity, not 4.
    assert asked[0] == -(-4 * len(index) // rows.size) > 4

    # Past overfetch_max results per index, the filtered set is scored exactly: Faiss is not asked.
    asked.clear()
    index.overfetch_max = 4
    hits = index.search(query, k=3, filters={"gender": "women"}, fetch_k=4)
    assert asked == []
    assert_hits(hits, brute_force(reference, query, FIXTURE_ALPHA, 3, rows))


def test_filtered_plan() -> None:
    plan = partial(filtered_plan, brute_force_max_rows=4096, overfetch_max=1000)
    assert plan(1_000_000, 4_000, 100, exact_index=False) == ("exact", 0)  # small set: numpy
    assert plan(1_000_000, 500_000, 100, exact_index=True) == ("selector", 0)  # flat: IDSelector
    assert plan(1_000_000, 360_000, 100, exact_index=False) == ("overfetch", 278)  # ceil(100 / 0.36)
    assert plan(1_000_000, 50_000, 100, exact_index=False) == ("exact", 0)  # 5 %: 2,000 per index > 1,000
    assert plan(100, 90, 100, exact_index=False) == ("exact", 0)  # fewer allowed than fetched
    assert plan(10_000, 9_000, 10, exact_index=False, brute_force_max_rows=0) == ("overfetch", 12)
    with pytest.raises(AssertionError):
        plan(10, 0, 5, exact_index=False)


def test_filter_errors_are_clear(flat: IndexFixture) -> None:
    index = ProductIndex.open(flat.index_dir)
    query = flat.encoder.encode_texts(["red"])[0]
    with pytest.raises(UnknownFilterError, match="unknown filter field 'colour'.*baseColour") as info:
        index.search(query, k=3, filters={"colour": "red"})
    assert isinstance(info.value, KeyError) and isinstance(info.value, UserError)
    for bad in ({"gender": []}, {"gender": 3}, {"gender": ["men", None]}):
        with pytest.raises(FilterError):
            index.search(query, k=3, filters=bad)


def test_bad_queries_are_value_errors(flat: IndexFixture) -> None:
    index = ProductIndex.open(flat.index_dir)
    good = flat.encoder.encode_texts(["red"])[0]
    assert [h.id for h in index.search(good[None, :], k=2)] == [h.id for h in index.search(good, k=2)]
    for query, kwargs, message in [
        (good[:-1], {}, "shape"),
        (np.full_like(good, np.nan), {}, "non-finite"),
        (good, {"k": 0}, "k must"),
        (good, {"alpha": 1.5}, "alpha"),
        (good, {"fetch_k": 0}, "fetch_k"),
    ]:
        with pytest.raises(ValueError, match=message):
            index.search(query, **{"k": 3, **kwargs})


def test_open_missing_or_damaged_index_is_a_user_error(tmp_path: Path, flat: IndexFixture) -> None:
    with pytest.raises(UserError, match="not found"):
        ProductIndex.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a Vitrine index"):
        ProductIndex.open(tmp_path / "empty")
    # a bare version folder opens too
    version = ProductIndex.live_version(flat.index_dir)
    assert len(ProductIndex.open(version)) == 32
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "CURRENT").write_text("../../etc\n")
    with pytest.raises(UserError, match="damaged"):
        ProductIndex.open(damaged)
