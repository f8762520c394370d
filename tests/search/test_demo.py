"""`vitrine demo` from a catalog to a served index, with the tiny config so it runs in seconds."""
from __future__ import annotations

import json

import pytest

from indexer import ProductIndex
from tests.support.catalogs import make_training_catalog, write_jsonl
from vitrine.cli import main
from vitrine.runtime import load_bundle

pytestmark = pytest.mark.torch  # needs the train extra


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return make_training_catalog(tmp_path_factory.mktemp("catalog"))


def test_demo_trains_exports_indexes_and_reuses(catalog, tmp_path, capsys):
    args = ["demo", "--catalog", str(catalog), "--workdir", str(tmp_path / "demo"), "--model", "tiny",
            "--pretrained", "none", "--epochs", "1", "--no-serve"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[1/3] training" in out and "[2/3] indexing" in out and "ready: vitrine serve --index" in out
    bundle = load_bundle(tmp_path / "demo" / "bundle")
    with ProductIndex.open(tmp_path / "demo" / "index") as index:
        assert len(index) == 60 and index.bundle_fingerprint == bundle.fingerprint
        version = index.version

    assert main(args) == 0  # second start: nothing is rebuilt
    out = capsys.readouterr().out
    assert "training" not in out and "indexing" not in out
    with ProductIndex.open(tmp_path / "demo" / "index") as index:
        assert index.version == version


def test_demo_trains_the_attention_recipe_on_a_catalog_without_splits(tmp_path, capsys):
    # The real Kaggle download has no split column: the demo must still train (hashed splits) and say so.
    root = make_training_catalog(tmp_path / "catalog")
    lines = [json.loads(line) for line in (root / "products.jsonl").read_text().splitlines()]
    write_jsonl(root / "products.jsonl", [{k: v for k, v in line.items() if k != "split"} for line in lines])
    args = ["demo", "--catalog", str(root), "--workdir", str(tmp_path / "demo"), "--model", "tiny-ap",
            "--pretrained", "none", "--epochs", "2", "--no-serve"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "no split label" in out and "hashed product id" in out and "ready in" in out
    summary = json.loads((tmp_path / "demo" / "run" / "summary.json").read_text())
    assert summary["recipe"] == "cached-token"
    assert summary["config"]["query_weight"] == 0.1 and all(r["loss_query"] > 0 for r in summary["history"])
    with ProductIndex.open(tmp_path / "demo" / "index") as index:
        assert len(index) == 60


def test_demo_reports_a_missing_catalog(tmp_path, capsys):
    assert main(["demo", "--catalog", str(tmp_path / "nowhere"), "--no-serve"]) == 2
    assert "catalog not found" in capsys.readouterr().err
