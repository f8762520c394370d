"""QdrantIndex (embedded Qdrant) against ProductIndex (Faiss) on the same index versions: the same
fused top-k, the same filters and errors, ties at the cut, updates as new versions, collections."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from indexer import ProductIndex, QdrantEngine, QdrantIndex
from indexer.build import build_index
from indexer.filters import FilterError, UnknownFilterError
from indexer.qdrant_index import (
    collection_state,
    delete_from_qdrant_index,
    drop_stale_collections,
    load_version,
    payload_key,
    upsert_qdrant_index,
)
from tests.support.indexes import (
    FixtureEncoder,
    IndexFixture,
    PatchFixtureEncoder,
    build_fixture_index,
    fixture_product,
    make_index_catalog,
)
from tests.support.redis_server import free_port
from vitrine.catalog import read_catalog
from vitrine.errors import IndexUnavailableError, UserError
from vitrine.protocols import SearchIndex

TEXT_QUERIES = ["red tshirts", "women blue jeans", "black handbags", "green", "men sport shoes", "yellow soft jeans"]
FILTERS = [
    {"gender": "Women"},
    {"GENDER": " women "},  # field names and values: case-insensitive, trimmed
    {"baseColour": ["Red", "pink", "no-such-colour"]},
    {"subcategory": "Shoes", "gender": ["Men", "Unisex"]},
    {"gender": "Men", "Gender": "Women"},  # one field twice: both must match (nothing does)
    {"baseColour": "no-such-colour"},
]


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> IndexFixture:
    return build_fixture_index(tmp_path_factory.mktemp("qdrant"), n=64)


@pytest.fixture(scope="module")
def faiss(fixture: IndexFixture):
    with ProductIndex.open(fixture.index_dir) as index:
        yield index


@pytest.fixture(scope="module")
def qdrant(fixture: IndexFixture):
    with QdrantIndex.open(fixture.index_dir, engine=QdrantEngine.embedded(":memory:")) as index:
        yield index


def random_queries(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def same_hits(a, b) -> None:
    assert [h.id for h in a] == [h.id for h in b]
    # The same float32 vectors, the same float64 arithmetic: equal to the last bit, not just close.
    assert [(h.score, h.title_sim, h.image_sim) for h in a] == [(h.score, h.title_sim, h.image_sim) for h in b]


def test_qdrant_index_is_a_search_index_with_the_same_facts(faiss: ProductIndex, qdrant: QdrantIndex) -> None:
    assert isinstance(qdrant, SearchIndex)
    assert len(qdrant) == len(faiss) == 64 and qdrant.ids() == faiss.ids()
    assert qdrant.version == faiss.version and qdrant.index_dir == faiss.index_dir
    assert qdrant.alphas == faiss.alphas and qdrant.embed_dim == faiss.embed_dim
    assert qdrant.bundle_fingerprint == faiss.bundle_fingerprint and qdrant.manifest == faiss.manifest
    assert qdrant.filter_fields() == faiss.filter_fields()
    assert qdrant.get("105") == faiss.get("105") and qdrant.get("nope") is None
    assert qdrant.get_many(["101", "x", "100"]) == faiss.get_many(["101", "x", "100"])
    assert qdrant.open_image("103").size == faiss.open_image("103").size
    with pytest.raises(KeyError):
        qdrant.open_image("nope")
    with pytest.raises(UserError, match="no patch features"):
        qdrant.patches(["100"])
    assert qdrant.collection == f"vitrine-{qdrant.version}" and qdrant.exact  # a flat index: exact search


@pytest.mark.parametrize("kind", ["text", "image"])
@pytest.mark.parametrize("fetch_k", [None, 3, 8])
def test_fused_top_k_equals_faiss_for_random_queries(faiss, qdrant, kind: str, fetch_k: int | None) -> None:
    """Small fetch_k: the top-k comes from the union of both candidate lists, filled in exactly."""
    for query in random_queries(25, faiss.embed_dim, seed=len(kind) + (fetch_k or 0)):
        for k in (1, 5, 10):
            same_hits(faiss.search(query, k=k, kind=kind, fetch_k=fetch_k), qdrant.search(query, k=k, kind=kind, fetch_k=fetch_k))


def test_text_and_photo_queries_and_alpha_equal_faiss(fixture, faiss, qdrant) -> None:
    texts = fixture.encoder.encode_texts(TEXT_QUERIES)
    photos = fixture.encoder.encode_images([faiss.open_image(i) for i in ("100", "117", "142")])
    for query in texts:
        for alpha in (None, 0.0, 0.3, 1.0):
            same_hits(faiss.search(query, k=10, alpha=alpha), qdrant.search(query, k=10, alpha=alpha))
    for query in photos:
        same_hits(faiss.search(query, k=10, kind="image"), qdrant.search(query, k=10, kind="image"))
        assert qdrant.search(query, k=1, kind="image")[0].image_sim == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("filters", FILTERS)
def test_filters_behave_as_faiss(fixture, faiss, qdrant, filters: dict) -> None:
    for query in [*fixture.encoder.encode_texts(TEXT_QUERIES[:3]), *random_queries(5, faiss.embed_dim, seed=9)]:
        expected = faiss.search(query, k=10, filters=filters)
        got = qdrant.search(query, k=10, filters=filters)
        same_hits(expected, got)
        records = qdrant.get_many([h.id for h in got])
        stored = {name.lower(): name for name in qdrant.filter_fields()}
        for field, wanted in filters.items():
            wanted = {w.strip().lower() for w in ([wanted] if isinstance(wanted, str) else wanted)}
            assert all(r.attribute(stored[field.lower()]).lower() in wanted for r in records)
    if filters == {"baseColour": "no-such-colour"}:
        assert got == []


def test_filtered_candidates_are_the_union_of_both_filtered_lists(faiss, qdrant) -> None:
    """With a filter and a small fetch_k, Qdrant's candidates are the top fetch_k *matching* products
    by title and by image (the filter applied inside the engine), then the exact fused top-k."""
    ids = np.array(faiss.ids())
    title, image = (v.astype(np.float64) for v in faiss.vectors(faiss.ids()))
    women = np.array([r.attributes["gender"] == "Women" for r in faiss.get_many(faiss.ids())])
    alpha = qdrant.alphas.for_kind("text")
    for query in random_queries(10, faiss.embed_dim, seed=4):
        q = query.astype(np.float64)
        rows = np.flatnonzero(women)
        union = np.union1d(rows[np.argsort(-(title[rows] @ q), kind="stable")[:4]], rows[np.argsort(-(image[rows] @ q), kind="stable")[:4]])
        score = alpha * (title[union] @ q) + (1 - alpha) * (image[union] @ q)
        expected = list(ids[union][np.lexsort((ids[union], -score))][:4])
        assert [h.id for h in qdrant.search(query, k=4, filters={"gender": "women"}, fetch_k=4)] == expected


def test_same_errors_as_faiss(faiss, qdrant) -> None:
    query = random_queries(1, faiss.embed_dim)[0]
    bad = [
        (dict(filters={"colour": "red"}), UnknownFilterError),
        (dict(filters={"gender": 3}), FilterError),
        (dict(filters={"gender": []}), FilterError),
        (dict(filters=["gender"]), FilterError),
        (dict(k=0), ValueError),
        (dict(k=True), ValueError),
        (dict(fetch_k=0), ValueError),
        (dict(alpha=1.5), ValueError),
        (dict(kind="video"), ValueError),
    ]
    for kwargs, error in bad:
        kwargs = {"k": 5, **kwargs}
        with pytest.raises(error) as from_faiss:
            faiss.search(query, **kwargs)
        with pytest.raises(error) as from_qdrant:
            qdrant.search(query, **kwargs)
        assert str(from_qdrant.value) == str(from_faiss.value)
    for query_emb in (np.zeros(3, np.float32), np.full(faiss.embed_dim, np.nan, np.float32)):
        with pytest.raises(ValueError):
            qdrant.search(query_emb, k=5)


def test_ties_at_the_cut_pick_the_same_candidates_as_faiss(tmp_path: Path) -> None:
    """A catalog's identical titles give identical vectors and tied scores: 40 tied products, a cut
    at 3 and a margin of 16 (two more fetches) still pick what a flat Faiss index picks."""
    records = [fixture_product(i, title="Women classic red Tshirts") if i < 40 else fixture_product(i) for i in range(72)]
    fx = build_fixture_index(tmp_path, catalog_dir=make_index_catalog(tmp_path / "catalog", records=records))
    query = fx.encoder.encode_texts(["Women classic red Tshirts"])[0]
    with ProductIndex.open(fx.index_dir) as faiss, QdrantIndex.open(fx.index_dir, engine=QdrantEngine.embedded(":memory:")) as qdrant:
        for fetch_k in (3, 20, 39):
            for alpha in (1.0, 0.6, 0.0):
                same_hits(faiss.search(query, k=5, fetch_k=fetch_k, alpha=alpha), qdrant.search(query, k=5, fetch_k=fetch_k, alpha=alpha))


def test_patches_come_from_the_version(tmp_path: Path) -> None:
    fx = build_fixture_index(tmp_path, n=12, encoder=PatchFixtureEncoder())
    with ProductIndex.open(fx.index_dir) as faiss, QdrantIndex.open(fx.index_dir, engine=QdrantEngine.embedded(":memory:")) as qdrant:
        assert qdrant.patch_spec == faiss.patch_spec
        np.testing.assert_array_equal(qdrant.patches(["105", "100"]), faiss.patches(["105", "100"]))
        with pytest.raises(UserError, match="not in the index"):
            qdrant.patches(["100", "nope"])
        with pytest.raises(UserError, match="single string"):
            qdrant.patches("100")


def test_upserts_and_deletes_are_new_versions_with_their_own_collections(tmp_path: Path) -> None:
    fx = build_fixture_index(tmp_path, n=16)
    engine = QdrantEngine.embedded(tmp_path / "qdrant")
    try:
        before = QdrantIndex.open(fx.index_dir, engine=engine)
        old_version = before.version
        changed = make_index_catalog(tmp_path / "more", records=[fixture_product(3, title="Unisex urban purple Jeans no 3"),
                                                                    fixture_product(40)])  # fmt: skip
        result, collection = upsert_qdrant_index(fx.index_dir, read_catalog(changed), fx.encoder, engine, threads=2)
        assert result.operation.added == 1 and result.operation.replaced == 1
        with QdrantIndex.open(fx.index_dir, engine=engine) as after, ProductIndex.open(fx.index_dir) as faiss:
            assert after.collection == collection != before.collection and len(after) == 17
            query = fx.encoder.encode_texts(["purple jeans"])[0]
            same_hits(faiss.search(query, k=5), after.search(query, k=5))
            assert after.search(query, k=1)[0].id == "103"
            # The replica still on the previous version answers from its own, unchanged collection.
            assert "140" not in {h.id for h in before.search(query, k=16)} and len(before) == 16
        before.close()

        result, collection = delete_from_qdrant_index(fx.index_dir, ["103", "140"], engine, keep_versions=1)
        with QdrantIndex.open(fx.index_dir, engine=engine) as after:
            assert len(after) == 15 and after.get("103") is None
            assert not {"103", "140"} & {h.id for h in after.search(random_queries(1, after.embed_dim)[0], k=15)}
        # keep_versions=1 pruned the older versions: their collections went with them.
        assert engine.collections() == [collection] and engine.collection_name(old_version) not in engine.collections()
    finally:
        engine.close()


def test_embedded_folder_persists_and_is_locked_to_one_process(fixture: IndexFixture, tmp_path: Path) -> None:
    path = tmp_path / "qdrant"
    engine = QdrantEngine.embedded(path, close_when_unused=True)
    with QdrantIndex.open(fixture.index_dir, engine=engine) as first:
        query = random_queries(1, first.embed_dim)[0]
        hits = first.search(query, k=5)
        with pytest.raises(UserError, match="one process per folder"):
            QdrantEngine.embedded(path)
    with pytest.raises(UserError, match="closed"):
        QdrantIndex.open(fixture.index_dir, engine=engine)
    engine = QdrantEngine.embedded(path)  # closing the last index closed its engine and released the folder
    try:
        version = QdrantIndex.live_version(fixture.index_dir)
        assert collection_state(engine, version) == "complete"  # persisted: opening again loads nothing
        with QdrantIndex.open(fixture.index_dir, engine=engine, load=False) as again:
            assert again.search(query, k=5) == hits
    finally:
        engine.close()


def test_a_copy_of_the_folder_serves_a_second_replica(fixture: IndexFixture, tmp_path: Path) -> None:
    path = tmp_path / "qdrant"
    engine = QdrantEngine.embedded(path)
    load_version(engine, QdrantIndex.live_version(fixture.index_dir))
    engine.close()
    shutil.copytree(path, tmp_path / "replica")
    a = QdrantIndex.open(fixture.index_dir, engine=QdrantEngine.embedded(path, close_when_unused=True), load=False)
    b = QdrantIndex.open(fixture.index_dir, engine=QdrantEngine.embedded(tmp_path / "replica", close_when_unused=True), load=False)
    try:
        for query in random_queries(5, a.embed_dim, seed=3):
            same_hits(a.search(query, k=8, filters={"gender": "women"}), b.search(query, k=8, filters={"gender": "women"}))
    finally:
        a.close()
        b.close()


def test_collections_are_checked_and_partial_loads_redone(fixture: IndexFixture, tmp_path: Path) -> None:
    engine = QdrantEngine.embedded(":memory:")
    version = QdrantIndex.live_version(fixture.index_dir)
    with pytest.raises(UserError, match="is missing: load index version"):
        QdrantIndex.open(fixture.index_dir, engine=QdrantEngine.embedded(":memory:"), load=False)
    name = load_version(engine, version)
    engine.client.delete(name, points_selector=[0, 1, 2])  # as if a load died before its last batch
    assert collection_state(engine, version) == "partial"
    with QdrantIndex.open(fixture.index_dir, engine=engine) as index:  # embedded: loads it again
        assert collection_state(engine, version) == "complete" and len(index) == 64
    # Another index whose version has the same name cannot take over the collection.
    other = build_fixture_index(tmp_path / "other", n=8)
    other_version = QdrantIndex.live_version(other.index_dir)
    engine = QdrantEngine.embedded(":memory:")
    engine.client.create_collection(engine.collection_name(other_version.name), vectors_config={})
    with pytest.raises(UserError, match="does not hold index version"):
        collection_state(engine, other_version)
    # Only this index's collections of versions gone from disk are dropped.
    assert drop_stale_collections(engine, other.index_dir) == []
    engine.close()


def test_engine_failures_are_index_unavailable(qdrant: QdrantIndex) -> None:
    dead = QdrantEngine.connect(f"http://127.0.0.1:{free_port()}", prefer_grpc=False, timeout_s=2)
    with pytest.raises(IndexUnavailableError, match="did not answer"):
        dead.collections()
    with pytest.raises(UserError, match="URL"):
        QdrantEngine.connect("qdrant:6333")
    with pytest.raises(UserError, match="prefix"):
        QdrantEngine.embedded(":memory:", prefix="a b")
    dead.close()


def test_payload_keys_spell_any_field_name() -> None:
    assert payload_key("baseColour") == "f_baseColour"
    assert payload_key("colour.name") == "fx_" + "colour.name".encode().hex()
    assert payload_key("taille (EU)") != payload_key("taille (US)")


def test_real_catalog_top10_and_filters_agree_with_faiss(fashion_products: Path, tmp_path: Path) -> None:
    """600 products of the shared catalog (real titles, photos and attributes, with its duplicate
    titles), the fixture encoder: titles as text queries, photos as photo queries, real filters."""
    encoder = FixtureEncoder()
    catalog = read_catalog(fashion_products, limit=600)
    build_index(catalog, encoder, tmp_path / "index", threads=2)
    engine = QdrantEngine.embedded(tmp_path / "qdrant")
    with ProductIndex.open(tmp_path / "index") as faiss, QdrantIndex.open(tmp_path / "index", engine=engine) as qdrant:
        records = faiss.get_many(faiss.ids())
        titles = encoder.encode_texts([r.title for r in records[:150]])
        photos = encoder.encode_images([faiss.open_image(r.id) for r in records[::12]])
        filters = [{"gender": "Women"}, {"baseColour": ["Black", "White"]}, {"articleType": "Tshirts", "gender": "Men"},
                   {"usage": "Sports", "season": ["Summer", "Fall"]}]  # fmt: skip
        same = total = 0
        for kind, queries in (("text", titles), ("image", photos)):
            for i, query in enumerate(queries):
                for f in (None, filters[i % len(filters)]):
                    expected = faiss.search(query, k=10, kind=kind, filters=f)
                    got = qdrant.search(query, k=10, kind=kind, filters=f)
                    total += 1
                    same += [h.id for h in got] == [h.id for h in expected]
                    assert {h.id for h in got} <= set(faiss.ids()) and len(got) == len(expected)
        assert same / total >= 0.95, f"{same} of {total} top-10 lists identical"
    engine.close()


def run_index(argv: list[str]) -> int:
    import argparse

    from indexer import cli

    parser = argparse.ArgumentParser(prog="vitrine")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_vitrine_index_loads_each_new_version_into_qdrant(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fx = build_fixture_index(tmp_path, n=12)
    out, target = str(fx.index_dir), ["--qdrant-path", str(tmp_path / "q")]
    assert run_index(["index", "--qdrant-load", "--out", out, *target, "--json"]) == 0
    loaded = json.loads(capsys.readouterr().out)["qdrant_collection"]
    assert run_index(["index", "--delete", "100", "--out", out, "--keep-versions", "1", *target]) == 0
    assert "qdrant: collection vitrine-" in capsys.readouterr().out
    engine = QdrantEngine.embedded(tmp_path / "q")
    try:
        with QdrantIndex.open(fx.index_dir, engine=engine, load=False) as index:
            assert len(index) == 11 and index.get("100") is None
            assert engine.collections() == [index.collection] != [loaded]  # the pruned version's collection went too
    finally:
        engine.close()
    for argv, message in ((["index", "--qdrant-load", "--out", out], "needs --qdrant-url or --qdrant-path"),
                          (["index", "--qdrant-load", "--out", out, "--catalog", "c", *target], "takes only --out"),
                          (["index", "--qdrant-load", "--out", str(tmp_path / "none"), *target], "not found")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            run_index(argv)
    assert not (tmp_path / "none").exists()
    with pytest.raises(SystemExit):  # one target only
        run_index(["index", "--qdrant-load", "--out", out, *target, "--qdrant-url", "http://q:6333"])
