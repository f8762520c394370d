"""A catalog image the bundle's preprocessing refuses (a thin 1x10000 photo would resize to gigabytes)
is that product's error in the build report, not a crash or a memory blow-up (issue 14)."""
from __future__ import annotations

import resource
from pathlib import Path

import pytest
from PIL import Image

from indexer import ProductIndex
from indexer.build import build_index
from tests.support.indexes import fixture_product, make_index_catalog
from vitrine.catalog import read_catalog
from vitrine.runtime import load_bundle

pytestmark = pytest.mark.torch  # the toy bundle is written with onnx (the train extra)


def test_a_thin_catalog_image_is_a_product_error(tmp_path: Path) -> None:
    from tests.vitrine.test_runtime_bundle import write_toy_bundle

    bundle = load_bundle(write_toy_bundle(tmp_path / "bundle"))
    records = [fixture_product(i) for i in range(6)]
    records[2]["image"] = "images/thin.png"
    catalog = tmp_path / "catalog"
    (catalog / "images").mkdir(parents=True)
    Image.new("RGB", (1, 100_000), (200, 30, 30)).save(catalog / "images" / "thin.png")
    make_index_catalog(catalog, records=records)

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    result = build_index(read_catalog(catalog), bundle, tmp_path / "index", threads=1)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200 * 1024
    assert [(e.id, e.stage) for e in result.errors] == [(records[2]["id"], "image")]
    assert "too elongated" in result.errors[0].message
    with ProductIndex.open(tmp_path / "index") as index:
        assert len(index) == 5 and records[2]["id"] not in index
