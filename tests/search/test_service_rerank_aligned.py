"""An aligned reranker in the query service (issue 12): rows carry the dual encoder's embeddings of
(query, candidate title, candidate image), text and photo queries are reranked, on Faiss and Qdrant alike,
and start-up accepts an index's patches on the bundle's grid or already pooled to the reranker's own.

Over a real tiny bundle with the untrained `tiny-aligned` cross-encoder (seeded) and a real index built
from it; every expected order is `Reranker.score(..., first_stage=..., aligned=...)` computed here from
the index's stored vectors."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer import ProductIndex, QdrantEngine, QdrantIndex
from search.service import Settings, create_app
from search.service.cache import normalise_query
from search.service.engine import check_reranker_fits_index
from tests.support.indexes import PatchFixtureEncoder, build_fixture_index
from tests.support.service import build_bundle_index, export_tiny_reranker_bundle, jpeg_bytes
from vitrine.errors import UserError
from vitrine.runtime.rerank_inputs import aligned_rows
from vitrine.runtime import read_manifest
from vitrine.runtime.reranker import Reranker, RerankerSpec, reranker_spec

pytestmark = pytest.mark.torch  # needs the train extra

LIMITS = dict(max_k=20, default_k=5)
QUERY = "women red tshirts"
PRIOR_WEIGHT = 0.01
DEFAULT_TOP_N = 6
PHOTOS = ((200, 30, 30), (40, 90, 200))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Path:
    """The tiny bundle (32-d embeddings, 1 x 1 grid of 64-d patches) plus an untrained, seeded tiny-aligned
    cross-encoder: it reads the rows' 32-d dual-encoder embeddings."""
    out = export_tiny_reranker_bundle(tmp_path_factory.mktemp("aligned-bundle"), tiny_bundle, model="tiny-aligned",
                                      prior_weight=PRIOR_WEIGHT, default_top_n=DEFAULT_TOP_N)  # fmt: skip
    assert reranker_spec(read_manifest(out)).aligned_dim == 32
    return out


@pytest.fixture(scope="module")
def built(bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    return build_bundle_index(tmp_path_factory.mktemp("aligned-index"), bundle, n=24)


@pytest.fixture(scope="module")
def index(built):
    with ProductIndex.open(built.index_dir) as opened:
        yield opened


@pytest.fixture(scope="module")
def reranker(bundle: Path, built) -> Reranker:
    from vitrine.runtime.reranker import load_reranker

    loaded = load_reranker(bundle, built.encoder.manifest, threads=1)
    assert loaded is not None and loaded.aligned
    return loaded


def serve(index, encoder, **settings) -> TestClient:
    return TestClient(create_app(Settings(**{**LIMITS, **settings}), index=index, encoder=encoder), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(index, built):
    with serve(index, built.encoder) as test_client:  # the app loads the aligned reranker from the bundle
        yield test_client


def photo_embedding(encoder, colour) -> np.ndarray:
    return encoder.encode_images([Image.open(io.BytesIO(jpeg_bytes(colour))).convert("RGB")])[0]


def by_hand(index, reranker: Reranker, query_text: str, emb: np.ndarray, kind: str, k: int, n: int, filters=None):
    """(ids, rerank scores, first-stage hits) as the service should answer: the first-stage top N scored by
    Reranker.score with the aligned rows of (query vector, stored title vectors, stored image vectors)."""
    hits = index.search(emb, k=max(k, n), kind=kind, filters=filters)
    head = hits[:n]
    ids = [h.id for h in head]
    titles = [index.get(i).title for i in ids]
    assert all(titles)  # every fixture product has a title: its title slot is its stored title vector
    title_vecs, image_vecs = index.vectors(ids)
    aligned = aligned_rows(emb, title_vecs, image_vecs)
    first = np.array([h.score for h in head], np.float32)
    scores = reranker.score(query_text, titles, index.patches(ids), first_stage=first, aligned=aligned)
    # the aligned rows matter: other embeddings give other scores (so a service dropping them is caught)
    other = reranker.score(query_text, titles, index.patches(ids), first_stage=first, aligned=aligned[:, ::-1].copy())
    assert not np.allclose(scores, other, atol=1e-4)
    order = sorted(range(len(head)), key=lambda i: (-float(scores[i]), i))
    return ([head[i].id for i in order] + [h.id for h in hits[n:]])[:k], [float(scores[i]) for i in order][:k], hits


def post_text(client: TestClient, **body) -> dict:
    response = client.post("/search/text", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def post_photo(client: TestClient, colour, **fields) -> dict:
    data = {name: str(value).lower() if isinstance(value, bool) else str(value) for name, value in fields.items()}
    response = client.post("/search/image", files={"image": ("q.jpg", jpeg_bytes(colour), "image/jpeg")}, data=data)
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------- text queries


def test_text_rerank_reads_the_query_and_the_stored_vectors(client, index, built, reranker):
    emb = built.encoder.encode_texts([normalise_query(QUERY)])[0]
    body = post_text(client, query=QUERY, k=5, rerank=True, rerank_top_n=10)
    ids, scores, hits = by_hand(index, reranker, normalise_query(QUERY), emb, "text", k=5, n=10)
    assert body["reranked"] is True and body["rerank_top_n"] == 10
    assert [r["id"] for r in body["results"]] == ids
    assert ids != [h.id for h in hits[:5]]  # the reranker did reorder
    assert [r["rerank_score"] for r in body["results"]] == pytest.approx(scores, abs=1e-5)
    first = {h.id: h.score for h in hits}
    assert all(r["score"] == pytest.approx(first[r["id"]], abs=1e-6) for r in body["results"])  # first-stage score kept


def test_text_rerank_default_and_filters(client, index, built, reranker):
    emb = built.encoder.encode_texts([normalise_query(QUERY)])[0]
    body = post_text(client, query=QUERY, k=4)
    assert body["rerank_top_n"] == DEFAULT_TOP_N
    assert [r["id"] for r in body["results"]] == by_hand(index, reranker, normalise_query(QUERY), emb, "text", 4, DEFAULT_TOP_N)[0]
    filters = {"gender": "Women"}
    body = post_text(client, query=QUERY, k=4, rerank_top_n=8, filters=filters)
    assert [r["id"] for r in body["results"]] == by_hand(index, reranker, normalise_query(QUERY), emb, "text", 4, 8, filters)[0]


@pytest.mark.parametrize("mode", ["lexical", "hybrid"])
def test_lexical_and_hybrid_rows_carry_the_query_vector_too(client, index, built, reranker, mode):
    query, n = "women red tshirts no 5", 8
    emb = built.encoder.encode_texts([normalise_query(query)])[0]
    plain = post_text(client, query=query, k=n, mode=mode, rerank=False)["results"]
    body = post_text(client, query=query, k=n, mode=mode, rerank_top_n=n)
    ids = [r["id"] for r in plain]
    title_vecs, image_vecs = index.vectors(ids)
    scores = reranker.score(normalise_query(query), [r["title"] for r in plain], index.patches(ids),
                            first_stage=np.array([r["parts"]["vector"] for r in plain]),
                            aligned=aligned_rows(emb, title_vecs, image_vecs))  # fmt: skip
    order = sorted(range(len(plain)), key=lambda i: (-float(scores[i]), i))
    assert [r["id"] for r in body["results"]] == [ids[i] for i in order]
    assert [r["rerank_score"] for r in body["results"]] == pytest.approx([float(scores[i]) for i in order], abs=1e-5)


# ---------------------------------------------------------------- photo queries


@pytest.mark.parametrize("colour", PHOTOS)
def test_photo_rerank_reads_no_text_and_the_photos_embedding(client, index, built, reranker, colour):
    emb = photo_embedding(built.encoder, colour)
    body = post_photo(client, colour, k=5, rerank=True, rerank_top_n=10)
    ids, scores, hits = by_hand(index, reranker, "", emb, "image", k=5, n=10)
    assert body["reranked"] is True and body["rerank_top_n"] == 10
    assert [r["id"] for r in body["results"]] == ids
    assert ids != [h.id for h in hits[:5]]  # the reranker did reorder
    assert [r["rerank_score"] for r in body["results"]] == pytest.approx(scores, abs=1e-5)
    first = {h.id: h.score for h in hits}
    assert all(r["score"] == pytest.approx(first[r["id"]], abs=1e-6) for r in body["results"])
    assert set(body["results"][0]["parts"]) == {"i2t", "i2i"}
    # the same as JSON with base64
    as_json = client.post("/search/image", json={"image_base64": base64.b64encode(jpeg_bytes(colour)).decode(), "k": 5,
                                                 "rerank": True, "rerank_top_n": 10})  # fmt: skip
    assert as_json.status_code == 200 and [r["id"] for r in as_json.json()["results"]] == ids


def test_photo_rerank_follows_the_default_and_keeps_hits_after_the_top_n(client, index, built, reranker):
    colour = PHOTOS[0]
    emb = photo_embedding(built.encoder, colour)
    body = post_photo(client, colour, k=12, timing=True)  # rerank omitted: on, as for text, with the default N
    assert body["reranked"] is True and body["rerank_top_n"] == DEFAULT_TOP_N
    ids, scores, hits = by_hand(index, reranker, "", emb, "image", k=12, n=DEFAULT_TOP_N)
    assert [r["id"] for r in body["results"]] == ids
    assert [r["id"] for r in body["results"][DEFAULT_TOP_N:]] == [h.id for h in hits[DEFAULT_TOP_N:12]]
    assert not any("rerank_score" in r for r in body["results"][DEFAULT_TOP_N:])
    assert body["timings_ms"]["total"] >= body["timings_ms"]["rerank"] > 0
    plain = post_photo(client, colour, k=5, rerank=False)
    assert plain["reranked"] is False and [r["id"] for r in plain["results"]] == [h.id for h in index.search(emb, k=5, kind="image")]
    with serve(index, built.encoder, rerank_default=False) as other:
        assert post_photo(other, colour, k=5)["reranked"] is False
        assert post_photo(other, colour, k=5, rerank_top_n=3)["rerank_top_n"] == 3  # giving N asks for it
    counts = [line for line in client.get("/metrics").text.splitlines() if line.startswith("vitrine_stage_seconds_count")]
    assert any('kind="image",stage="rerank"' in line and not line.endswith(" 0.0") for line in counts), counts


def test_photo_rerank_with_filters_and_facets(client, index, built, reranker):
    colour, filters = PHOTOS[1], {"gender": "Men"}
    emb = photo_embedding(built.encoder, colour)
    body = post_photo(client, colour, k=4, rerank_top_n=8, filters='{"gender": "Men"}', facets='["baseColour"]')
    assert [r["id"] for r in body["results"]] == by_hand(index, reranker, "", emb, "image", 4, 8, filters)[0]
    assert all(r["attributes"]["gender"] == "Men" for r in body["results"]) and "baseColour" in body["facets"]


def test_readiness_says_the_reranker_reads_photo_queries(client, reranker):
    info = client.get("/readyz").json()["reranker"]
    assert info["loaded"] is True and info["aligned_dim"] == 32 and info["image_queries"] is True
    assert info["patch_grid"] == info["input_grid"] == [1, 1]


# ---------------------------------------------------------------- Qdrant answers as Faiss


def test_aligned_rerank_on_qdrant_answers_as_on_faiss(built, tmp_path):
    settings = dict(LIMITS, index=built.index_dir)
    faiss_app = create_app(Settings(**settings), encoder=built.encoder)
    qdrant_app = create_app(Settings(**settings, backend="qdrant", qdrant_path=tmp_path / "q"), encoder=built.encoder)
    with TestClient(faiss_app) as on_faiss, TestClient(qdrant_app, raise_server_exceptions=False) as on_qdrant:
        assert isinstance(qdrant_app.state.engine.index, QdrantIndex)

        def answers(client: TestClient) -> list:
            out = [post_text(client, query=q, k=6, rerank_top_n=10) for q in (QUERY, "blue jeans men")]
            out += [post_photo(client, colour, k=6, rerank_top_n=10) for colour in PHOTOS]
            return [[(r["id"], round(r["score"], 5), round(r["rerank_score"], 4)) for r in a["results"]] for a in out]

        assert answers(on_qdrant) == answers(on_faiss)
    QdrantEngine.embedded(tmp_path / "q").close()


# ---------------------------------------------------------------- start-up: which patches an index may store


def pooling_spec(**changes) -> RerankerSpec:
    """A reranker reading a 1 x 1 grid of 4-d patches that pools a 2 x 3 image-encoder grid (PatchFixtureEncoder's)."""
    fields = dict(file="-", tokenizer="-", layers=1, hidden_size=8, max_query_tokens=8, max_title_tokens=8,
                  patch_grid=(1, 1), patch_dim=4, source_grid=(2, 3), default_top_n=5)  # fmt: skip
    return RerankerSpec(**{**fields, **changes})


class FirstStageReranker:
    """A `Reranker` keeping the first-stage order (for start-up checks: the app needs one to hold)."""

    layers = 1

    def __init__(self, spec: RerankerSpec) -> None:
        self.spec = spec

    def score(self, query, titles, patches, *, first_stage=None, aligned=None) -> np.ndarray:
        return np.asarray(first_stage, np.float32)


class GridEncoder(PatchFixtureEncoder):
    def __init__(self, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid


@pytest.fixture(scope="module")
def grid_indexes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], Path]:
    """Indexes of 4-d patches on 2 x 3 (the image encoder's), 1 x 1 (pooled to the reranker's) and 2 x 2 grids."""
    root = tmp_path_factory.mktemp("grids")
    return {grid: build_fixture_index(root / f"{grid[0]}x{grid[1]}", n=8, encoder=GridEncoder(grid)).index_dir
            for grid in ((2, 3), (1, 1), (2, 2))}  # fmt: skip


@pytest.mark.parametrize("grid", [(2, 3), (1, 1)])
def test_startup_accepts_patches_on_the_encoders_grid_or_pooled_to_the_rerankers(grid_indexes, grid):
    spec = pooling_spec()
    with ProductIndex.open(grid_indexes[grid]) as index:
        check_reranker_fits_index(spec, index)
        app = create_app(Settings(**LIMITS), index=index, encoder=GridEncoder(grid), reranker=FirstStageReranker(spec))
        with TestClient(app) as client:
            assert post_text(client, query="red", k=3, rerank_top_n=5)["reranked"] is True
        # the bundle's reranker reads either: finer patches are pooled to its grid, pooled ones pass as they are
        runtime = Reranker.__new__(Reranker)
        runtime.spec = spec
        stored = index.patches(index.ids()[:3])
        assert stored.shape == (3, grid[0] * grid[1], 4) and runtime.model_patches(stored).shape == (3, 1, 4)
        np.testing.assert_allclose(runtime.model_patches(stored)[:, 0], stored.mean(axis=1), atol=1e-6)


def test_startup_refuses_any_other_grid_or_dimension(grid_indexes):
    with ProductIndex.open(grid_indexes[(2, 2)]) as index:
        message = r"reads a 2x3 grid of 4-d patches \(pooled to 1x1\) or a 1x1 grid of 4-d patches, index .* stores a 2x2 grid"
        with pytest.raises(UserError, match=message):
            check_reranker_fits_index(pooling_spec(), index)
        with pytest.raises(UserError, match="rebuild the index with this bundle"):
            with TestClient(create_app(Settings(), index=index, encoder=GridEncoder((2, 2)), reranker=FirstStageReranker(pooling_spec()))):
                pass
    with ProductIndex.open(grid_indexes[(2, 3)]) as index:
        with pytest.raises(UserError, match="grid of 8-d patches"):
            check_reranker_fits_index(pooling_spec(patch_dim=8), index)
        with pytest.raises(UserError, match=r"reads 16-d dual-encoder embeddings, index .* holds \d+-d vectors"):
            check_reranker_fits_index(pooling_spec(aligned_dim=16), index)
        check_reranker_fits_index(pooling_spec(aligned_dim=int(index.embed_dim)), index)


# ---------------------------------------------------------------- a plain reranker cannot read a photo


def test_photo_rerank_with_a_plain_reranker_is_a_422(grid_indexes):
    spec = pooling_spec()
    with ProductIndex.open(grid_indexes[(1, 1)]) as index:
        app = create_app(Settings(**LIMITS), index=index, encoder=GridEncoder((1, 1)), reranker=FirstStageReranker(spec))
        with TestClient(app) as client:
            photo = {"image": ("a.jpg", jpeg_bytes(), "image/jpeg")}
            for data, loc in (({"rerank": "true"}, "rerank"), ({"rerank_top_n": "5"}, "rerank_top_n")):
                response = client.post("/search/image", files=photo, data=data)
                assert response.status_code == 422 and response.headers["content-type"].startswith("application/json")
                error = response.json()["error"]
                assert error["code"] == "rerank_unsupported" and "text query" in error["message"]
                assert error["details"][0]["loc"] == ["body", loc]
            plain = client.post("/search/image", files=photo, data={"k": "3"}).json()
            assert plain["reranked"] is False  # the default: nothing to read, no error
            assert client.get("/readyz").json()["reranker"]["image_queries"] is False
