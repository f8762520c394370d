"""Catalog readers: mapping to Product, the report of skipped rows, and non-catalog errors."""
from __future__ import annotations

import collections
import json
import pickle

import numpy as np
import pytest

from tests.support.catalogs import (
    FashionGenRow,
    make_fashiongen_catalog,
    make_flawed_jsonl_catalog,
    make_jsonl_catalog,
    make_kaggle_catalog,
    make_non_catalogs,
    myntra_record,
    write_fashiongen_h5,
    write_jpeg,
    write_jsonl,
)
from vitrine.catalog import H5Image, detect_format, fashiongen, iter_products, read_catalog
from vitrine.catalog.product import FileImage, ImageRef
from vitrine.catalog.report import CatalogReport, decode_text, normalize_split
from vitrine.errors import CatalogFormatError


def problem_rows(report: CatalogReport) -> dict[str, list[int]]:
    return {kind: [e.row for e in tally.examples] for kind, tally in report.problems.items()}


# --- JSONL -----------------------------------------------------------------------------


def test_jsonl_maps_fields_to_product(tmp_path):
    root = make_jsonl_catalog(tmp_path / "cat", n=4)
    catalog = read_catalog(root)
    assert catalog.format == "jsonl" and len(catalog) == 4
    product = catalog.products[1]
    assert product.id == "1001"
    assert product.title == "Product 1001 Casual Shoes"
    assert (product.category, product.subcategory) == ("Shoes", "Casual Shoes")
    assert product.split == "train"
    assert product.images == (FileImage(root / "images" / "1001.jpg"),)
    assert product.image.open().size == (24, 32)
    assert product.attributes == {
        "gender": "Women", "masterCategory": "Apparel", "subCategory": "Shoes", "articleType": "Casual Shoes",
        "baseColour": "Red", "season": "Summer", "year": "2012", "usage": "Casual",
    }  # fmt: skip
    assert [p.split for p in catalog] == ["train", "train", "val", "test"]
    assert catalog.report.ok and catalog.report.rows_seen == 4


def test_jsonl_file_path_and_folder_read_alike(tmp_path):
    root = make_jsonl_catalog(tmp_path / "cat", n=3)
    from_folder = read_catalog(root)
    from_file = read_catalog(root / "products.jsonl", format="jsonl")
    assert [p.id for p in from_folder] == [p.id for p in from_file] == ["1000", "1001", "1002"]


def test_jsonl_skips_empty_attributes_and_keeps_numbers_as_text(tmp_path):
    write_jpeg(tmp_path / "images" / "9.jpg")
    record = myntra_record("9", "Plain Tee", season="", usage=None, year=2014, description="Soft.")
    write_jsonl(tmp_path / "products.jsonl", [record])
    (product,) = read_catalog(tmp_path).products
    assert "season" not in product.attributes and "usage" not in product.attributes
    assert product.attributes["year"] == "2014"
    assert "width" not in product.attributes and "image" not in product.attributes
    assert product.description == "Soft."


def test_flawed_jsonl_reports_every_skipped_row(tmp_path):
    flawed = make_flawed_jsonl_catalog(tmp_path / "cat")
    catalog = read_catalog(flawed.path, check_images=True)
    report = catalog.report
    assert [p.id for p in catalog] == flawed.good_ids
    assert problem_rows(report) == flawed.problems
    assert {k: t.count for k, t in report.problems.items()} == {k: len(v) for k, v in flawed.problems.items()}
    assert report.rows_seen == flawed.rows
    assert report.products + report.skipped == report.rows_seen
    assert not report.ok
    # the first of two rows with id 1 is kept
    assert catalog.products[0].title == "Red Cotton Top"
    examples = {e.row: e for t in report.problems.values() for e in t.examples}
    assert examples[7].id == "1" and "duplicate" in examples[7].message
    assert examples[5].id == "4" and "4.jpg" in examples[5].message
    assert examples[6].id == "5" and "5.jpg" in examples[6].message
    assert "invalid JSON" in examples[3].message
    assert "'id'" in examples[9].message and "'image'" in examples[12].message
    # absolute image path and "validation" -> "val"
    seven = catalog.products[2]
    assert seven.split == "val" and seven.image.path.is_absolute() and seven.description == "Ankle boots."


def test_corrupt_images_are_only_found_when_decoding(tmp_path):
    flawed = make_flawed_jsonl_catalog(tmp_path / "cat")
    catalog = read_catalog(flawed.path)
    assert "corrupt_image" not in catalog.report.problems
    assert [p.id for p in catalog] == ["1", "2", "5", "7"]
    assert not catalog.report.images_decoded
    assert catalog.report.products + catalog.report.skipped == flawed.rows


def test_examples_are_capped_but_counts_are_not(tmp_path):
    write_jsonl(tmp_path / "products.jsonl", [myntra_record(str(i), f"Item {i}") for i in range(8)])
    report = read_catalog(tmp_path).report
    tally = report.problems["missing_image"]
    assert tally.count == 8 and [e.row for e in tally.examples] == [1, 2, 3, 4, 5]
    assert "... and 3 more" in report.format_text()


def test_split_filter_limit_and_by_split(tmp_path):
    root = make_jsonl_catalog(tmp_path / "cat", n=8)
    catalog = read_catalog(root)
    assert [p.id for p in catalog.by_split("train")] == ["1000", "1001", "1004", "1005"]
    assert [p.id for p in catalog.by_split("validation")] == ["1002", "1006"]
    assert catalog.splits() == {"train": 4, "val": 2, "test": 2}

    val = read_catalog(root, split="val")
    assert [p.id for p in val] == ["1002", "1006"]
    assert val.report.rows_excluded == 6 and val.report.accounted()

    for check_images in (False, True):
        limited = read_catalog(root, limit=3, check_images=check_images)
        assert [p.id for p in limited] == ["1000", "1001", "1002"]
        assert limited.report.rows_seen == 3 and limited.report.accounted()


def test_image_root_overrides_the_file_folder(tmp_path):
    write_jsonl(tmp_path / "meta" / "products.jsonl", [myntra_record("1", "Hat")])
    write_jpeg(tmp_path / "pics" / "images" / "1.jpg")
    assert read_catalog(tmp_path / "meta").report.problem_count("missing_image") == 1
    catalog = read_catalog(tmp_path / "meta", image_root=tmp_path / "pics", check_images=True)
    assert catalog.report.ok and catalog.products[0].image.path == tmp_path / "pics" / "images" / "1.jpg"


def test_iter_products_streams_and_fills_the_report(tmp_path):
    flawed = make_flawed_jsonl_catalog(tmp_path / "cat")
    report = CatalogReport(source="x", format="")
    products = iter_products(flawed.path, check_images=True, report=report)
    first = next(products)
    assert first.id == "1" and report.rows_seen >= 1
    rest = list(products)
    assert [p.id for p in [first, *rest]] == flawed.good_ids
    assert report.format == "jsonl" and report.accounted()


def test_non_utf8_jsonl_line_is_decoded(tmp_path):
    write_jpeg(tmp_path / "images" / "1.jpg")
    line = json.dumps(myntra_record("1", "Cafe Top"), ensure_ascii=False).replace("Cafe", "Caf\xe9")
    (tmp_path / "products.jsonl").write_bytes(line.encode("cp1252") + b"\n")
    assert read_catalog(tmp_path).products[0].title == "Café Top"


# --- Kaggle ----------------------------------------------------------------------------


def test_kaggle_styles_csv(tmp_path):
    flawed = make_kaggle_catalog(tmp_path / "kaggle")
    assert detect_format(flawed.path) == "kaggle"
    catalog = read_catalog(flawed.path, check_images=True)
    assert [p.id for p in catalog] == flawed.good_ids
    titles = {p.id: p.title for p in catalog}
    assert titles["12345"] == "Lino Perros Women Black, Brown Handbag"
    assert titles["23456"] == "Puma Men, White, Sneakers"
    assert titles["45678"] == "Quoted, Title Top"
    assert titles["15970"] == "Turtle Check Men Navy Blue Shirt"  # not the later duplicate
    shoes = catalog.products[3]
    assert (shoes.category, shoes.subcategory, shoes.split) == ("Shoes", "Casual Shoes", None)
    assert shoes.attributes["baseColour"] == "White" and "year" not in shoes.attributes
    assert shoes.image.path == flawed.path / "images" / "23456.jpg"
    assert problem_rows(catalog.report) == flawed.problems
    assert "expected 10 fields, got 3" in catalog.report.problems["malformed_row"].examples[0].message
    assert catalog.report.rows_seen == flawed.rows and catalog.report.accounted()


def test_kaggle_csv_under_another_name_with_explicit_format(tmp_path):
    flawed = make_kaggle_catalog(tmp_path / "kaggle")
    renamed = flawed.path / "myntra.csv"
    renamed.write_bytes((flawed.path / "styles.csv").read_bytes())
    catalog = read_catalog(renamed, format="kaggle")
    assert [p.id for p in catalog] == flawed.good_ids


# --- Fashion-Gen -----------------------------------------------------------------------


def test_fashiongen_groups_rows_into_products(tmp_path):
    flawed = make_fashiongen_catalog(tmp_path / "fg")
    catalog = read_catalog(flawed.path)
    assert catalog.format == "fashiongen"
    assert [p.id for p in catalog] == flawed.good_ids
    jacket, scarf, dress = catalog.products
    train = (flawed.path / "fashiongen_256_256_train.h5").absolute()
    assert jacket.images == (H5Image(train, 0), H5Image(train, 2))
    assert scarf.images == (H5Image(train, 1), H5Image(train, 5))
    assert jacket.title == "Black Leather Jacket"
    assert jacket.description == "Café leather, lined."  # cp1252 byte decoded
    assert (jacket.category, jacket.subcategory) == ("JACKETS & COATS", "LEATHER JACKETS")
    assert (jacket.split, dress.split) == ("train", "val")
    assert dress.title == "Crêpe Dress"
    report = catalog.report
    assert problem_rows(report) == flawed.problems
    assert report.rows_seen == flawed.rows and report.rows_merged == 2 and report.accounted()
    assert report.files == ["fashiongen_256_256_train.h5", "fashiongen_256_256_validation.h5"]
    assert "fashiongen_256_256_train.h5 row 4" in report.format_text()


def test_fashiongen_images_open_lazily_with_right_pixels(tmp_path):
    flawed = make_fashiongen_catalog(tmp_path / "fg")
    catalog = read_catalog(flawed.path / "fashiongen_256_256_train.h5", check_images=True)
    assert catalog.report.images_decoded and catalog.report.problem_count("corrupt_image") == 0
    scarf = catalog.products[1]
    pixels = [np.asarray(ref.open()) for ref in scarf.images]
    assert all(p.shape == (256, 256, 3) and p.dtype == np.uint8 for p in pixels)
    assert tuple(pixels[0][5, 5]) == (200, 0, 0) and tuple(pixels[1][5, 5]) == (0, 0, 200)
    assert pickle.loads(pickle.dumps(scarf.images[1])) == scarf.images[1]
    assert isinstance(scarf.images[0], ImageRef)


def test_h5_handle_is_reopened_in_a_new_process(tmp_path, monkeypatch):
    path = write_fashiongen_h5(tmp_path / "a.h5", [FashionGenRow(b"1", b"Hat")], side=8)
    ref = H5Image(path, 0)
    ref.open()
    parent_handle = fashiongen._handles[str(path)][1]
    monkeypatch.setattr(fashiongen.os, "getpid", lambda: -1)
    assert ref.open().size == (8, 8)
    assert fashiongen._handles[str(path)][1] is not parent_handle


def test_fashiongen_numeric_product_ids(tmp_path):
    import h5py

    path = tmp_path / "fashiongen_256_256_validation.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("input_image", data=np.zeros((3, 4, 4, 3), np.uint8))
        f.create_dataset("input_productID", data=np.array([[7], [8], [7]], dtype=np.int64))
        f.create_dataset("input_name", data=np.array([[b"A"], [b"B"], [b"A"]]))
    catalog = read_catalog(path)
    assert [(p.id, len(p.images), p.split, p.category) for p in catalog] == [("7", 2, "val", ""), ("8", 1, "val", "")]


# --- not catalogs ----------------------------------------------------------------------

NON_CATALOG_KINDS = [
    "unknown extension", "png", "png named .jsonl", "empty jsonl", "garbage jsonl",
    "csv without the header", "empty csv", "garbage h5", "h5 without the datasets",
    "empty folder", "missing path",
]  # fmt: skip


@pytest.mark.parametrize("kind", NON_CATALOG_KINDS)
def test_non_catalogs_raise_one_clear_error(tmp_path, kind):
    path = make_non_catalogs(tmp_path)[kind]
    with pytest.raises(CatalogFormatError) as info:
        read_catalog(path)
    assert path.name in str(info.value)


@pytest.mark.parametrize("format", ["jsonl", "kaggle", "fashiongen"])
def test_explicit_format_on_the_wrong_file_raises(tmp_path, format):
    png = make_non_catalogs(tmp_path)["png"]
    with pytest.raises(CatalogFormatError):
        read_catalog(png, format=format)


def test_unknown_format_name_raises(tmp_path):
    root = make_jsonl_catalog(tmp_path, n=1)
    with pytest.raises(CatalogFormatError, match="unknown catalog format"):
        read_catalog(root, format="parquet")


# --- helpers ---------------------------------------------------------------------------


def test_decode_text_and_split_names():
    assert decode_text(b"caf\xc3\xa9 \x00") == "café"
    assert decode_text(b"caf\xe9") == "café"
    assert decode_text(b"\x81\x8d") == "\x81\x8d"  # undefined in cp1252: latin-1
    assert [normalize_split(s) for s in ("Validation", "train", "", None)] == ["val", "train", None, None]


def test_report_to_dict_is_json(tmp_path):
    flawed = make_flawed_jsonl_catalog(tmp_path / "cat")
    data = json.loads(json.dumps(read_catalog(flawed.path, check_images=True).report.to_dict()))
    assert data["ok"] is False and data["products"] == 3 and data["skipped"] == 8
    assert data["problems"]["missing_image"]["examples"][0]["row"] == 5
    assert list(data["problems"]) == ["malformed_row", "empty_title", "duplicate_id", "missing_image", "corrupt_image"]


# --- the shared catalog ----------------------------------------------------------------


@pytest.mark.integration
def test_full_shared_catalog(fashion_products):
    catalog = read_catalog(fashion_products)
    report = catalog.report
    assert report.ok, report.format_text()
    assert len(catalog) == report.rows_seen == 21_100
    assert report.splits == {"train": 16_237, "val": 2_371, "test": 2_492}
    assert len({p.id for p in catalog}) == 21_100
    assert all(p.category and p.subcategory for p in catalog)


def test_a_catalog_without_splits_gets_deterministic_hashed_splits(tmp_path):
    from vitrine.catalog.splits import HASHED_SPLITS_NOTE, hashed_split

    root = make_kaggle_catalog(tmp_path / "kaggle").path
    catalog = read_catalog(root)
    assert catalog.products and all(p.split in ("train", "val", "test") for p in catalog.products)
    assert all(p.split == hashed_split(p.id) for p in catalog.products)
    assert catalog.report.hashed_splits >= len(catalog.products)  # rows: skipped ones count too
    assert HASHED_SPLITS_NOTE in catalog.report.format_text()
    assert {p.id for p in catalog.by_split("train")} == {p.id for p in catalog.products if hashed_split(p.id) == "train"}
    shares = collections.Counter(hashed_split(str(i)) for i in range(20_000))
    assert abs(shares["train"] / 20_000 - 0.8) < 0.01 and abs(shares["val"] / 20_000 - 0.1) < 0.01
    # A labelled catalog keeps its own splits.
    labelled = read_catalog(make_jsonl_catalog(tmp_path / "jsonl"))
    assert labelled.report.hashed_splits == 0
