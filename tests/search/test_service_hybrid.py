"""`mode: vector | lexical | hybrid` through the HTTP API, on the Faiss and the Qdrant backend."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from indexer import ProductIndex
from search.service import Settings, create_app
from tests.support.indexes import IndexFixture, build_fixture_index
from tests.support.service import jpeg_bytes
from vitrine.fusion import DEFAULT_LEXICAL_WEIGHT, fuse_lists, hybrid_depth

QUERIES = ["red tshirts no 7", "women jeans", "no 12", "soft black handbags"]


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> IndexFixture:
    return build_fixture_index(tmp_path_factory.mktemp("service-hybrid"), n=40)


@pytest.fixture(scope="module")
def index(fixture: IndexFixture):
    with ProductIndex.open(fixture.index_dir) as opened:
        yield opened


@pytest.fixture(scope="module")
def client(index: ProductIndex, fixture: IndexFixture):
    with TestClient(create_app(Settings(max_k=20, default_k=10), index=index, encoder=fixture.encoder), raise_server_exceptions=False) as c:
        yield c


def search(client: TestClient, **body) -> dict:
    response = client.post("/search/text", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_vector_stays_the_default(client):
    plain, vector = search(client, query="red tshirts", k=5), search(client, query="red tshirts", k=5, mode="vector")
    assert plain["mode"] == "vector" and plain["results"] == vector["results"]
    assert set(plain["results"][0]["parts"]) == {"t2t", "t2i"}


@pytest.mark.parametrize("query", QUERIES)
def test_lexical_mode_is_the_bm25_ranking_with_exact_vector_parts(client, index, fixture, query):
    body = search(client, query=query, k=6, mode="lexical")
    expected = index.lexical_search(query, k=6)
    assert body["mode"] == "lexical" and [(r["id"], r["score"]) for r in body["results"]] == [
        (h.id, pytest.approx(h.score)) for h in expected
    ]
    exact = index.score_ids(fixture.encoder.encode_texts([query])[0], [h.id for h in expected])
    for result, hit in zip(body["results"], exact):
        assert result["parts"] == pytest.approx({"t2t": hit.title_sim, "t2i": hit.image_sim, "vector": hit.score, "bm25": result["score"]})


@pytest.mark.parametrize("fusion", ["rrf", "weighted"])
@pytest.mark.parametrize("query", QUERIES)
def test_hybrid_mode_fuses_the_two_rankings(client, index, fixture, query, fusion):
    k = 8
    body = search(client, query=query, k=k, mode="hybrid", fusion=fusion)
    emb = fixture.encoder.encode_texts([query])[0]
    depth = hybrid_depth(k)
    vector = {h.id: h.score for h in index.search(emb, k=depth, fetch_k=depth)}
    lexical = {h.id: h.score for h in index.lexical_search(query, k=depth)}
    expected = fuse_lists([vector, lexical], method=fusion, weights=[1 - DEFAULT_LEXICAL_WEIGHT, DEFAULT_LEXICAL_WEIGHT], k=k)
    assert [(r["id"], r["score"]) for r in body["results"]] == [(i, pytest.approx(s)) for i, s in expected]
    for result in body["results"]:
        assert result["parts"]["vector"] == pytest.approx(vector[result["id"]])
        assert result["parts"].get("bm25") == (pytest.approx(lexical[result["id"]]) if result["id"] in lexical else None)


def test_an_exact_title_word_lifts_its_product_in_hybrid(client):
    # The fixture encoder hashes words it has no colour for: "no 13" means nothing to it, everything to BM25.
    assert search(client, query="no 13", k=1, mode="lexical")["results"][0]["id"] == "113"
    assert search(client, query="no 13", k=1, mode="hybrid")["results"][0]["id"] == "113"


@pytest.mark.parametrize("mode", ["vector", "lexical", "hybrid"])
def test_filters_apply_in_every_mode(client, index, mode):
    filters = {"gender": "Women", "baseColour": ["red", "blue"]}
    body = search(client, query="red tshirts jeans", k=20, mode=mode, filters=filters)
    assert body["results"]
    for result in body["results"]:
        assert result["attributes"]["gender"] == "Women" and result["attributes"]["baseColour"] in ("Red", "Blue")
    unknown = client.post("/search/text", json={"query": "red", "mode": mode, "filters": {"brand": "x"}})
    assert unknown.status_code == 422 and unknown.json()["error"]["code"] == "unknown_filter"


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"query": "red", "mode": "bm25"}, "mode"),
        ({"query": "red", "mode": "Hybrid"}, "mode"),
        ({"query": "red", "mode": 1}, "mode"),
        ({"query": "red", "mode": "hybrid", "fusion": "max"}, "fusion"),
        ({"query": "red", "fusion": "rrf"}, "fusion"),  # fusion without hybrid
        ({"query": "red", "mode": "lexical", "fusion": "weighted"}, "fusion"),
    ],
)
def test_bad_modes_are_a_422_naming_the_field(client, body, where):
    response = client.post("/search/text", json=body)
    assert response.status_code == 422, response.text
    assert where in str(response.json()["error"]["details"][0]["loc"])


def test_photo_queries_have_no_mode(client):
    response = client.post("/search/image", files={"image": ("q.jpg", jpeg_bytes(), "image/jpeg")}, data={"mode": '"lexical"'})
    assert response.status_code == 422 and "mode" in response.json()["error"]["message"]


def test_a_query_with_no_known_word_finds_nothing_lexically_but_hybrid_still_answers(client):
    assert search(client, query="zzqx", k=5, mode="lexical")["results"] == []
    assert len(search(client, query="zzqx", k=5, mode="hybrid")["results"]) == 5


def test_the_qdrant_backend_answers_every_mode_as_faiss_does(client, fixture):
    qdrant_app = create_app(Settings(max_k=20, default_k=10, index=fixture.index_dir, backend="qdrant", qdrant_path=":memory:"), encoder=fixture.encoder)
    with TestClient(qdrant_app) as qdrant:
        for mode in ("lexical", "hybrid"):
            for query in QUERIES:
                body = {"query": query, "k": 8, "mode": mode, "filters": {"gender": ["men", "unisex"]}}
                ours, theirs = search(client, **body)["results"], search(qdrant, **body)["results"]
                assert [r["id"] for r in ours] == [r["id"] for r in theirs]
                for a, b in zip(ours, theirs):
                    assert a["score"] == pytest.approx(b["score"]) and a["parts"] == pytest.approx(b["parts"])


@pytest.mark.parametrize("mode", ["lexical", "hybrid"])
def test_facets_count_the_fused_list_in_every_mode(client, mode):
    # The counts describe the mode's own ranking: every match of lexical, all 40 fixture products in hybrid.
    fields = ["baseColour", "gender"]
    body = search(client, query="red tshirts", k=5, mode=mode, facets=fields)
    plain = search(client, query="red tshirts", k=5, mode=mode)
    assert [r["id"] for r in body["results"]] == [r["id"] for r in plain["results"]]
    everything = search(client, query="red tshirts", k=20, mode="lexical")["results"]
    matches = {r["id"] for r in everything}
    assert body["facet_top_n"] == (len(matches) if mode == "lexical" else 40)
    if mode == "lexical":  # all matches fit in k=20 here, so the brute-force count is over them
        assert len(matches) < 20
        for field in fields:
            expected: dict[str, int] = {}
            for r in everything:
                expected[r["attributes"][field]] = expected.get(r["attributes"][field], 0) + 1
            assert {v["value"]: v["count"] for v in body["facets"][field]} == expected
    for field in fields:
        assert sum(v["count"] for v in body["facets"][field]) == body["facet_top_n"]
