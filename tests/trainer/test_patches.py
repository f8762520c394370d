"""Image patch features: the model, the bundle's second output, the index's patches.npy and the training cache."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from indexer import ProductIndex
from indexer.build import build_index, delete_from_index, upsert_index
from tests.support.indexes import FixtureEncoder, PatchFixtureEncoder, make_index_catalog
from trainer.export import ExportError, default_check_images, export_bundle, preprocess_settings, reference_transform
from trainer.factory import create_model, get_tokenizer
from trainer.model import VitrineModel
from vitrine.catalog import read_catalog
from vitrine.errors import UserError
from vitrine.runtime import BundleError, load_bundle
from vitrine.runtime.preprocess import PatchSpec
from vitrine.runtime.session import make_session

pytestmark = pytest.mark.torch  # needs the train extra

IMAGE_SIZE = 64  # the tiny trunk downsamples 32x: a 2x2 grid
GRID = (2, 2)
TOL = 1e-4


def tiny_model() -> VitrineModel:
    torch.manual_seed(0)
    return create_model("tiny", pretrained="none", vision_cfg={"image_size": IMAGE_SIZE}).eval()


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def half_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float16 storage (and ORT batch-size rounding)."""
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=2e-3, atol=1e-3 * scale)


@pytest.fixture(scope="module")
def model() -> VitrineModel:
    return tiny_model()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, model) -> dict[str, Path]:
    """The tiny model exported with patches (the default for a timm trunk) and without."""
    root = tmp_path_factory.mktemp("bundles")
    tokenizer = get_tokenizer("tiny")
    kwargs = dict(check_texts=["red dress", "blue jeans"], optimize=False)
    return {
        "patches": export_bundle(model, tokenizer, root / "patches", **kwargs),
        "plain": export_bundle(model, tokenizer, root / "plain", patches=False, **kwargs),
    }


@pytest.fixture
def catalog_dir(tmp_path: Path) -> Path:
    return make_index_catalog(tmp_path / "catalog", n=10)


# ---------------------------------------------------------------- model


def test_patch_features_are_the_block_output_row_major(model: VitrineModel) -> None:
    x = pixels(3)
    with torch.no_grad():
        patches = model.image_patch_features(x)
        trunk = model.clip.visual.trunk
        feature_map = trunk.blocks(trunk.bn1(trunk.conv_stem(x)))  # [B, C, h, w]
        embeddings, joint_patches = model.encode_image_with_patches(x)
    assert model.image_patch_grid == GRID and model.image_patch_dim == feature_map.shape[1] == 64
    assert patches.shape == (3, GRID[0] * GRID[1], model.image_patch_dim)
    for row in range(GRID[0]):
        for col in range(GRID[1]):
            torch.testing.assert_close(patches[:, row * GRID[1] + col], feature_map[:, :, row, col])
    torch.testing.assert_close(joint_patches, patches)
    torch.testing.assert_close(embeddings, model.encode_image(x))  # one trunk pass gives both


def test_patch_grid_probe_leaves_a_training_model_alone() -> None:
    model = tiny_model().train()
    model.clip.visual.trunk.bn1.eval()  # a part kept in eval mode (frozen statistics) stays so
    stats = {k: v.clone() for k, v in model.clip.visual.trunk.state_dict().items()}
    assert model.image_patch_grid == GRID and model.image_patch_dim == 64
    assert model.training and model.clip.visual.trunk.blocks.training and not model.clip.visual.trunk.bn1.training
    for key, value in model.clip.visual.trunk.state_dict().items():
        torch.testing.assert_close(value, stats[key])  # BatchNorm running stats untouched


class _ConvOnlyClip(nn.Module):
    """An open_clip-like model whose visual tower has no timm trunk."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.logit_scale = nn.Parameter(torch.zeros(()))


def test_towers_without_a_timm_trunk_are_a_clear_error() -> None:
    model = VitrineModel(_ConvOnlyClip(), {}, embed_dim=4, image_size=16)
    assert not model.has_image_patches
    with pytest.raises(ValueError, match="timm CNN trunk"):
        model.image_patch_features(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="timm CNN trunk"):
        model.image_patch_grid
    with pytest.raises(ValueError, match="timm CNN trunk"):
        model.image_patch_dim


# ---------------------------------------------------------------- export and runtime


def test_export_writes_patches_output_spec_and_parity(bundles: dict[str, Path], model: VitrineModel) -> None:
    manifest = json.loads((bundles["patches"] / "manifest.json").read_text())
    assert manifest["patches"] == {"output": "patches", "grid": list(GRID), "dim": 64}
    parity = manifest["parity"]
    assert parity["images"] == len(default_check_images())
    assert 0 <= parity["patches_max_abs_diff"] <= TOL * max(1.0, parity["patches_max_abs"])
    assert parity["patches_max_abs"] > 0 and 0 <= parity["image_max_abs_diff"] <= TOL
    session = make_session(bundles["patches"] / "image_encoder.onnx", threads=1)
    assert [o.name for o in session.get_outputs()] == ["embeddings", "patches"]
    plain = json.loads((bundles["plain"] / "manifest.json").read_text())
    assert plain["patches"] is None and plain["parity"]["patches_max_abs_diff"] is None
    session = make_session(bundles["plain"] / "image_encoder.onnx", threads=1)
    assert [o.name for o in session.get_outputs()] == ["embeddings"]


def test_bundle_patches_match_torch(bundles: dict[str, Path], model: VitrineModel) -> None:
    bundle = load_bundle(bundles["patches"], threads=1, image_batch_size=3)  # 5 images: batches of 3 and 2
    assert bundle.patch_spec == PatchSpec(grid=GRID, dim=64) and bundle.patch_spec.shape == (4, 64)
    images = default_check_images(seed=3) + default_check_images(seed=4)[:1]
    embeddings, patches = bundle.encode_images_with_patches(images)
    assert embeddings.dtype == np.float32 and embeddings.shape == (5, model.embed_dim)
    assert patches.dtype == np.float32 and patches.shape == (5, 4, 64)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embeddings, bundle.encode_images(images), atol=1e-6)
    transform = reference_transform(preprocess_settings(model))
    with torch.no_grad():
        expected = model.image_patch_features(torch.stack([transform(im) for im in images])).numpy()
    assert np.abs(patches - expected).max() <= TOL * max(1.0, float(np.abs(expected).max()))
    empty_embeddings, empty_patches = bundle.encode_images_with_patches([])
    assert empty_embeddings.shape == (0, model.embed_dim) and empty_patches.shape == (0, 4, 64)


def test_bundles_without_patches_still_load(bundles: dict[str, Path], tmp_path: Path) -> None:
    plain = load_bundle(bundles["plain"])
    assert plain.patch_spec is None and plain.encode_images(default_check_images()[:2]).shape == (2, 32)
    with pytest.raises(BundleError, match="no patches output"):
        plain.encode_images_with_patches(default_check_images()[:1])
    # a manifest written before patches existed (no "patches" key at all)
    old = tmp_path / "old"
    old.mkdir()
    for path in bundles["patches"].rglob("*"):
        target = old / path.relative_to(bundles["patches"])
        target.mkdir(exist_ok=True) if path.is_dir() else target.write_bytes(path.read_bytes())
    raw = json.loads((old / "manifest.json").read_text())
    raw.pop("patches")
    for key in ("patches_max_abs_diff", "patches_max_abs"):
        raw["parity"].pop(key)
    (old / "manifest.json").write_text(json.dumps(raw))
    assert load_bundle(old).patch_spec is None
    # a manifest promising an output the graph lacks
    raw = json.loads((bundles["plain"] / "manifest.json").read_text())
    (tmp_path / "liar").mkdir()
    for path in bundles["plain"].rglob("*"):
        target = tmp_path / "liar" / path.relative_to(bundles["plain"])
        target.mkdir(exist_ok=True) if path.is_dir() else target.write_bytes(path.read_bytes())
    (tmp_path / "liar" / "manifest.json").write_text(json.dumps({**raw, "patches": {"grid": [2, 2], "dim": 64}}))
    with pytest.raises(BundleError, match="only has embeddings"):
        load_bundle(tmp_path / "liar")


def test_export_refuses_patches_it_cannot_make(tmp_path: Path) -> None:
    model = tiny_model()
    tokenizer = get_tokenizer("tiny")
    with pytest.raises(ExportError, match="cannot be overridden"):
        export_bundle(model, tokenizer, tmp_path / "b", manifest={"patches": {"grid": [1, 1], "dim": 1}})
    del model.clip.visual.trunk.conv_head  # no longer the trunk layout patch features read
    with pytest.raises(ExportError, match="patches=True needs"):
        export_bundle(model, tokenizer, tmp_path / "b", patches=True)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- index


def test_index_stores_bundle_patches(bundles: dict[str, Path], catalog_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(bundles["patches"], threads=1)
    catalog = read_catalog(catalog_dir)
    build_index(catalog, bundle, tmp_path / "index", batch_size=4, threads=2)
    with ProductIndex.open(tmp_path / "index") as index:
        assert index.patch_spec == bundle.patch_spec
        assert index.manifest["files"]["patches"] == "patches.npy"
        stored = np.load(index.version_dir / "patches.npy", mmap_mode="r")
        assert stored.dtype == np.float16 and stored.shape == (10, 4, 64)
        ids = ["107", "100", "103"]
        got = index.patches(ids)
        assert got.dtype == np.float32 and got.shape == (3, 4, 64)
        by_id = {p.id: p for p in catalog.products}
        embeddings, expected = bundle.encode_images_with_patches([by_id[i].image.open() for i in ids])
        half_close(got, expected)
        np.testing.assert_allclose(index.vectors(ids)[1], embeddings, atol=1e-5)  # same rows as the vectors
        assert index.patches([]).shape == (0, 4, 64)


def test_index_patch_errors(tmp_path: Path, catalog_dir: Path) -> None:
    build_index(read_catalog(catalog_dir), PatchFixtureEncoder(), tmp_path / "with", threads=2)
    build_index(read_catalog(catalog_dir), FixtureEncoder(), tmp_path / "without", threads=2)
    with ProductIndex.open(tmp_path / "with") as index:
        with pytest.raises(UserError, match="'nope' is not in the index"):
            index.patches(["100", "nope"])
        with pytest.raises(UserError, match="list of product ids"):
            index.patches("100")
    with ProductIndex.open(tmp_path / "without") as index:
        assert index.patch_spec is None and "patches" not in index.manifest["files"]
        assert not (index.version_dir / "patches.npy").exists()
        with pytest.raises(UserError, match="stores no patch features"):
            index.patches(["100"])


def test_index_patches_match_the_encoder_after_upsert_and_delete(tmp_path: Path, catalog_dir: Path) -> None:
    encoder = PatchFixtureEncoder()
    catalog = read_catalog(catalog_dir)
    first, rest = catalog.products[:6], catalog.products[6:]
    build_index(first, encoder, tmp_path / "index", threads=2)
    upsert_index(tmp_path / "index", rest, encoder, threads=2)
    delete_from_index(tmp_path / "index", ["101", "108"])
    with ProductIndex.open(tmp_path / "index") as index:
        ids = index.ids()
        assert sorted(ids) == sorted(p.id for p in catalog.products if p.id not in ("101", "108"))
        by_id = {p.id: p for p in catalog.products}
        _, expected = encoder.encode_images_with_patches([by_id[i].image.open() for i in ids])
        half_close(index.patches(ids), expected)
        assert not np.array_equal(index.patches(ids[:1]), index.patches(ids[1:2]))  # products differ


def test_upsert_refuses_other_patch_features(tmp_path: Path, catalog_dir: Path) -> None:
    build_index(read_catalog(catalog_dir), PatchFixtureEncoder(), tmp_path / "index", threads=2)

    class WiderGrid(PatchFixtureEncoder):  # same fingerprint, other patches
        grid = (3, 3)

    class NoPatches(FixtureEncoder):
        fingerprint = PatchFixtureEncoder.fingerprint

    for encoder in (WiderGrid(), NoPatches()):
        with pytest.raises(UserError, match="stores patch features"):
            upsert_index(tmp_path / "index", read_catalog(catalog_dir), encoder)


def test_non_finite_patches_skip_the_product(tmp_path: Path, catalog_dir: Path) -> None:
    class Overflowing(PatchFixtureEncoder):
        """Patches of red products overflow float16."""

        def encode_images_with_patches(self, images):
            embeddings, patches = super().encode_images_with_patches(images)
            for row, image in enumerate(images):
                rgb = np.asarray(image, dtype=np.float32).reshape(-1, 3)
                shape = rgb[rgb.min(axis=1) < 235]  # the product, not the studio background
                if shape.size and shape[:, 0].mean() > 150 and shape[:, 1].mean() < 100:
                    patches[row, 0, 0] = 1e6  # float32 is fine, float16 is not
            return embeddings, patches

    result = build_index(read_catalog(catalog_dir), Overflowing(), tmp_path / "index", threads=2, batch_size=4)
    failed = {e.id for e in result.errors}
    assert failed == {"100", "108"} and all(e.stage == "embedding" for e in result.errors)  # the red ones
    with ProductIndex.open(tmp_path / "index") as index:
        assert len(index) == 10 - len(failed) and not failed & set(index.ids())
        assert np.isfinite(index.patches(index.ids())).all()


# ---------------------------------------------------------------- training cache


def test_bundle_product_features_are_cached(bundles: dict[str, Path], catalog_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer import patches as patches_module
    from trainer.patches import ProductFeatures, bundle_product_features

    runs = []

    class CountingEmbedder(patches_module.ProductEmbedder):
        def embed(self, products, **kwargs):
            runs.append(len(products))
            return super().embed(products, **kwargs)

    monkeypatch.setattr(patches_module, "ProductEmbedder", CountingEmbedder)
    products = read_catalog(catalog_dir).products
    cache = tmp_path / "cache"
    features = bundle_product_features(bundles["patches"], products, cache, batch_size=4, progress=False)
    assert isinstance(features, ProductFeatures) and runs == [10] and len(features) == 10
    assert features.ids.tolist() == [p.id for p in products]
    assert features.text.dtype == features.image.dtype == np.float32 and features.text.shape == (10, 32)
    assert features.patches.dtype == np.float16 and features.patches.shape == (10, 4, 64)
    bundle = load_bundle(bundles["patches"], threads=1)
    np.testing.assert_allclose(features.text, bundle.encode_texts([p.title for p in products]), atol=1e-5)
    embeddings, patches = bundle.encode_images_with_patches([p.image.open() for p in products])
    np.testing.assert_allclose(features.image, embeddings, atol=1e-5)
    half_close(np.asarray(features.patches, np.float32), patches)

    again = bundle_product_features(bundles["patches"], products, cache, progress=False)
    assert runs == [10]  # read from the cache
    assert isinstance(again.patches, np.memmap)
    for name in ("ids", "text", "image", "patches"):
        np.testing.assert_array_equal(getattr(again, name), getattr(features, name))

    fewer = bundle_product_features(bundles["patches"], products[:7], cache, progress=False)
    assert runs == [10, 7] and fewer.ids.tolist() == [p.id for p in products[:7]]
    np.testing.assert_array_equal(fewer.patches, features.patches[:7])
    assert len([p for p in cache.iterdir() if p.name.startswith("bundle-features-")]) == 2
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_bundle_product_features_refuses_bad_input(bundles: dict[str, Path], catalog_dir: Path, tmp_path: Path) -> None:
    from trainer.patches import bundle_product_features

    products = read_catalog(catalog_dir).products
    with pytest.raises(BundleError, match="no patches output"):
        bundle_product_features(bundles["plain"], products, tmp_path / "cache", progress=False)
    with pytest.raises(UserError, match="'100' occurs more than once"):
        bundle_product_features(bundles["patches"], [*products, products[0]], tmp_path / "cache", progress=False)
    (catalog_dir / "images" / "105.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="product 105: unreadable image"):
        bundle_product_features(bundles["patches"], read_catalog(catalog_dir).products, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
