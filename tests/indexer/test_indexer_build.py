"""Building: bad products reported and skipped, index types, the store, and no torch on the serving side."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer import ProductIndex, faiss_index
from indexer.build import build_index
from indexer.store import ProductRecord, ProductStore, SqliteProductStore, StoredProduct
from tests.support.catalogs import write_corrupt_jpeg
from tests.support.indexes import FixtureEncoder, build_fixture_index, fixture_product, make_index_catalog
from vitrine.catalog import BytesImage, Product, read_catalog
from vitrine.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def test_bad_products_are_reported_and_skipped(tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    records = [fixture_product(i) for i in range(10)]
    records[3]["image"] = "images/missing.jpg"  # catalog level: missing image
    records[5]["title"] = "   "  # catalog level: empty title
    records.append(fixture_product(1, title="A duplicate"))  # catalog level: duplicate id
    make_index_catalog(root, records=records)
    (root / "images" / "missing.jpg").unlink()
    write_corrupt_jpeg(root / "images" / "107.jpg")  # found while embedding
    (root / "images" / "108.jpg").write_bytes(b"not a jpeg at all")

    result = build_index(read_catalog(root), FixtureEncoder(), tmp_path / "index")
    index = ProductIndex.open(tmp_path / "index")
    assert sorted(index.ids()) == ["100", "101", "102", "104", "106", "109"]
    errors = {e["id"]: e for e in index.manifest["errors"]}
    assert set(errors) == {"107", "108"} and {e["stage"] for e in errors.values()} == {"image"}
    assert "107.jpg" in errors["107"]["message"] and result.operation.errors == 2
    problems = index.manifest["catalog"]["report"]["problems"]
    assert {kind: p["count"] for kind, p in problems.items()} == {"missing_image": 1, "empty_title": 1, "duplicate_id": 1}
    assert index.manifest["counts"] == {"products": 6, "text_vectors": 6, "image_vectors": 6, "errors": 2, "next_label": 6}
    assert "107" in result.summary() and "failed" in result.summary()


class PoisonEncoder(FixtureEncoder):
    """Returns NaN for titles containing 'poison'."""

    def encode_texts(self, texts):
        out = super().encode_texts(texts)
        out[[i for i, t in enumerate(texts) if "poison" in t]] = np.nan
        return out


def test_programmatic_products_duplicates_and_non_finite_embeddings(tmp_path: Path) -> None:
    catalog = read_catalog(make_index_catalog(tmp_path / "catalog", 4)).products
    extra = [
        Product("900", "poison red top", (catalog[0].image,)),
        Product("901", "garbage image", (BytesImage(b"\x00garbage", name="upload"),)),
        Product("100", "duplicate of the first", (catalog[0].image,)),
    ]
    result = build_index([*catalog, *extra], PoisonEncoder(), tmp_path / "index")
    stages = {e.id: e.stage for e in result.errors}
    assert stages == {"900": "embedding", "901": "image", "100": "record"}
    index = ProductIndex.open(tmp_path / "index")
    assert sorted(index.ids()) == ["100", "101", "102", "103"] and index.manifest["catalog"] is None
    assert index.get("100").title == catalog[0].title


def test_nothing_indexable_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    root = make_index_catalog(tmp_path / "catalog", 2)
    for path in (root / "images").iterdir():
        path.write_bytes(b"broken")
    with pytest.raises(UserError, match="none of the 2 products could be indexed"):
        build_index(read_catalog(root), FixtureEncoder(), tmp_path / "index")
    assert not (tmp_path / "index" / "CURRENT").exists()
    with pytest.raises(UserError, match="no products"):
        build_index([], FixtureEncoder(), tmp_path / "index")


@pytest.mark.parametrize(
    ("index_type", "factory", "removal", "exact"),
    [
        ("auto", "IDMap2,Flat", "remove_ids", True),
        ("flat", "IDMap2,Flat", "remove_ids", True),
        ("hnsw", "IDMap2,HNSW32,Flat", "rebuild", False),
        ("Flat", "IDMap2,Flat", "remove_ids", True),
        ("HNSW16,Flat", "IDMap2,HNSW16,Flat", "rebuild", False),
        ("IVF4,Flat", "IVF4,Flat", "remove_ids", False),  # IVF takes labels natively: never inside an IDMap
        ("PCA64,Flat", "IDMap2,PCA64,Flat", "remove_ids", False),
        ("IDMap2,HNSW8,Flat", "IDMap2,HNSW8,Flat", "rebuild", False),
    ],
)
def test_index_types_resolve_to_factory_strings(index_type: str, factory: str, removal: str, exact: bool) -> None:
    spec = faiss_index.resolve_spec(index_type, 1_000, 128)
    assert (spec.factory, spec.removal, spec.exact) == (factory, removal, exact)


def test_auto_and_ivfpq_by_size() -> None:
    assert faiss_index.resolve_spec("auto", 50_000, 256).type == "flat"
    assert faiss_index.resolve_spec("auto", 500_000, 256).type == "hnsw"
    big = faiss_index.resolve_spec("auto", 4_000_000, 256)
    assert big.type == "ivfpq" and big.factory == "IVF8000,PQ64np" and big.search == {"nprobe": 200}  # 1/40 of the lists
    with pytest.raises(UserError, match="ivfpq needs at least 1,000 products"):
        faiss_index.resolve_spec("ivfpq", 32, 256)
    with pytest.raises(UserError, match="invalid index type 'Bogus42'"):
        faiss_index.resolve_spec("Bogus42", 100, 64)


@pytest.mark.parametrize("index_type", ["ivfpq", "IVF8,Flat", "PCA16,HNSW8,Flat", "HNSW32,Flat"])
def test_non_flat_indexes_find_labels_and_update_consistently(index_type: str) -> None:
    """Label handling of each kind: search returns our labels, and updates keep them right."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1_200, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = np.arange(1_200, dtype=np.int64) * 7 + 3  # not row numbers
    spec = faiss_index.resolve_spec(index_type, len(vectors), 32)
    index = faiss_index.build(spec, vectors, labels)
    for row in (0, 599, 1_199):
        assert labels[row] in faiss_index.search(spec, index, vectors[row], 5)
    # replace rows 0..9 with new vectors, delete rows 10..19, add two new labels
    new = rng.standard_normal((12, 32)).astype(np.float32)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    add_labels = np.concatenate([labels[:10], [9_000_001, 9_000_002]]).astype(np.int64)
    keep = np.ones(1_200, bool)
    keep[10:20] = False
    all_vectors = np.concatenate([new[:10], vectors[20:], new[10:]])
    all_labels = np.concatenate([labels[:10], labels[20:], add_labels[10:]])
    index = faiss_index.update(
        spec, index, remove=labels[:20], add_vectors=new, add_labels=add_labels,
        all_vectors=all_vectors, all_labels=all_labels,
    )  # fmt: skip
    assert index.ntotal == 1_192
    for vector, label in zip(new, add_labels):
        assert label in faiss_index.search(spec, index, vector, 5)
    found = np.concatenate([faiss_index.search(spec, index, v, 10) for v in vectors[10:20]])
    assert not np.isin(found, labels[10:20]).any()  # deleted labels are gone


def test_store_protocol_and_stable_labels(tmp_path: Path) -> None:
    store = SqliteProductStore.create(tmp_path / "s.sqlite")
    assert isinstance(store, ProductStore)
    rec = ProductRecord("a", "Red top", "Topwear", "Tops", "", {"gender": "Women"}, "/img/a.jpg")
    labels = store.put_many([rec, ProductRecord("b", "Blue jeans", "", "", "", {}, "/img/b.jpg")])
    assert labels.tolist() == [0, 1] and len(store) == 2 and "a" in store and "z" not in store
    changed = ProductRecord("a", "Red top v2", "Topwear", "Tops", "", {"gender": "Women"}, "/img/a.jpg")
    assert store.put_many([StoredProduct(changed, {"kind": "none"}, "h"), ProductRecord("c", "C", "", "", "", {}, "")]).tolist() == [0, 2]
    assert store.get("a").title == "Red top v2" and store.get("zz") is None
    assert store.delete(["b", "nope"]) == 1
    assert store.put_many([ProductRecord("b", "Back again", "", "", "", {}, "")]).tolist() == [3]  # labels never reused
    assert [r.id if r else None for r in store.get_many(["c", "x", "a"])] == ["c", None, "a"]
    store.close()
    reader = SqliteProductStore(tmp_path / "s.sqlite")
    with pytest.raises(PermissionError):
        reader.delete(["a"])
    assert [label for label, _ in reader.scan()] == [0, 2, 3]
    (tmp_path / "junk.sqlite").write_bytes(b"not sqlite" * 100)
    with pytest.raises(UserError, match="not a Vitrine product store"):
        SqliteProductStore(tmp_path / "junk.sqlite")


def test_hnsw_fixture_index_searches(tmp_path: Path) -> None:
    fixture = build_fixture_index(tmp_path, n=16, index_type="hnsw")
    index = ProductIndex.open(fixture.index_dir)
    assert index.manifest["index"]["search"] == {"efSearch": 64}
    photo = read_catalog(fixture.catalog_dir).products[7].image.open()
    assert index.search(fixture.encoder.encode_images([photo])[0], k=1)[0].id == "107"


def test_titles_encoded_in_groups_stay_aligned_with_their_products(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vitrine import embed

    monkeypatch.setattr(embed, "TEXT_GROUP", 5)  # several groups, not aligned with batches of 3
    products = read_catalog(make_index_catalog(tmp_path / "catalog", 17)).products
    products.insert(6, Product("bad", "garbage image", (BytesImage(b"nope"),)))
    encoder = PoisonEncoder()
    products.insert(11, Product("poisoned", "poison pill", (products[0].image,)))
    result = embed.ProductEmbedder(encoder, batch_size=3, threads=2).embed(products)
    assert [e.id for e in result.errors] == ["bad", "poisoned"]
    assert [p.id for p in result.products] == [p.id for p in products if p.id not in ("bad", "poisoned")]
    np.testing.assert_array_equal(result.text, encoder.encode_texts([p.title for p in result.products]))
    np.testing.assert_array_equal(result.image, encoder.encode_images([p.image.open() for p in result.products]))
