"""The BM25 lexical index of each index version: tokens, search with filters, and upsert / delete."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from indexer import ProductIndex
from indexer.build import build_index, update_index
from indexer.layout import IndexLayout
from indexer.lexical import LEXICAL_DIR, LexicalIndex, document_text, tokenize
from tests.support.indexes import FixtureEncoder, build_fixture_index, fixture_product, make_index_catalog
from vitrine.catalog import read_catalog
from vitrine.catalog.record import ProductRecord


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Puma Men Black Sports Shoes", ["puma", "men", "black", "sport", "shoe"]),
        ("PUMA  puma", ["puma", "puma"]),
        ("U.S. Polo Assn. Men's Shirt", ["us", "polo", "assn", "men", "shirt"]),
        ("Jack & Jones T-Shirt", ["jack", "jone", "tshirt", "t", "shirt"]),
        ("Levi's Café", ["levi", "cafe"]),
        ("shoes for the beach", ["shoe", "beach"]),
        ("   ", []),
    ],
)
def test_tokens_fold_case_join_brands_and_stem(text, tokens):
    assert tokenize(text) == tokens


def test_a_document_is_the_title_category_and_attribute_values():
    product = ProductRecord("1", "Lee Cooper Men Brown Shoes", "Footwear", "Shoes", "",
                            {"gender": "Men", "articleType": "Casual Shoes", "baseColour": "Brown"}, "")  # fmt: skip
    assert document_text(product) == "Lee Cooper Men Brown Shoes Footwear Shoes Casual Shoes Brown Men"


@pytest.fixture
def fixture(tmp_path: Path):
    return build_fixture_index(tmp_path, n=32)


def test_the_build_writes_the_lexical_index_into_the_version(fixture):
    with ProductIndex.open(fixture.index_dir) as index:
        entry = index.manifest["lexical"]
        assert entry["library"] == "bm25s" and entry["documents"] == len(index) == 32
        assert (index.version_dir / LEXICAL_DIR / "ids.json").is_file()
        assert index.lexical.ids.tolist() == index.ids()  # rows in label order, as the vectors


def test_lexical_search_ranks_exact_words_first_and_filters(fixture):
    with ProductIndex.open(fixture.index_dir) as index:
        hits = index.lexical_search("no 7", k=5)
        assert hits[0].id == "107"  # "7" is in one title only
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        tees = index.lexical_search("TSHIRTS", k=32)
        assert {h.id for h in tees} == {i for i in index.ids() if index.get(i).attributes["articleType"] == "Tshirts"}
        women = index.lexical_search("tshirts", k=32, filters={"gender": "women"})
        assert women and {h.id for h in women} == {h.id for h in tees if index.get(h.id).attributes["gender"] == "Women"}
        assert index.lexical_search("zzzz", k=5) == []  # no token matches: nothing, not random products
        with pytest.raises(Exception, match="unknown filter field"):
            index.lexical_search("tshirts", k=5, filters={"brand": "x"})


def test_upsert_and_delete_update_the_lexical_index_atomically(fixture):
    root = fixture.catalog_dir
    records = [fixture_product(i) for i in range(32)]
    records[3] = fixture_product(3, title="Zephyrine Women Red Tshirts")  # a brand no other title has
    records.append(fixture_product(40, title="Quillon Men Blue Jeans"))
    make_index_catalog(root, records=records)
    old = ProductIndex.open(fixture.index_dir)  # leased: pruning keeps it
    update_index(fixture.index_dir, upserts=read_catalog(root), encoder=fixture.encoder)
    update_index(fixture.index_dir, deletes=["105"])
    with ProductIndex.open(fixture.index_dir) as index:
        assert [h.id for h in index.lexical_search("zephyrine", k=3)] == ["103"]
        assert [h.id for h in index.lexical_search("quillon jeans", k=1)] == ["140"]
        assert "105" not in {h.id for h in index.lexical_search("no 5", k=40)}
        assert index.lexical_search("no 3", k=40)[0].id != "103"  # its old title is gone
        assert index.lexical.ids.tolist() == index.ids()
        updated = {q: index.lexical_search(q, k=10) for q in ("red tshirts", "women jeans", "no 12", "quillon")}
    with old:  # the previous version never changed
        assert old.lexical_search("zephyrine", k=3) == [] and "105" in {h.id for h in old.lexical_search("no 5", k=3)}
    # The same scores as a version built from scratch from the final catalog.
    final = [r for r in records if r["id"] != "105"]
    make_index_catalog(root, records=final)
    build_index(read_catalog(root), FixtureEncoder(), root.parent / "fresh", threads=2)
    with ProductIndex.open(root.parent / "fresh") as fresh:
        for query, hits in updated.items():
            assert fresh.lexical_search(query, k=10) == hits, query


def test_a_version_without_a_lexical_index_builds_one_in_memory(fixture, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(fixture.index_dir, copy)
    version = IndexLayout(copy).current()
    shutil.rmtree(version / LEXICAL_DIR)
    manifest = json.loads((version / "manifest.json").read_text())
    del manifest["lexical"]
    (version / "manifest.json").write_text(json.dumps(manifest))
    with ProductIndex.open(fixture.index_dir) as built, ProductIndex.open(copy) as old:
        for query in ("red tshirts", "no 9", "men bags"):
            assert old.lexical_search(query, k=8) == built.lexical_search(query, k=8)


def test_an_empty_corpus_and_an_empty_query_find_nothing():
    assert LexicalIndex.build([]).search("red", k=3) == []
    index = LexicalIndex.build([ProductRecord("a", "Red Shoes", "", "", "", {}, "")])
    assert index.search("the", k=3) == [] and [h.id for h in index.search("red", k=3)] == ["a"]
