"""Attribute backfill into an index: provenance in the store, include_predicted filters, versions, CLI."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from indexer import ProductIndex
from indexer.attributes_cli import register
from indexer.backfill import backfill_index
from indexer.build import delete_from_index, upsert_index
from indexer.layout import IndexLayout
from indexer.store import SqliteProductStore
from tests.support.indexes import build_fixture_index, fixture_product, make_index_catalog
from vitrine.attributes.data import AttributeData
from vitrine.attributes.heads import AttributeHeads
from vitrine.attributes.train import train_heads
from vitrine.catalog import read_catalog
from vitrine.errors import UserError

N = 60
FIELDS = ["baseColour", "gender"]
SPLITS = ("train", "train", "val", "test", "train")  # period 5: every colour (8) and gender (3) meets every split
# Test products whose catalog rows lack a value: the backfill's targets.
NO_GENDER = {i for i in range(N) if i % 5 == 3 and i % 2 == 0}
NO_COLOUR = {i for i in range(N) if i % 5 == 3 and i % 3 != 0}


def _records() -> list[dict]:
    records = []
    for i in range(N):
        record = fixture_product(i, split=SPLITS[i % 5])
        if i in NO_GENDER:
            del record["gender"]
        if i in NO_COLOUR:
            del record["baseColour"]
        records.append(record)
    return records


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("backfill")
    catalog = make_index_catalog(root / "catalog", records=_records())
    fixture = build_fixture_index(root, catalog_dir=catalog)
    products = read_catalog(catalog).products
    with ProductIndex.open(fixture.index_dir) as index:
        title, image = index.vectors([p.id for p in products])
        data = AttributeData.from_products(products, FIELDS, title, image)
    heads = train_heads(data, view="both", fields=FIELDS, bundle_fingerprint=fixture.encoder.fingerprint, c_grid=(1.0, 100.0))
    heads.save(root / "heads")
    return fixture, root / "heads"


@pytest.fixture
def backfilled(built, tmp_path: Path):
    """A fresh copy of the fixture index, backfilled with every prediction."""
    import shutil

    fixture, heads_dir = built
    index_dir = tmp_path / "index"
    shutil.copytree(fixture.index_dir, index_dir)
    before = IndexLayout(index_dir).resolve()
    result = backfill_index(index_dir, AttributeHeads.load(heads_dir))
    return index_dir, before, result, fixture


def _truth(i: int) -> dict[str, str]:
    record = fixture_product(i)
    return {"gender": record["gender"], "baseColour": record["baseColour"]}


def test_backfill_predicts_only_missing_values_with_provenance_in_a_new_version(backfilled):
    index_dir, before, result, _ = backfilled
    assert result.missing == {"baseColour": len(NO_COLOUR), "gender": len(NO_GENDER)}
    assert result.predicted == result.missing and result.version != before
    with ProductIndex.open(index_dir) as index:
        assert index.manifest["build"]["operation"] == "backfill"
        right = 0
        for i in range(N):
            record = index.get(str(100 + i))
            lacking = {f for f, gap in (("gender", NO_GENDER), ("baseColour", NO_COLOUR)) if i in gap}
            assert set(record.predicted) == lacking
            for name, predicted in record.predicted.items():
                assert name not in record.attributes  # the catalog's values are never overwritten
                assert 0.0 < predicted["confidence"] <= 1.0
                right += predicted["value"].lower() == _truth(i)[name].lower()
        assert right >= 0.7 * sum(result.predicted.values())  # colour and gender are in the titles
    with SqliteProductStore(before / "products.sqlite") as old:  # the previous version is untouched
        assert not any(record.predicted for _, record in old.scan())


def test_include_predicted_filters_read_backfilled_values_only_when_asked(backfilled):
    index_dir, _, _, fixture = backfilled
    with ProductIndex.open(index_dir) as index:
        ids = index.ids()
        records = dict(zip(ids, index.get_many(ids)))
        query = fixture.encoder.encode_texts(["men"])[0]
        for gender in ("Men", "Women", "Unisex"):
            catalog_only = {i for i, r in records.items() if r.attributes.get("gender") == gender}
            with_predicted = catalog_only | {i for i, r in records.items() if r.predicted.get("gender", {}).get("value") == gender}
            assert with_predicted > catalog_only or not any(r.predicted for r in records.values())
            filters = {"gender": gender.lower()}
            assert {h.id for h in index.search(query, k=N, filters=filters)} == catalog_only
            assert {h.id for h in index.search(query, k=N, filters=filters, include_predicted=True)} == with_predicted
            mask = index.filter_mask(filters, include_predicted=True)
            assert {ids[i] for i in np.flatnonzero(mask)} == with_predicted
        # Several fields: each may be met by a catalog or a predicted value.
        both = {"gender": "Men", "baseColour": ["red", "blue"]}
        expected = {i for i, r in records.items()
                    if r.attribute_or_predicted("gender") == "Men" and r.attribute_or_predicted("baseColour").lower() in ("red", "blue")}  # fmt: skip
        assert {h.id for h in index.search(query, k=N, filters=both, include_predicted=True)} == expected


def test_upsert_drops_a_replaced_products_predictions_and_delete_removes_them(backfilled, tmp_path):
    index_dir, _, _, fixture = backfilled
    gap = min(NO_GENDER)
    other = sorted(NO_GENDER)[1]
    changed = fixture_product(gap, title=f"Men classic red Tshirts no {gap} changed", split="test")
    del changed["gender"]
    catalog = make_index_catalog(tmp_path / "upsert", records=[changed])
    upsert_index(index_dir, read_catalog(catalog), fixture.encoder)
    with ProductIndex.open(index_dir) as index:
        assert index.get(str(100 + gap)).predicted == {}  # its old predictions described the old record
        assert "gender" in index.get(str(100 + other)).predicted  # the unchanged keep theirs
    delete_from_index(index_dir, [str(100 + other)])
    with ProductIndex.open(index_dir) as index:
        rows = index.store._db.execute("SELECT count(*) FROM predicted_attributes WHERE id = ?", (str(100 + other),)).fetchone()
        assert rows[0] == 0


def test_confidence_floor_and_bundle_mismatch(built, tmp_path):
    import shutil

    fixture, heads_dir = built
    index_dir = tmp_path / "index"
    shutil.copytree(fixture.index_dir, index_dir)
    heads = AttributeHeads.load(heads_dir)
    none = backfill_index(index_dir, heads, min_confidence={"gender": float("inf"), "baseColour": 0.0})
    assert none.predicted["gender"] == 0 and none.withheld["gender"] == len(NO_GENDER)
    assert none.predicted["baseColour"] == len(NO_COLOUR)
    heads.bundle_fingerprint = "another-bundle"
    live = IndexLayout(index_dir).resolve()
    with pytest.raises(UserError, match="another-bundle"):
        backfill_index(index_dir, heads)
    assert IndexLayout(index_dir).resolve() == live  # nothing was published


def test_store_refuses_predictions_over_catalog_values(tmp_path):
    from vitrine.catalog.record import ProductRecord

    store = SqliteProductStore.create(tmp_path / "s.sqlite")
    store.put_many([ProductRecord("1", "t", "c", "s", "", {"gender": "Men"}, "img")])
    with pytest.raises(ValueError, match="catalog value"):
        store.put_predicted([("1", "gender", "Women", 0.9)])
    with pytest.raises(KeyError):
        store.put_predicted([("2", "gender", "Women", 0.9)])
    store.put_predicted([("1", "baseColour", "Red", 0.75)])
    assert store.get("1").predicted == {"baseColour": {"value": "Red", "confidence": 0.75}}


def test_a_store_written_before_backfill_reads_without_predictions(tmp_path):
    import sqlite3

    from vitrine.catalog.record import ProductRecord

    path = tmp_path / "old.sqlite"
    with SqliteProductStore.create(path) as store:
        store.put_many([ProductRecord("1", "t", "c", "s", "", {"gender": "Men"}, "img")])
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE predicted_attributes")
    db.close()
    with SqliteProductStore(path) as old:
        assert old.get("1").predicted == {} and [r.predicted for _, r in old.scan()] == [{}]


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_train_eval_predict(built, tmp_path, capsys):
    import shutil

    fixture, _ = built
    index_dir = tmp_path / "index"
    shutil.copytree(fixture.index_dir, index_dir)
    heads = tmp_path / "heads"
    catalog = str(fixture.catalog_dir)
    assert _cli("attributes", "train", "--catalog", catalog, "--index", str(index_dir), "--out", str(heads),
                "--fields", *FIELDS, "--view", "title", "--c-grid", "10") == 0  # fmt: skip
    assert "gender: 3 values" in capsys.readouterr().out
    assert _cli("attributes", "eval", "--heads", str(heads), "--catalog", catalog, "--index", str(index_dir), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["view"] == "title" and set(report["fields"]) == set(FIELDS)
    assert {"recall", "coverage", "threshold"} <= set(report["fields"]["gender"]["calibrated"]["r@p90"])
    assert _cli("attributes", "predict", "--heads", str(heads), "--index", str(index_dir), "--json") == 0
    written = json.loads(capsys.readouterr().out)
    assert written["missing"] == {"baseColour": len(NO_COLOUR), "gender": len(NO_GENDER)}
    with pytest.raises(UserError, match="no attribute heads"):
        _cli("attributes", "predict", "--heads", str(tmp_path), "--index", str(index_dir))


def test_qdrant_serves_include_predicted_filters_as_faiss_does(backfilled):
    from indexer import QdrantEngine, QdrantIndex

    index_dir, _, _, fixture = backfilled
    with QdrantIndex.open(index_dir, engine=QdrantEngine.embedded(":memory:")) as qdrant, ProductIndex.open(index_dir) as faiss:
        for text in ("men", "red shoes", "women tshirts"):
            query = fixture.encoder.encode_texts([text])[0]
            for filters in ({"gender": "Men"}, {"baseColour": ["Red", "Blue"]}, {"gender": "Women", "baseColour": "Red"}):
                for predicted in (False, True):
                    q = qdrant.search(query, k=8, filters=filters, include_predicted=predicted)
                    f = faiss.search(query, k=8, filters=filters, include_predicted=predicted)
                    assert q == f, (text, filters, predicted)
            np.testing.assert_array_equal(qdrant.filter_mask({"gender": "Men"}, include_predicted=True),
                                          faiss.filter_mask({"gender": "Men"}, include_predicted=True))  # fmt: skip
        # predicted values widen the filtered set: products the catalog leaves without a gender now match
        assert qdrant.filter_mask({"gender": "Men"}, include_predicted=True).sum() > qdrant.filter_mask({"gender": "Men"}).sum()
