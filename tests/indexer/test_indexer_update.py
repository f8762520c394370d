"""Upserts and deletes against a rebuild from scratch, and the atomic switch when an operation fails."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer import ProductIndex
from indexer.build import (
    RejectedProductsError,
    UnknownProductsError,
    build_index,
    delete_from_index,
    update_index,
    upsert_index,
)
from indexer.layout import IndexBusyError, IndexLayout
from tests.support.catalogs import write_jsonl
from tests.support.indexes import FixtureEncoder, PatchFixtureEncoder, fixture_product, make_index_catalog, write_fixture_image
from vitrine.catalog import read_catalog
from vitrine.errors import UserError


def random_queries(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def contents(index: ProductIndex) -> dict[str, tuple]:
    """id -> (record, title vector, image vector, patch features or None)."""
    ids = index.ids()
    title, image = index.vectors(ids)
    patches = index.patches(ids) if index.patch_spec is not None else [None] * len(ids)
    return {i: (index.get(i), t, v, p) for i, t, v, p in zip(ids, title, image, patches)}


def assert_same_index(a: ProductIndex, b: ProductIndex, encoder: FixtureEncoder) -> None:
    """Same products, records and vectors, and the same results for the same searches."""
    ca, cb = contents(a), contents(b)
    assert sorted(ca) == sorted(cb)
    for ident in ca:
        assert ca[ident][0] == cb[ident][0]
        np.testing.assert_array_equal(ca[ident][1], cb[ident][1])
        np.testing.assert_array_equal(ca[ident][2], cb[ident][2])
        assert (ca[ident][3] is None) == (cb[ident][3] is None)
        np.testing.assert_array_equal(ca[ident][3], cb[ident][3])
    assert a.patch_spec == b.patch_spec
    queries = [*random_queries(4, a.embed_dim), *encoder.encode_texts(["red tshirts", "women jeans", "green bags"])]
    for query in queries:
        for kwargs in ({"k": 5}, {"k": 3, "fetch_k": 3}, {"k": 4, "alpha": 0.2}, {"k": 4, "filters": {"gender": "women"}}):
            assert a.search(query, **kwargs) == b.search(query, **kwargs), kwargs
    assert a.filter_fields() == b.filter_fields()


@pytest.fixture
def catalogs(tmp_path: Path) -> dict[str, Path]:
    """Three JSONL files over one image folder: the first build, an update, and the final state."""
    root = tmp_path / "catalog"
    make_index_catalog(root, records=[fixture_product(i) for i in range(32)])  # images for 0..31
    first = [fixture_product(i) for i in range(24)]
    changed = [
        fixture_product(16, title="Men classic green Jeans remade"),  # new title, same image
        fixture_product(17, image="images/117-new.jpg"),  # same title, new image
        fixture_product(18, baseColour="Navy"),  # an attribute changed
        fixture_product(19, title="Women retro pink Handbags again", image="images/119-new.jpg"),
    ]
    write_fixture_image(root / "images" / "117-new.jpg", 99, "yellow")
    write_fixture_image(root / "images" / "119-new.jpg", 98, "pink")
    # products 20..23 offered unchanged, 24..31 new
    update = changed + [fixture_product(i) for i in range(20, 32)]
    final = [fixture_product(i) for i in range(4, 16)] + update  # after deleting 100..103
    return {
        "first": write_jsonl(root / "first.jsonl", first),
        "update": write_jsonl(root / "update.jsonl", update),
        "final": write_jsonl(root / "final.jsonl", final),
    }


@pytest.mark.parametrize("encoder_class", [FixtureEncoder, PatchFixtureEncoder], ids=["vectors", "patches"])
@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_upsert_and_delete_equal_a_rebuild(tmp_path: Path, catalogs: dict[str, Path], index_type: str, encoder_class: type) -> None:
    encoder = encoder_class()
    out = tmp_path / "index"
    build_index(read_catalog(catalogs["first"]), encoder, out, index_type=index_type)
    before = ProductIndex.open(out)
    labels_before = before.store.labels_of(before.ids())

    result = upsert_index(out, read_catalog(catalogs["update"]), encoder)
    op = result.operation
    assert (op.added, op.replaced, op.unchanged, op.embedded, op.errors) == (8, 4, 4, 12, 0)
    result = delete_from_index(out, ["100", "101", "102", "103"])
    assert result.operation.deleted == 4
    updated = ProductIndex.open(out)
    assert ("patches" in updated.manifest["files"]) == (encoder_class is PatchFixtureEncoder)
    assert updated.manifest["index"]["removal"] == ("remove_ids" if index_type == "flat" else "rebuild")
    assert [h["operation"] for h in updated.manifest["history"]] == ["build", "upsert"]
    assert updated.manifest["build"]["operation"] == "delete" and updated.manifest["counts"]["products"] == 28

    # labels are stable: replaced products keep theirs, new ones never reuse a deleted one
    labels_after = updated.store.labels_of(updated.ids())
    assert all(labels_after[i] == labels_before[i] for i in ["116", "117", "118", "119", "120", "104"])
    assert min(labels_after[str(100 + i)] for i in range(24, 32)) >= 24

    build_index(read_catalog(catalogs["final"]), encoder, tmp_path / "rebuilt", index_type=index_type)
    rebuilt = ProductIndex.open(tmp_path / "rebuilt")
    assert_same_index(updated, rebuilt, encoder)
    # and the old version object still answers from what it held
    assert len(before) == 24 and before.get("100") is not None and updated.get("100") is None
    assert updated.get("116").title == "Men classic green Jeans remade"


def test_upsert_with_nothing_changed_writes_no_version(tmp_path: Path, catalogs: dict[str, Path]) -> None:
    encoder = FixtureEncoder()
    out = tmp_path / "index"
    build_index(read_catalog(catalogs["first"]), encoder, out)
    version = ProductIndex.live_version(out)
    result = upsert_index(out, read_catalog(catalogs["first"]), encoder)
    assert (result.operation.unchanged, result.operation.embedded) == (24, 0)
    assert ProductIndex.live_version(out) == version == result.version_dir


def test_upsert_refuses_another_encoder(tmp_path: Path, catalogs: dict[str, Path]) -> None:
    out = tmp_path / "index"
    build_index(read_catalog(catalogs["first"]), FixtureEncoder(), out)

    class Other(FixtureEncoder):
        fingerprint = "something-else"

    with pytest.raises(UserError, match="built with bundle colourhash-fixture"):
        upsert_index(out, read_catalog(catalogs["update"]), Other())
    with pytest.raises(UserError, match="no index"):
        upsert_index(tmp_path / "none", read_catalog(catalogs["update"]), FixtureEncoder())


def test_delete_unknown_ids_deletes_nothing(tmp_path: Path, catalogs: dict[str, Path]) -> None:
    out = tmp_path / "index"
    build_index(read_catalog(catalogs["first"]), FixtureEncoder(), out)
    version = ProductIndex.live_version(out)
    with pytest.raises(UserError, match="not in the index: nope"):
        delete_from_index(out, ["100", "nope"])
    assert ProductIndex.live_version(out) == version and "100" in ProductIndex.open(out)
    delete_from_index(out, [str(100 + i) for i in range(24)])  # everything: an empty index still opens
    empty = ProductIndex.open(out)
    assert len(empty) == 0 and empty.search(np.ones(empty.embed_dim, np.float32), k=3) == []


class FailingEncoder(FixtureEncoder):
    """Raises on its `fail_on`-th image batch: an encoder crash halfway through a build."""

    def __init__(self, fail_on: int) -> None:
        self.fail_on = fail_on
        self.batches = 0

    def encode_images(self, images):
        self.batches += 1
        if self.batches == self.fail_on:
            raise RuntimeError("encoder crashed")
        return super().encode_images(images)


def test_a_failing_build_leaves_the_previous_index_live(tmp_path: Path, catalogs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = FixtureEncoder()
    out = tmp_path / "index"
    build_index(read_catalog(catalogs["first"]), encoder, out)
    before = ProductIndex.open(out)
    query = encoder.encode_texts(["red tshirts"])[0]
    expected_hits, expected_ids, version = before.search(query, k=5), before.ids(), before.version_dir

    with pytest.raises(RuntimeError, match="encoder crashed"):
        build_index(read_catalog(catalogs["final"]), FailingEncoder(fail_on=2), out, batch_size=8)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        upsert_index(out, read_catalog(catalogs["update"]), FailingEncoder(fail_on=2), batch_size=4)
    # a crash after the vectors, while writing the Faiss indexes (hnsw: a flat index is built at load, not written)
    from indexer import build as build_module

    calls = []

    def write_then_fail(index, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return build_module.faiss_index.read.__globals__["faiss"].write_index(index, str(path))

    monkeypatch.setattr(build_module.faiss_index, "write", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        build_index(read_catalog(catalogs["final"]), encoder, out, index_type="hnsw")
    monkeypatch.undo()

    after = ProductIndex.open(out)
    assert after.version_dir == version and after.ids() == expected_ids
    assert after.search(query, k=5) == expected_hits
    assert not list((out / "versions").glob("*.partial")) and IndexLayout(out).finished_versions() == [version]


def test_versions_are_pruned_and_writers_exclude_each_other(tmp_path: Path, catalogs: dict[str, Path]) -> None:
    encoder = FixtureEncoder()
    out = tmp_path / "index"
    layout = IndexLayout(out)
    for _ in range(3):
        build_index(read_catalog(catalogs["first"]), encoder, out, keep_versions=2)
    versions = layout.finished_versions()
    assert len(versions) == 2 and layout.current() == versions[-1]
    with layout.lock():
        with pytest.raises(IndexBusyError, match="another process"):
            delete_from_index(out, ["100"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and not a Vitrine index"):
        build_index(read_catalog(catalogs["first"]), encoder, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("encoder_class", [FixtureEncoder, PatchFixtureEncoder], ids=["vectors", "patches"])
def test_an_update_upserts_and_deletes_in_one_version_equal_to_a_rebuild(tmp_path: Path, catalogs: dict[str, Path], encoder_class: type) -> None:
    encoder = encoder_class()
    out = tmp_path / "index"
    build_index(read_catalog(catalogs["first"]), encoder, out)
    versions_before = len(IndexLayout(out).finished_versions())
    result = update_index(out, upserts=read_catalog(catalogs["update"]), deletes=["100", "101", "102", "103"], encoder=encoder)
    op = result.operation
    assert op.operation == "update" and (op.added, op.replaced, op.unchanged, op.deleted) == (8, 4, 4, 4)
    assert result.changes["100"] == "deleted" and result.changes["116"] == "replaced"
    assert result.changes["124"] == "added" and result.changes["120"] == "unchanged"
    assert "update: added 8, replaced 4, unchanged 4, deleted 4" in result.summary()
    layout = IndexLayout(out)
    assert layout.current() == result.version_dir and len(layout.finished_versions()) == versions_before + 1

    build_index(read_catalog(catalogs["final"]), encoder, tmp_path / "rebuilt")
    assert_same_index(ProductIndex.open(out), ProductIndex.open(tmp_path / "rebuilt"), encoder)


def test_a_strict_update_with_a_bad_product_changes_nothing(tmp_path: Path, catalogs: dict[str, Path]) -> None:
    encoder = FixtureEncoder()
    out = tmp_path / "index"
    build_index(read_catalog(catalogs["first"]), encoder, out)
    version = ProductIndex.live_version(out)
    root = catalogs["first"].parent
    (root / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    products = [*read_catalog(catalogs["update"]).products]
    bad = read_catalog(write_jsonl(root / "bad.jsonl", [fixture_product(40, image="images/broken.jpg")])).products
    with pytest.raises(RejectedProductsError, match="product 140: unreadable image") as caught:
        update_index(out, upserts=products + bad, deletes=["100"], encoder=encoder, strict=True)
    assert [e.id for e in caught.value.errors] == ["140"]
    assert ProductIndex.live_version(out) == version and "100" in ProductIndex.open(out)
    # not strict: the good ones go in, the bad one is reported
    result = update_index(out, upserts=products + bad, encoder=encoder)
    assert result.changes["140"] == "failed" and result.changes["124"] == "added"


def test_an_update_refuses_unknown_deletes_and_an_id_both_upserted_and_deleted(tmp_path: Path, catalogs: dict[str, Path]) -> None:
    encoder = FixtureEncoder()
    out = tmp_path / "index"
    build_index(read_catalog(catalogs["first"]), encoder, out)
    version = ProductIndex.live_version(out)
    products = read_catalog(catalogs["update"]).products
    with pytest.raises(UnknownProductsError) as caught:
        update_index(out, upserts=products, deletes=["100", "nope", "nope2"], encoder=encoder)
    assert caught.value.ids == ["nope", "nope2"]
    with pytest.raises(UserError, match="both upserted and deleted in one update: 116"):
        update_index(out, upserts=products, deletes=["116"], encoder=encoder)
    assert ProductIndex.live_version(out) == version


def test_a_named_version_opens_leased_and_a_missing_one_is_an_error(tmp_path: Path, catalogs: dict[str, Path]) -> None:
    encoder = FixtureEncoder()
    out = tmp_path / "index"
    first = build_index(read_catalog(catalogs["first"]), encoder, out).version_dir
    upsert_index(out, read_catalog(catalogs["update"]), encoder)
    with ProductIndex.open(out, version=first.name) as old:
        assert old.version == first.name and old.index_dir == IndexLayout(out).root and len(old) == 24
        delete_from_index(out, ["120"], keep_versions=1)
        assert first.exists()  # leased
    with pytest.raises(UserError, match="does not exist"):
        ProductIndex.open(out, version="20990101T000000000000Z")
    with pytest.raises(UserError, match="not an index version name"):
        ProductIndex.open(out, version="../../etc")


def test_uploads_are_stored_once_by_content(tmp_path: Path) -> None:
    layout = IndexLayout(tmp_path / "index")
    first = layout.store_upload(b"\xff\xd8 photo bytes", "jpeg")
    again = layout.store_upload(b"\xff\xd8 photo bytes", "jpeg")
    other = layout.store_upload(b"\x89PNG other", "png")
    assert first == again != other and first.read_bytes() == b"\xff\xd8 photo bytes"
    assert first.parent == layout.uploads and sorted(p.name for p in layout.uploads.iterdir()) == sorted([first.name, other.name])
    with pytest.raises(ValueError):
        layout.store_upload(b"x", "../jpg")
