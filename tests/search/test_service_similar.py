"""GET /products/{id}/similar and facet counts, against brute force over the stored vectors.

The fixture index is flat and smaller than a query's candidate pool (100), so the first stage scores
every product exactly and a numpy ranking of all of them is the truth to compare with.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from indexer import ProductIndex
from indexer.filters import match_key
from search.service import Settings, create_app
from tests.support.indexes import IndexFixture, build_fixture_index
from tests.support.service import jpeg_bytes
from vitrine.scoring import fuse

LIMITS = {"max_k": 20, "default_k": 10}
FACET_TOP_N = 7


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> IndexFixture:
    return build_fixture_index(tmp_path_factory.mktemp("service-similar"), n=40)


@pytest.fixture(scope="module")
def index(fixture: IndexFixture) -> ProductIndex:
    with ProductIndex.open(fixture.index_dir) as opened:
        yield opened


@pytest.fixture(scope="module")
def client(index: ProductIndex, fixture: IndexFixture) -> TestClient:
    app = create_app(Settings(**LIMITS, facet_top_n=FACET_TOP_N), index=index, encoder=fixture.encoder)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def brute_force(index: ProductIndex, query: np.ndarray, alpha: float, filters: dict | None = None,
                exclude: str | None = None) -> list[str]:  # fmt: skip
    """Every product ranked by the fused score (float64), ties by id; filtered, without `exclude`."""
    ids = index.ids()
    text, image = index.vectors(ids)
    q = np.asarray(query, np.float64)
    score = fuse((text.astype(np.float64) * q).sum(axis=1), (image.astype(np.float64) * q).sum(axis=1), alpha)
    order = np.lexsort((np.array(ids), -score))
    records = {r.id: r for r in index.get_many(ids)}

    def keep(pid: str) -> bool:
        wanted = filters or {}
        return pid != exclude and all(
            match_key(records[pid].attribute(f)) in {match_key(v) for v in ([w] if isinstance(w, str) else w)} for f, w in wanted.items()
        )

    return [ids[i] for i in order if keep(ids[i])]


def brute_counts(index: ProductIndex, ranked: list[str], fields: list[str]) -> dict[str, dict[str, int]]:
    records = index.get_many(ranked)
    return {f: dict(Counter(match_key(r.attribute(f)) for r in records if r.attribute(f).strip())) for f in fields}


def response_counts(body: dict) -> dict[str, dict[str, int]]:
    return {f: {match_key(v["value"]): v["count"] for v in values} for f, values in body["facets"].items()}


def stored_image(index: ProductIndex, pid: str) -> np.ndarray:
    return index.vectors([pid])[1][0]


# ---------------------------------------------------------------- similar


@pytest.mark.parametrize("pid", ["100", "113", "139"])
def test_similar_ranks_by_the_stored_image_vector_and_leaves_the_product_out(client, index, pid):
    body = client.get(f"/products/{pid}/similar", params={"k": 6}).json()
    alpha = index.alphas.resolve("image", None)
    expected = brute_force(index, stored_image(index, pid), alpha, exclude=pid)[:6]
    assert body["product_id"] == pid and body["k"] == 6 and body["alpha"] == pytest.approx(alpha)
    assert [r["id"] for r in body["results"]] == expected and pid not in expected
    # It is the photo search the product's own image would run, minus the product.
    hits = index.search(stored_image(index, pid), k=7, kind="image")
    assert [h.id for h in hits if h.id != pid][:6] == expected
    for result in body["results"]:
        assert set(result["parts"]) == {"i2t", "i2i"}
        assert result["score"] == pytest.approx(alpha * result["parts"]["i2t"] + (1 - alpha) * result["parts"]["i2i"], abs=1e-6)
    assert "facets" not in body and "timings_ms" not in body


def test_similar_respects_filters_and_alpha(client, index):
    pid = "104"  # a white Women Tshirt: the filters below keep it out and in
    for filters in ({"gender": "Women"}, {"baseColour": ["red", "BLUE"], "category": "shoes"}, {"gender": index.get(pid).attribute("gender")}):
        body = client.get(f"/products/{pid}/similar", params={"k": 5, "alpha": 0.3, "filters": json.dumps(filters)}).json()
        expected = brute_force(index, stored_image(index, pid), 0.3, filters, exclude=pid)[:5]
        assert body["alpha"] == 0.3 and [r["id"] for r in body["results"]] == expected and expected
    everything = client.get(f"/products/{pid}/similar", params={"k": 20}).json()["results"]
    assert len(everything) == 20 and pid not in {r["id"] for r in everything}


def test_similar_asks_for_more_than_the_catalog_holds(client, index, fixture):
    app = create_app(Settings(max_k=100), index=index, encoder=fixture.encoder)
    with TestClient(app) as big:
        body = big.get("/products/100/similar", params={"k": 100}).json()
    assert len(body["results"]) == len(index) - 1 and "100" not in {r["id"] for r in body["results"]}


@pytest.mark.parametrize(
    "path, params, status, code",
    [
        ("/products/nope/similar", {}, 404, "product_not_found"),
        ("/products/100/similar", {"k": 0}, 422, "validation_error"),
        ("/products/100/similar", {"k": LIMITS["max_k"] + 1}, 422, "validation_error"),
        ("/products/100/similar", {"k": "ten"}, 422, "validation_error"),
        ("/products/100/similar", {"alpha": 1.5}, 422, "validation_error"),
        ("/products/100/similar", {"alpha": "nan"}, 422, "validation_error"),
        ("/products/100/similar", {"filters": "{gender: Women"}, 400, "malformed_json"),
        ("/products/100/similar", {"filters": "[" * 1024 + "]" * 1024}, 400, "malformed_json"),  # deeper than json recurses
        ("/products/100/similar", {"filters": "{" * 2049}, 422, "validation_error"),  # longer than the parameter allows
        ("/products/100/similar", {"filters": '["Women"]'}, 422, "validation_error"),
        ("/products/100/similar", {"filters": '{"colour": "red"}'}, 422, "unknown_filter"),
        ("/products/100/similar", {"filters": '{"gender": ""}'}, 422, "validation_error"),
        ("/products/100/similar", {"facets": "size"}, 422, "unknown_facet"),
        ("/products/100/similar", {"facets": [f"f{i}" for i in range(17)]}, 422, "validation_error"),
        ("/products/100/similar", {"timing": "maybe"}, 422, "validation_error"),
        ("/products/100/similar", {"kk": 3}, 422, "validation_error"),
    ],
)
def test_similar_bad_input_is_a_json_4xx(client, path, params, status, code):
    response = client.get(path, params=params)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_similar_unknown_id_after_filters_is_still_404(client):
    response = client.get("/products/999/similar", params={"filters": '{"gender": "Women"}'})
    assert response.status_code == 404 and "999" in response.json()["error"]["message"]


def test_similar_on_an_index_without_stored_vectors_is_a_clear_422(index, fixture):
    class WithoutVectors:  # a SearchIndex that cannot look up a product's vectors
        def __init__(self, inner: ProductIndex) -> None:
            self._inner = inner

        def __getattr__(self, name: str):
            if name == "vectors":
                raise AttributeError(name)
            return getattr(self._inner, name)

        def __len__(self) -> int:
            return len(self._inner)

    app = create_app(Settings(), index=WithoutVectors(index), encoder=fixture.encoder)
    with TestClient(app, raise_server_exceptions=False) as plain:
        response = plain.get("/products/100/similar")
        assert plain.post("/search/text", json={"query": "red", "k": 3}).status_code == 200
    assert response.status_code == 422 and response.json()["error"]["code"] == "similar_unavailable"


# ---------------------------------------------------------------- facets


@pytest.mark.parametrize("filters", [None, {"gender": "Men"}, {"category": ["Shoes", "bags"]}])
def test_text_facets_count_the_first_stage_top_n(client, index, fixture, filters):
    query = "red tshirts"
    fields = ["baseColour", "gender", "subcategory"]
    plain = client.post("/search/text", json={"query": query, "k": 5, "filters": filters}).json()
    body = client.post("/search/text", json={"query": query, "k": 5, "filters": filters, "facets": fields}).json()
    assert [r["id"] for r in body["results"]] == [r["id"] for r in plain["results"]]  # counting changes nothing
    ranked = brute_force(index, fixture.encoder.encode_texts([query])[0], index.alphas.resolve("text", None), filters)
    assert body["facet_top_n"] == FACET_TOP_N
    assert response_counts(body) == brute_counts(index, ranked[:FACET_TOP_N], fields)
    assert list(body["facets"]) == fields
    for values in body["facets"].values():
        assert [v["count"] for v in values] == sorted((v["count"] for v in values), reverse=True)
    assert "facets" not in plain and "facet_top_n" not in plain


def test_facets_over_fewer_candidates_than_n_and_case_insensitive_names(client, index, fixture):
    filters = {"baseColour": "red"}
    body = client.post("/search/text", json={"query": "shoes", "k": 3, "filters": filters, "facets": ["BASECOLOUR", "baseColour"]}).json()
    ranked = brute_force(index, fixture.encoder.encode_texts(["shoes"])[0], index.alphas.resolve("text", None), filters)
    assert 0 < len(ranked) < FACET_TOP_N and body["facet_top_n"] == len(ranked)
    assert body["facets"] == {"baseColour": [{"value": "Red", "count": len(ranked)}]}


def test_photo_and_similar_facets(client, index):
    upload = {"image": ("q.jpg", jpeg_bytes((40, 90, 200)), "image/jpeg")}
    body = client.post("/search/image", files=upload, data={"k": "4", "facets": '["gender"]'}).json()
    assert sum(v["count"] for v in body["facets"]["gender"]) == body["facet_top_n"] == FACET_TOP_N
    as_json = client.post("/search/image", json={"image_base64": __import__("base64").b64encode(jpeg_bytes((40, 90, 200))).decode(),
                                                 "k": 4, "facets": ["gender"]}).json()  # fmt: skip
    assert as_json["facets"] == body["facets"]

    pid = "107"
    similar = client.get(f"/products/{pid}/similar", params={"k": 3, "facets": ["baseColour", "gender"]}).json()
    ranked = brute_force(index, stored_image(index, pid), index.alphas.resolve("image", None))
    top = [p for p in ranked[:FACET_TOP_N] if p != pid]  # the product itself is not counted
    assert similar["facet_top_n"] == len(top) and response_counts(similar) == brute_counts(index, top, ["baseColour", "gender"])
    assert [r["id"] for r in similar["results"]] == [p for p in ranked if p != pid][:3]


@pytest.mark.parametrize(
    "facets, code",
    [(["size"], "unknown_facet"), (["gender", "nope"], "unknown_facet"), ([], "validation_error"), ("gender", "validation_error"),
     ([""], "validation_error"), ([1], "validation_error"), ([f"f{i}" for i in range(17)], "validation_error"),
     (["x" * 201], "validation_error"), (["\ud800"], "validation_error")],
)  # fmt: skip
def test_bad_facets_are_a_422(client, facets, code):
    body = json.dumps({"query": "red", "facets": facets})  # ASCII: a lone surrogate travels as \ud800
    response = client.post("/search/text", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code
    if code == "unknown_facet":
        assert response.json()["error"]["details"][0]["loc"][:2] == ["body", "facets"]
        assert "gender" in response.json()["error"]["message"]  # says which fields exist
    form = client.post("/search/image", files={"image": ("q.jpg", jpeg_bytes(), "image/jpeg")}, data={"facets": json.dumps(facets)})
    assert form.status_code == 422 and form.json()["error"]["code"] == code


def test_deeply_nested_json_in_a_form_field_is_a_4xx(client):
    """The multipart form's JSON fields (filters, facets) nested deeper than the JSON parser recurses."""
    deep = "[" * 5000 + "]" * 5000
    for name, status in (("filters", 400), ("facets", 422)):
        response = client.post("/search/image", files={"image": ("q.jpg", jpeg_bytes(), "image/jpeg")}, data={name: deep})
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] in {"malformed_json", "validation_error"}


def test_facets_keep_the_results_of_a_larger_catalog(tmp_path: Path):
    """Above the candidate pool (100), counting the top N still ranks from the pool a plain query uses."""
    built = build_fixture_index(tmp_path, n=260)
    with ProductIndex.open(built.index_dir) as big:
        app = create_app(Settings(max_k=50), index=big, encoder=built.encoder)
        with TestClient(app) as big_client:
            for k, filters in ((3, None), (12, None), (50, {"gender": ["Men", "Women"]})):
                request = {"query": "blue jeans", "k": k, "filters": filters}
                plain = big_client.post("/search/text", json=request).json()
                faceted = big_client.post("/search/text", json={**request, "facets": ["baseColour"]}).json()
                assert [r["id"] for r in faceted["results"]] == [r["id"] for r in plain["results"]]
                assert faceted["facet_top_n"] == 100 and sum(v["count"] for v in faceted["facets"]["baseColour"]) == 100
            similar = big_client.get("/products/150/similar", params={"k": 5}).json()
            faceted = big_client.get("/products/150/similar", params={"k": 5, "facets": "gender"}).json()
            assert [r["id"] for r in faceted["results"]] == [r["id"] for r in similar["results"]]


def test_similar_and_facets_on_embedded_qdrant_answer_as_on_faiss(fixture: IndexFixture, index: ProductIndex):
    from indexer import QdrantEngine, QdrantIndex

    qdrant = QdrantIndex.open(fixture.index_dir, engine=QdrantEngine.embedded(":memory:"))
    try:
        text, image = qdrant.vectors(["113", "100"])
        assert np.array_equal(text, index.vectors(["113", "100"])[0]) and np.array_equal(image, index.vectors(["113", "100"])[1])
        with pytest.raises(KeyError):
            qdrant.vectors(["nope"])
        settings = Settings(**LIMITS, facet_top_n=FACET_TOP_N)
        apps = [create_app(settings, index=opened, encoder=fixture.encoder) for opened in (index, qdrant)]
        with TestClient(apps[0]) as on_faiss, TestClient(apps[1], raise_server_exceptions=False) as on_qdrant:
            for pid, params in (("113", {"k": 6}), ("100", {"k": 4, "filters": '{"gender": ["Men", "unisex"]}', "facets": ["gender", "baseColour"]}),
                                ("nope", {}), ("100", {"facets": "size"})):  # fmt: skip
                got, expected = on_qdrant.get(f"/products/{pid}/similar", params=params), on_faiss.get(f"/products/{pid}/similar", params=params)
                assert got.status_code == expected.status_code
                assert {**got.json(), "took_ms": None} == {**expected.json(), "took_ms": None}
            request = {"query": "green jeans", "k": 4, "facets": ["subcategory"], "filters": {"gender": "Women"}}
            assert on_qdrant.post("/search/text", json=request).json()["facets"] == on_faiss.post("/search/text", json=request).json()["facets"]
    finally:
        qdrant.close()


class ReversingReranker:
    """A `Reranker` that puts the first-stage order upside down (so a rerank visibly reorders)."""

    layers = 1

    def __init__(self, grid: tuple[int, int], dim: int) -> None:
        from vitrine.runtime.reranker import RerankerSpec

        self.spec = RerankerSpec(file="-", tokenizer="-", layers=1, hidden_size=8, max_query_tokens=8, max_title_tokens=8,
                                 patch_grid=grid, patch_dim=dim, default_top_n=5)  # fmt: skip

    def score(self, query, titles, patches, *, first_stage=None, aligned=None) -> np.ndarray:
        return -np.asarray(first_stage, np.float32)


def test_facets_of_a_reranked_query_count_the_first_stage_top_n(tmp_path: Path):
    from tests.support.indexes import PatchFixtureEncoder

    built = build_fixture_index(tmp_path, n=40, encoder=PatchFixtureEncoder())
    spec = built.encoder.patch_spec
    with ProductIndex.open(built.index_dir) as patched:
        app = create_app(Settings(**LIMITS, facet_top_n=FACET_TOP_N), index=patched, encoder=built.encoder,
                         reranker=ReversingReranker(tuple(spec.grid), spec.dim))  # fmt: skip
        with TestClient(app) as reranking:
            request = {"query": "green tshirts", "k": 3, "rerank_top_n": 6}
            reranked = reranking.post("/search/text", json=request).json()
            faceted = reranking.post("/search/text", json={**request, "facets": ["gender", "baseColour"]}).json()
            plain = reranking.post("/search/text", json={**request, "rerank": False, "facets": ["gender", "baseColour"]}).json()
        ranked = brute_force(patched, built.encoder.encode_texts(["green tshirts"])[0], patched.alphas.resolve("text", None))
        expected_counts = brute_counts(patched, ranked[:FACET_TOP_N], ["gender", "baseColour"])
    assert reranked["reranked"] and [r["id"] for r in reranked["results"]] == ranked[:6][::-1][:3]
    assert [r["id"] for r in faceted["results"]] == [r["id"] for r in reranked["results"]] and faceted["reranked"]
    assert faceted["facets"] == plain["facets"] and response_counts(faceted) == expected_counts
