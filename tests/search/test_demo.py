"""`vitrine demo` from a catalog to a served index, with the tiny config so it runs in seconds."""
from __future__ import annotations

import pytest

from indexer import ProductIndex
from tests.support.catalogs import make_training_catalog
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


def test_demo_reports_a_missing_catalog(tmp_path, capsys):
    assert main(["demo", "--catalog", str(tmp_path / "nowhere"), "--no-serve"]) == 2
    assert "catalog not found" in capsys.readouterr().err
