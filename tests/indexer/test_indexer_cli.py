"""`vitrine index` end to end with a real (tiny, untrained) ONNX bundle."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from indexer import ProductIndex
from tests.support.catalogs import write_jsonl
from tests.support.indexes import export_tiny_bundle, fixture_product, make_index_catalog, write_fixture_image
from vitrine.catalog import read_catalog
from vitrine.errors import UserError
from vitrine.runtime import load_bundle

pytestmark = pytest.mark.torch  # needs the train extra


def run(argv: list[str]) -> int:
    """Run `vitrine index ...` whether or not the lead has wired it into vitrine/cli.py yet."""
    import argparse

    from indexer import cli

    parser = argparse.ArgumentParser(prog="vitrine")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


def test_build_upsert_delete(tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture) -> None:
    catalog = make_index_catalog(tmp_path / "catalog", 20)
    out = tmp_path / "index"
    assert run(["index", "--bundle", str(bundle), "--catalog", str(catalog), "--out", str(out),
                "--batch-size", "8", "--threads", "2", "--split", "train"]) == 0  # fmt: skip
    assert "build: indexed 7 products; 0 failed" in capsys.readouterr().out
    index = ProductIndex.open(out)
    encoder = load_bundle(bundle)
    assert index.bundle_fingerprint == encoder.fingerprint and index.embed_dim == encoder.embed_dim == 32
    assert index.manifest["bundle"]["path"] == str(bundle) and index.alphas == encoder.alphas
    assert index.manifest["build"]["batch_size"] == 8 and index.manifest["catalog"]["report"]["rows_excluded"] == 13
    products = {p.id: p for p in read_catalog(catalog, split="train").products}
    assert sorted(index.ids()) == sorted(products)
    # the stored vectors are what the service's encoder gives for the same title and photo
    title, image = index.vectors(["103"])
    np.testing.assert_allclose(title[0], encoder.encode_texts([products["103"].title])[0], atol=1e-5)
    np.testing.assert_allclose(image[0], encoder.encode_images([products["103"].image.open()])[0], atol=1e-5)
    hits = index.search(encoder.encode_texts([products["103"].title])[0], k=3)
    assert len(hits) == 3 and hits[0].score >= hits[-1].score

    # upsert without --bundle: the recorded bundle is used
    for i in range(20, 23):
        write_fixture_image(catalog / "images" / f"{100 + i}.jpg", i, "blue")
    update = write_jsonl(catalog / "update.jsonl", [fixture_product(i) for i in range(20, 23)] + [fixture_product(0, title="Renamed")])
    assert run(["index", "--upsert", "--catalog", str(update), "--out", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["operation"]["added"], record["operation"]["replaced"]) == (3, 1)
    assert run(["index", "--delete", "120", "121", "--out", str(out)]) == 0
    assert "deleted 2 products" in capsys.readouterr().out
    index = ProductIndex.open(out)
    assert len(index) == 8 and index.get("100").title == "Renamed" and "120" not in index


def test_user_errors(tmp_path: Path, bundle: Path) -> None:
    catalog = make_index_catalog(tmp_path / "catalog", 4)
    out = str(tmp_path / "index")
    cases = [
        (["index", "--catalog", str(catalog), "--out", out], "--bundle is required"),
        (["index", "--bundle", str(bundle), "--out", out], "--catalog is required"),
        (["index", "--bundle", str(tmp_path / "nope"), "--catalog", str(catalog), "--out", out], "bundle not found"),
        (["index", "--bundle", str(bundle), "--catalog", str(catalog), "--out", out, "--index-type", "Nope7"], "invalid index type"),
        (["index", "--delete", "1", "--out", out], "no index"),
        (["index", "--upsert", "--catalog", str(catalog), "--out", out], "no index"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            run(argv)
    # Bad numbers are refused by the shared argparse types, before anything runs.
    with pytest.raises(SystemExit) as exit_info:
        run(["index", "--bundle", str(bundle), "--catalog", str(catalog), "--out", out, "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "index").exists()


@pytest.mark.integration
def test_index_300_real_products(fashion_products: Path, bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    assert run(["index", "--bundle", str(bundle), "--catalog", str(fashion_products), "--out", str(out), "--limit", "300"]) == 0
    index = ProductIndex.open(out)
    assert len(index) + index.manifest["counts"]["errors"] == 300 and len(index) >= 295
    assert {"gender", "baseColour", "articleType", "category"} <= set(index.filter_fields())
    encoder = load_bundle(bundle)
    query = encoder.encode_texts(["women red handbags"])[0]
    title, image = index.vectors(index.ids())
    filters = {"gender": "Women"}
    rows = np.array([i for i, r in enumerate(index.get_many(index.ids())) if r.attributes.get("gender") == "Women"])
    alpha = index.alphas.alpha
    scores = alpha * title[rows].astype(np.float64) @ query + (1 - alpha) * image[rows].astype(np.float64) @ query
    expected = np.array(index.ids())[rows][np.argsort(-scores, kind="stable")[:10]]
    assert [h.id for h in index.search(query, k=10, filters=filters)] == list(expected)
