"""Reranking in the query service, over a real tiny bundle with a cross-encoder and a real index built from it."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer import ProductIndex
from search.service import Settings, create_app
from search.service.cache import normalise_query
from search.service.engine import open_reranker
from tests.support.indexes import FixtureEncoder, PatchFixtureEncoder, build_fixture_index
from tests.support.service import build_bundle_index, jpeg_bytes
from vitrine.errors import UserError

pytestmark = pytest.mark.torch  # needs the train extra

DEFAULT_TOP_N = 6  # the reranker's own default, written into the bundle
LIMITS = dict(max_k=20, default_k=5)
QUERY = "women red tshirts"
PRIOR_WEIGHT = 0.01  # small enough that the cross-encoder still reorders the fixture's hits


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_bundle):
    """The tiny bundle plus an untrained tiny cross-encoder (seeded: its scores are fixed), whose
    rerank scores add a first-stage prior (the service must pass the hits' scores through)."""
    import torch

    from trainer.cross_encoder.export import export_reranker_copy
    from trainer.cross_encoder.factory import create_cross_encoder, save_cross_encoder

    root = tmp_path_factory.mktemp("rerank-bundle")
    torch.manual_seed(0)
    model, _ = create_cross_encoder("tiny", pretrained=False)
    with torch.no_grad():
        model.prior_weight.fill_(PRIOR_WEIGHT)
    ckpt = save_cross_encoder(model, root / "ce.pt")
    out = root / "with-reranker"
    export_reranker_copy(ckpt, tiny_bundle, out, default_top_n=DEFAULT_TOP_N)
    return out


@pytest.fixture(scope="module")
def built(bundle, tmp_path_factory: pytest.TempPathFactory):
    return build_bundle_index(tmp_path_factory.mktemp("rerank-index"), bundle, n=24)


@pytest.fixture(scope="module")
def index(built) -> ProductIndex:
    with ProductIndex.open(built.index_dir) as opened:
        yield opened


@pytest.fixture(scope="module")
def reranker(bundle, built):
    from vitrine.runtime.reranker import load_reranker

    return load_reranker(bundle, built.encoder.manifest, threads=1)


def serve(index, encoder, **settings) -> TestClient:
    return TestClient(create_app(Settings(**{**LIMITS, **settings}), index=index, encoder=encoder), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(index, built):
    with serve(index, built.encoder) as test_client:  # the app loads the reranker from the bundle
        yield test_client


def first_stage(index, encoder, query: str, k: int, filters: dict | None = None) -> list:
    emb = encoder.encode_texts([normalise_query(query)])[0]
    return index.search(emb, k=k, kind="text", filters=filters)


def expected_rerank(index, encoder, reranker, query: str, k: int, n: int, filters: dict | None = None):
    """(ids, rerank scores) as the service should answer: Reranker.score on the first-stage top N, sorted."""
    hits = first_stage(index, encoder, query, max(k, n), filters)
    head = hits[:n]
    assert reranker.spec.prior_weight == pytest.approx(PRIOR_WEIGHT)
    titles, patches = [index.get(h.id).title for h in head], index.patches([h.id for h in head])
    scores = reranker.score(normalise_query(query), titles, patches, first_stage=np.array([h.score for h in head]))
    logits = reranker.score(normalise_query(query), titles, patches)
    assert scores == pytest.approx(logits + PRIOR_WEIGHT * np.array([h.score for h in head]), abs=1e-5)
    order = sorted(range(len(head)), key=lambda i: (-float(scores[i]), i))
    ids = [head[i].id for i in order] + [h.id for h in hits[n:]]
    return ids[:k], [float(scores[i]) for i in order][:k]


def search(client: TestClient, **body) -> dict:
    response = client.post("/search/text", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------- ordering


def test_rerank_orders_the_top_n_exactly_as_the_reranker_scores(client, index, built, reranker):
    body = search(client, query=QUERY, k=5, rerank=True, rerank_top_n=10)
    ids, scores = expected_rerank(index, built.encoder, reranker, QUERY, k=5, n=10)
    assert body["reranked"] is True and body["rerank_top_n"] == 10
    assert [r["id"] for r in body["results"]] == ids
    assert ids != [h.id for h in first_stage(index, built.encoder, QUERY, 5)]  # the reranker did reorder
    assert [r["rerank_score"] for r in body["results"]] == pytest.approx(scores, abs=1e-5)
    first = {h.id: h.score for h in first_stage(index, built.encoder, QUERY, 10)}
    for result in body["results"]:
        assert result["score"] == pytest.approx(first[result["id"]], abs=1e-6)  # the first-stage score is kept


def test_hits_after_the_top_n_follow_in_first_stage_order(client, index, built, reranker):
    body = search(client, query=QUERY, k=12, rerank_top_n=4)
    ids, scores = expected_rerank(index, built.encoder, reranker, QUERY, k=12, n=4)
    assert [r["id"] for r in body["results"]] == ids
    assert [r["id"] for r in body["results"][4:]] == [h.id for h in first_stage(index, built.encoder, QUERY, 12)[4:]]
    assert [r["rerank_score"] for r in body["results"][:4]] == pytest.approx(scores[:4], abs=1e-5)
    assert not any("rerank_score" in r for r in body["results"][4:])


def test_rerank_false_keeps_the_first_stage_order(client, index, built):
    body = search(client, query=QUERY, k=8, rerank=False)
    assert [r["id"] for r in body["results"]] == [h.id for h in first_stage(index, built.encoder, QUERY, 8)]
    assert body["reranked"] is False and body["rerank_top_n"] is None
    assert not any("rerank_score" in r for r in body["results"])


def test_filters_apply_before_reranking(client, index, built, reranker):
    filters = {"gender": "Women"}
    body = search(client, query=QUERY, k=4, rerank_top_n=8, filters=filters)
    ids, _ = expected_rerank(index, built.encoder, reranker, QUERY, k=4, n=8, filters=filters)
    assert [r["id"] for r in body["results"]] == ids
    assert all(r["attributes"]["gender"] == "Women" for r in body["results"])


def test_rerank_is_on_by_default_and_settings_change_the_default(client, index, built, reranker):
    body = search(client, query=QUERY, k=5)
    assert body["reranked"] is True and body["rerank_top_n"] == DEFAULT_TOP_N
    assert [r["id"] for r in body["results"]] == expected_rerank(index, built.encoder, reranker, QUERY, 5, DEFAULT_TOP_N)[0]
    with serve(index, built.encoder, rerank_top_n=3) as other:
        assert search(other, query=QUERY, k=5)["rerank_top_n"] == 3
    with serve(index, built.encoder, rerank_default=False) as other:
        plain = search(other, query=QUERY, k=5)
        assert plain["reranked"] is False
        assert [r["id"] for r in plain["results"]] == [h.id for h in first_stage(index, built.encoder, QUERY, 5)]
        assert search(other, query=QUERY, k=5, rerank=True)["reranked"] is True
        assert search(other, query=QUERY, k=5, rerank_top_n=2)["rerank_top_n"] == 2  # giving N asks for rerank


@pytest.mark.parametrize("top_n", [0, 101, -1, "5", 2.5, True])
def test_rerank_top_n_out_of_bounds_is_a_422(client, top_n):
    response = client.post("/search/text", json={"query": QUERY, "rerank_top_n": top_n})
    assert response.status_code == 422 and response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == "validation_error" and error["details"][0]["loc"] == ["body", "rerank_top_n"]


def test_rerank_top_n_bounds_are_inclusive(client, index):
    assert search(client, query=QUERY, k=3, rerank_top_n=1)["rerank_top_n"] == 1
    body = search(client, query=QUERY, k=20, rerank_top_n=100)  # more than the index holds: all of it is reranked
    assert body["rerank_top_n"] == 100 and len(body["results"]) == 20
    assert all("rerank_score" in r for r in body["results"])


# ---------------------------------------------------------------- photo queries: a plain reranker reads text only


def test_a_plain_reranker_never_reranks_photo_queries(client, index, built):
    """(An aligned reranker does: tests/search/test_service_rerank_aligned.py.)"""
    photo = jpeg_bytes()
    for data in ({"rerank": "true"}, {"rerank_top_n": "5"}):
        response = client.post("/search/image", files={"image": ("a.jpg", photo, "image/jpeg")}, data=data)
        assert response.status_code == 422 and response.json()["error"]["code"] == "rerank_unsupported", response.text
        assert response.headers["content-type"].startswith("application/json") and "text query" in response.json()["error"]["message"]
    import base64

    as_json = client.post("/search/image", json={"image_base64": base64.b64encode(photo).decode(), "rerank": True})
    assert as_json.status_code == 422 and as_json.json()["error"]["code"] == "rerank_unsupported"
    for data in ({}, {"rerank": "false"}):
        response = client.post("/search/image", files={"image": ("a.jpg", photo, "image/jpeg")}, data={"k": "4", **data})
        body = response.json()
        assert response.status_code == 200 and body["reranked"] is False and body["rerank_top_n"] is None
        emb = built.encoder.encode_images([Image.open(io.BytesIO(photo)).convert("RGB")])[0]
        assert [r["id"] for r in body["results"]] == [h.id for h in index.search(emb, k=4, kind="image")]


def test_without_a_reranker_rerank_requests_are_refused(tmp_path):
    plain = build_fixture_index(tmp_path, n=12)
    with ProductIndex.open(plain.index_dir) as index, serve(index, plain.encoder) as client:
        assert search(client, query="red", k=3)["reranked"] is False  # default on, nothing to rerank with
        for body in ({"rerank": True}, {"rerank_top_n": 5}):
            response = client.post("/search/text", json={"query": "red", **body})
            assert response.status_code == 422 and response.json()["error"]["code"] == "rerank_unavailable"
        assert search(client, query="red", rerank=False, rerank_top_n=5)["reranked"] is False
        assert client.get("/readyz").json()["reranker"] == {"loaded": False}


# ---------------------------------------------------------------- start-up


def test_startup_refuses_an_index_whose_patches_the_reranker_cannot_read(bundle, built, tmp_path):
    other = build_fixture_index(tmp_path / "other-grid", n=8, encoder=PatchFixtureEncoder())  # 2 x 3 patches of 4
    none = build_fixture_index(tmp_path / "no-patches", n=8, encoder=FixtureEncoder())
    for fixture, message in ((other, "reads a 1x1 grid of 64-d patches, index .* stores a 2x3 grid of 4-d patches: rebuild the index with this bundle"),
                             (none, "stores no image patch features: rebuild the index with this bundle")):  # fmt: skip
        with ProductIndex.open(fixture.index_dir) as index:
            with pytest.raises(UserError, match=message):
                open_reranker(Settings(), index, built.encoder)
            with pytest.raises(UserError, match="rebuild the index with this bundle"):
                with TestClient(create_app(Settings(), index=index, encoder=built.encoder)):
                    pass


def test_readiness_reports_the_loaded_reranker(client, reranker):
    info = client.get("/readyz").json()["reranker"]
    assert info["loaded"] is True and info["layers"] == reranker.layers >= 1
    assert info["top_n"] == DEFAULT_TOP_N and info["default_on"] is True
    assert info["prior_weight"] == pytest.approx(PRIOR_WEIGHT) and info["precision"] == "float32"
    assert info["aligned_dim"] == 0 and info["image_queries"] is False


# ---------------------------------------------------------------- caching, timings


def test_reranked_and_plain_answers_never_collide(client, index, built, reranker):
    query = "blue   jeans  men"  # a query no other test sends: its first request misses the embedding cache
    plain_ids = [h.id for h in first_stage(index, built.encoder, query, 6)]
    answers = [search(client, query=query, k=6, rerank=r, rerank_top_n=n) for r, n in
               ((False, None), (True, 8), (False, None), (True, 3), (True, 8))]  # fmt: skip
    assert [a["cache"] for a in answers] == ["miss", "local", "local", "local", "local"]  # one embedding, shared
    for answer, n in zip(answers, (None, 8, None, 3, 8)):
        ids = [r["id"] for r in answer["results"]]
        if n is None:
            assert ids == plain_ids and answer["reranked"] is False
        else:
            assert ids == expected_rerank(index, built.encoder, reranker, query, 6, n)[0] and answer["rerank_top_n"] == n
    assert [r["id"] for r in answers[1]["results"]] != plain_ids


def test_timings_only_when_asked_and_the_rerank_stage_is_measured(client):
    body = search(client, query=QUERY, k=3)
    assert "timings_ms" not in body and body["took_ms"] > 0
    timed = search(client, query=QUERY, k=3, timing=True)["timings_ms"]
    assert set(timed) == {"decode", "encode", "search", "scan", "fill_in", "records", "rerank", "total"}  # a cache hit: no tokenise
    assert timed["total"] >= timed["rerank"] > 0
    assert "rerank" not in search(client, query=QUERY, k=3, rerank=False, timing=True)["timings_ms"]
    photo = client.post("/search/image", files={"image": ("a.jpg", jpeg_bytes(), "image/jpeg")}, data={"timing": "true"}).json()
    assert set(photo["timings_ms"]) == {"decode", "encode", "search", "scan", "fill_in", "records", "total"}
    counts = [line for line in client.get("/metrics").text.splitlines() if line.startswith("vitrine_stage_seconds_count")]
    assert any('kind="text",stage="rerank"' in line and not line.endswith(" 0.0") for line in counts), counts


@pytest.mark.parametrize("mode", ["lexical", "hybrid"])
def test_lexical_and_hybrid_hits_are_reranked_with_their_vector_score_as_the_prior(client, index, built, reranker, mode):
    query, n = "women red tshirts no 5", 8
    plain = search(client, query=query, k=n, mode=mode, rerank=False)["results"]
    body = search(client, query=query, k=n, mode=mode, rerank_top_n=n)
    assert body["reranked"] is True and body["mode"] == mode
    titles, patches = [r["title"] for r in plain], index.patches([r["id"] for r in plain])
    prior = np.array([r["parts"]["vector"] for r in plain])  # the exact vector score, not BM25's or the fused rank score
    scores = reranker.score(normalise_query(query), titles, patches, first_stage=prior)
    order = sorted(range(len(plain)), key=lambda i: (-float(scores[i]), i))
    assert [r["id"] for r in body["results"]] == [plain[i]["id"] for i in order]
    assert [r["rerank_score"] for r in body["results"]] == pytest.approx([float(scores[i]) for i in order], abs=1e-5)


def test_judged_queries_score_the_reranked_modes(built, tmp_path, capsys):
    from vitrine.cli import main

    (tmp_path / "qrels.txt").write_text("q1 0 105 1\nq2 0 110 1\n")
    (tmp_path / "queries.tsv").write_text("q1\twomen red tshirts no 5\nq2\tmen bags no 10\n")
    out = tmp_path / "out"
    assert main(["eval", "--qrels", str(tmp_path / "qrels.txt"), "--queries", str(tmp_path / "queries.tsv"),
                 "--index", str(built.index_dir), "--depth", "10", "--out", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "metrics.json").read_text())
    assert list(report["modes"]) == ["vector", "lexical", "hybrid", "vector+rerank", "hybrid+rerank"]  # the default with a reranker
    assert (out / "run.hybrid+rerank.trec").read_text().count("q1 Q0") == 10


def test_rerank_reads_compact_patches(bundle, built, reranker, tmp_path):
    """An index with compact (PCA int8) patches serves the reranker decoded float32 patches of the bundle's shape."""
    from indexer.build import build_index
    from vitrine.catalog import read_catalog
    from vitrine.runtime import load_bundle

    build_index(read_catalog(built.catalog_dir), load_bundle(bundle), tmp_path / "compact", patch_storage="pca-int8", threads=2)
    with ProductIndex.open(tmp_path / "compact") as compact, ProductIndex.open(built.index_dir) as full:
        assert compact.manifest["storage"]["patches"] == "pca-int8" and compact.patch_spec == full.patch_spec
        with serve(compact, built.encoder) as client:
            body = search(client, query=QUERY, k=5, rerank=True, rerank_top_n=10)
        ids, scores = expected_rerank(compact, built.encoder, reranker, QUERY, k=5, n=10)
        assert [r["id"] for r in body["results"]] == ids
        assert [r["rerank_score"] for r in body["results"]] == pytest.approx(scores, abs=1e-5)
        head = [h.id for h in first_stage(full, built.encoder, QUERY, 10)]
        titles = [full.get(i).title for i in head]
        on_full = reranker.score(normalise_query(QUERY), titles, full.patches(head))
        on_compact = reranker.score(normalise_query(QUERY), titles, compact.patches(head))
        # 24 products span at most 24 dimensions of the 64-d patches: the 24 components keep them, up to int8 rounding
        np.testing.assert_allclose(on_compact, on_full, atol=1e-4)
