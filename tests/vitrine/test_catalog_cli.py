"""`vitrine catalog check`: the report it prints and its exit status."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import vitrine.cli
from tests.support.catalogs import make_flawed_jsonl_catalog, make_jsonl_catalog, make_non_catalogs
from vitrine.catalog import FORMATS
from vitrine.catalog import cli as catalog_cli
from vitrine.errors import CatalogFormatError


def run_check(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="vitrine")
    catalog_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["catalog", "check", *argv])
    return args.func(args)


def test_clean_catalog_exits_0(tmp_path, capsys):
    root = make_jsonl_catalog(tmp_path / "cat", n=4)
    assert run_check(str(root)) == 0
    out = capsys.readouterr().out
    assert "4 products from 4 rows" in out and "Problems: none" in out
    assert "Splits: test 1, train 2, val 1" in out and "images decoded" in out


def test_problems_exit_1_with_examples(tmp_path, capsys):
    flawed = make_flawed_jsonl_catalog(tmp_path / "cat")
    assert run_check(str(flawed.path)) == 1
    out = capsys.readouterr().out
    assert "3 products from 11 rows" in out and "Problems: 8 rows skipped" in out
    assert "corrupt_image: 1" in out and "line 6 (id 5): cannot decode" in out
    assert "malformed_row: 4" in out and "line 3: invalid JSON" in out


def test_json_output_and_no_images(tmp_path, capsys):
    flawed = make_flawed_jsonl_catalog(tmp_path / "cat")
    assert run_check(str(flawed.path), "--json", "--no-images") == 1
    data = json.loads(capsys.readouterr().out)
    assert data["products"] == 4 and data["images_decoded"] is False
    assert "corrupt_image" not in data["problems"]
    duplicate = data["problems"]["duplicate_id"]
    assert duplicate["count"] == 1
    assert {k: duplicate["examples"][0][k] for k in ("row", "file", "id")} == {
        "row": 7, "file": "products.jsonl", "id": "1",
    }  # fmt: skip


def test_limit(tmp_path, capsys):
    root = make_jsonl_catalog(tmp_path / "cat", n=5)
    assert run_check(str(root), "--limit", "2", "--json") == 0
    assert json.loads(capsys.readouterr().out)["products"] == 2


def test_non_catalog_raises_format_error(tmp_path):
    with pytest.raises(CatalogFormatError):
        run_check(str(make_non_catalogs(tmp_path)["png"]))


def test_vitrine_main_exits_2_on_a_non_catalog(tmp_path, monkeypatch, capsys):
    garbage = make_non_catalogs(tmp_path)["garbage jsonl"]
    assert vitrine.cli.main(["catalog", "check", str(garbage)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitrine: error:") and "garbage.jsonl" in err and "Traceback" not in err


def test_cli_format_choices_match_the_readers():
    assert catalog_cli.FORMATS == FORMATS


def test_check_on_the_first_300_shared_products(fashion_products, tmp_path, capsys):
    lines = (fashion_products / "products.jsonl").read_text(encoding="utf-8").splitlines()[:300]
    records = [json.loads(line) for line in lines]
    for record in records:  # point at the shared images instead of copying them
        record["image"] = str(fashion_products / record["image"])
    (tmp_path / "products.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert run_check(str(tmp_path), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["products"] == data["rows_seen"] == 300 and data["images_decoded"] is True
    assert sum(data["splits"].values()) == 300 and data["problems"] == {}
    assert Path(data["source"]) == tmp_path


def test_check_reports_missing_attribute_values_per_field(tmp_path, capsys):
    from tests.support.catalogs import myntra_record, write_jpeg, write_jsonl

    root = tmp_path / "cat"
    records = [myntra_record(str(i), f"Product {i}") for i in range(4)]
    del records[0]["usage"], records[1]["usage"], records[2]["season"]
    records[3]["baseColour"] = " "  # blank is missing too
    for record in records:
        write_jpeg(root / record["image"])
    write_jsonl(root / "products.jsonl", records)
    assert run_check(str(root), "--no-images") == 0  # gaps are reported, not problems
    out = capsys.readouterr().out
    assert "Missing attribute values (3 of 8 attributes have gaps):" in out
    assert "  usage: 2 (50.0%)" in out and "  season: 1 (25.0%)" in out and "  baseColour: 1 (25.0%)" in out
    assert run_check(str(root), "--no-images", "--json") == 0
    missing = json.loads(capsys.readouterr().out)["missing_attributes"]
    assert missing == {"usage": 2, "baseColour": 1, "season": 1, "articleType": 0, "gender": 0,
                       "masterCategory": 0, "subCategory": 0, "year": 0}  # fmt: skip


def test_check_of_a_filled_catalog_says_so(tmp_path, capsys):
    root = make_jsonl_catalog(tmp_path / "cat", n=3)
    run_check(str(root), "--no-images")
    assert "Missing attribute values: none" in capsys.readouterr().out
