"""Building on Ray Data (`indexer.ray_embed`) gives the single-process index: the same vectors, patches,
errors and search results; a block whose actor dies or whose encoder raises is retried, not lost.

One local Ray instance with 2 CPUs serves the whole module (starting Ray takes seconds). Needs the ray
extra (`make setup` installs it): without it, the tests fail with the install hint, never skip.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from indexer import ProductIndex
from indexer.build import IndexBuildResult, build_index
from indexer.layout import IndexLayout
from indexer.ray_embed import BundleLoader, RayEmbedding, RayOptions, ray_session
from tests.support.catalogs import write_corrupt_jpeg
from tests.support.indexes import PatchFixtureEncoder, fixture_product, make_index_catalog
from vitrine.catalog import read_catalog
from vitrine.errors import UserError
from vitrine.runtime import load_bundle

pytestmark = [
    pytest.mark.torch,  # the real ONNX bundle is exported with the trainer
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),  # Ray Data's own settings, not ours
]

N_PRODUCTS = 300


@pytest.fixture(scope="module")
def local_ray():
    with ray_session(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_index_catalog(tmp_path_factory.mktemp("ray-catalog"), N_PRODUCTS)
    # two images that only fail when decoded, in different blocks of 64
    write_corrupt_jpeg(root / "images" / "103.jpg")
    (root / "images" / "250.jpg").write_bytes(b"not a jpeg at all")
    return root


def _vectors(index_dir: Path) -> dict[str, np.ndarray]:
    version = IndexLayout(index_dir).resolve()
    return {name: np.load(path) for name in ("labels", "text_vectors", "image_vectors", "patches")
            if (path := version / f"{name}.npy").exists()}  # fmt: skip


def _reported(result: IndexBuildResult) -> list[tuple[str, str, str]]:
    """The errors, in order; PIL names its in-memory file by address, which differs from run to run."""
    return [(e.id, e.stage, re.sub(r"0x[0-9a-f]+", "0x?", e.message)) for e in result.errors]


def _assert_same_index(single: Path, ray: Path, queries: np.ndarray) -> None:
    a, b = _vectors(single), _vectors(ray)
    assert a.keys() == b.keys()
    np.testing.assert_array_equal(a["labels"], b["labels"])
    for name in ("text_vectors", "image_vectors"):
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-5)
    if "patches" in a:
        np.testing.assert_allclose(b["patches"].astype(np.float32), a["patches"].astype(np.float32), rtol=1e-3, atol=1e-3)
    with ProductIndex.open(single) as x, ProductIndex.open(ray) as y:
        assert x.ids() == y.ids()
        assert x.manifest["counts"] == y.manifest["counts"]
        for query in queries:
            hits_x, hits_y = x.search(query, k=10), y.search(query, k=10)
            assert [h.id for h in hits_x] == [h.id for h in hits_y]
            np.testing.assert_allclose([h.score for h in hits_y], [h.score for h in hits_x], atol=1e-5)


def test_ray_build_equals_single_process(local_ray, tiny_bundle: Path, catalog_dir: Path, tmp_path: Path) -> None:
    encoder = load_bundle(tiny_bundle, threads=1)
    catalog = read_catalog(catalog_dir)
    single = build_index(catalog, encoder, tmp_path / "single", threads=1)
    step = RayEmbedding(BundleLoader(tiny_bundle, threads=1), RayOptions(actors=2, block_size=64))
    ray = build_index(catalog, encoder, tmp_path / "ray", threads=1, embed_step=step)

    assert sorted((e.id, e.stage) for e in ray.errors) == [("103", "image"), ("250", "image")]
    assert _reported(ray) == _reported(single) and ray.operation.added == N_PRODUCTS - 2
    assert step.stats.blocks == 5 and step.stats.products == N_PRODUCTS and step.stats.actor_seconds > 0
    titles = ["red shoes", "blue slim jeans", "black bag", "women white tshirts"]
    _assert_same_index(tmp_path / "single", tmp_path / "ray", encoder.encode_texts(titles))


def test_vitrine_index_ray_command(local_ray, tiny_bundle: Path, catalog_dir: Path, tmp_path: Path, capsys) -> None:
    # before the tests that kill actors: Ray reports a dead worker on the driver's stdout, at its own pace
    from tests.indexer.test_indexer_cli import run

    out = tmp_path / "index"
    argv = ["index", "--bundle", str(tiny_bundle), "--catalog", str(catalog_dir), "--out", str(out), "--limit", "40"]
    assert run([*argv, "--ray", "--ray-actors", "2", "--ray-block-size", "16", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["operation"]["embedded"] == 39 and [e["id"] for e in record["errors"]] == ["103"]
    with ProductIndex.open(out) as index:
        assert len(index) == 39 and index.manifest["bundle"]["path"] == str(tiny_bundle)
    with pytest.raises(UserError, match="an upsert embeds only the changed products"):
        run(["index", "--upsert", "--catalog", str(catalog_dir), "--out", str(out), "--ray"])
    with pytest.raises(UserError, match="sizes a local Ray instance"):
        run([*argv, "--ray", "ray://head:10001", "--ray-cpus", "4"])
    with pytest.raises(UserError, match="--ray-actors is an option of --ray"):
        run([*argv, "--ray-actors", "2"])


@dataclass(frozen=True)
class FlakyEncoderLoader:
    """In the actors: an encoder whose process dies at one product's first batch and that raises at
    another's, once each (a marker file remembers), and gives NaN for 'poison' titles."""

    markers: Path
    crash_id: str
    raise_id: str

    def __call__(self) -> PatchFixtureEncoder:
        return FlakyEncoder(self)


class FlakyEncoder(PatchFixtureEncoder):
    def __init__(self, loader: FlakyEncoderLoader | None = None) -> None:
        super().__init__()
        self.loader = loader

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        out = super().encode_texts(texts)
        out[[i for i, t in enumerate(texts) if "poison" in t]] = np.nan
        if self.loader is not None:
            for product, fail in ((self.loader.crash_id, self._die), (self.loader.raise_id, self._raise)):
                marker = self.loader.markers / product
                if any(t.endswith(f"no {int(product) - 100}") for t in texts) and not marker.exists():
                    marker.touch()
                    fail()
        return out

    @staticmethod
    def _die() -> None:
        os._exit(1)  # as an OOM kill would: no exception, no cleanup

    @staticmethod
    def _raise() -> None:
        raise OSError("transient: the image store timed out")


def test_failed_blocks_are_retried_and_bad_rows_reported(local_ray, tmp_path: Path) -> None:
    records = [fixture_product(i) for i in range(60)]
    for i in (7, 44):
        records[i]["title"] = f"poison {records[i]['title']}"
    root = make_index_catalog(tmp_path / "catalog", records=records)
    write_corrupt_jpeg(root / "images" / "131.jpg")
    catalog = read_catalog(root)
    markers = tmp_path / "markers"
    markers.mkdir()

    single = build_index(catalog, FlakyEncoder(), tmp_path / "single", threads=1)
    loader = FlakyEncoderLoader(markers, crash_id="112", raise_id="150")
    step = RayEmbedding(loader, RayOptions(actors=2, block_size=16, retries=2))
    ray = build_index(catalog, FlakyEncoder(), tmp_path / "ray", threads=1, embed_step=step)

    assert sorted(p.name for p in markers.iterdir()) == ["112", "150"]  # both failures happened
    assert [(e.id, e.stage) for e in ray.errors] == [("131", "image"), ("107", "embedding"), ("144", "embedding")]
    assert _reported(ray) == _reported(single) and ray.operation.added == 57
    _assert_same_index(tmp_path / "single", tmp_path / "ray", FlakyEncoder().encode_texts(["red shoes", "blue bag"]))


def test_without_retries_a_failed_block_fails_the_build(local_ray, tmp_path: Path) -> None:
    root = make_index_catalog(tmp_path / "catalog", 20)
    markers = tmp_path / "markers"
    markers.mkdir()
    step = RayEmbedding(FlakyEncoderLoader(markers, crash_id="999", raise_id="105"), RayOptions(actors=1, retries=0))
    build_index(read_catalog(root), FlakyEncoder(), tmp_path / "first", threads=1)  # a live index to keep
    with pytest.raises(Exception, match="transient"):
        build_index(read_catalog(root), FlakyEncoder(), tmp_path / "first", threads=1, embed_step=step)
    assert ProductIndex.open(tmp_path / "first").manifest["build"]["embedded"] == 20  # the previous version stays live

