"""Builders for tiny indexes in a tmp folder: a catalog with varied attributes, an encoder, a built index.

Reusable by any test (the service's included):

    fixture = build_fixture_index(tmp_path)               # flat index over 32 products
    index = ProductIndex.open(fixture.index_dir)
    hits = index.search(fixture.encoder.encode_texts(["red shoes"])[0], k=5)

`FixtureEncoder` is the numpy `ColourHashEncoder` as a `ServingEncoder` (alphas, fingerprint,
embed_dim), so "red ..." titles meet red photos; `PatchFixtureEncoder`
also gives patch features (the image's colour on a coarse grid), as a bundle exported with
patches does. `export_tiny_bundle` writes a real (untrained, tiny) ONNX bundle with the
trainer; it needs torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tests.support.catalogs import myntra_record, write_jsonl
from tests.support.encoders import COLOURS, ColourHashEncoder
from vitrine.runtime.preprocess import PatchSpec
from vitrine.scoring import Alphas

FIXTURE_COLOURS = ("red", "blue", "green", "black", "white", "yellow", "pink", "brown")
FIXTURE_GENDERS = ("Men", "Women", "Unisex")
FIXTURE_ARTICLES = (("Topwear", "Tshirts"), ("Shoes", "Casual Shoes"), ("Bags", "Handbags"), ("Bottomwear", "Jeans"))
FIXTURE_STYLES = ("classic", "slim", "urban", "soft", "bold", "retro", "sport", "daily", "light")
FIXTURE_ALPHA = 0.6


class FixtureEncoder(ColourHashEncoder):
    """ColourHashEncoder as a `vitrine.protocols.ServingEncoder`: α, fingerprint, dimension, no patches."""

    alpha = FIXTURE_ALPHA
    alpha_t2p: float | None = None
    alpha_i2p: float | None = None
    fingerprint = "colourhash-fixture"
    embeds_like = None
    model_name = "colourhash"
    path = None
    patch_spec = None
    reranker_spec = None

    @property
    def alphas(self) -> Alphas:
        return Alphas(self.alpha, self.alpha_t2p, self.alpha_i2p)

    @property
    def embed_dim(self) -> int:
        return self.dim

    def encode_images_with_patches(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        raise AssertionError("FixtureEncoder gives no patches (patch_spec is None)")


class PatchFixtureEncoder(FixtureEncoder):
    """FixtureEncoder plus `patch_spec` and `encode_images_with_patches`: per grid cell, the mean RGB
    (0..1) and the cell's brightness spread, so every image gets distinct, deterministic patches."""

    fingerprint = "colourhash-patches-fixture"
    embeds_like = None
    grid = (2, 3)

    @property
    def patch_spec(self) -> PatchSpec:
        return PatchSpec(grid=self.grid, dim=4)

    def encode_images_with_patches(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = self.grid
        patches = np.zeros((len(images), rows * cols, 4), np.float32)
        for out, image in zip(patches, images):
            pixels = np.asarray(image.convert("RGB").resize((cols * 8, rows * 8)), dtype=np.float32) / 255.0
            cells = pixels.reshape(rows, 8, cols, 8, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, 64, 3)
            out[:, :3] = cells.mean(axis=1)
            out[:, 3] = cells.mean(axis=2).std(axis=1)
        return self.encode_images(images), patches


def fixture_product(i: int, *, title: str | None = None, colour: str | None = None, **overrides: object) -> dict:
    """The products.jsonl record of fixture product `i` (id str(100 + i)); attributes vary with i."""
    colour = colour or FIXTURE_COLOURS[i % len(FIXTURE_COLOURS)]
    # Periods 8, 3 and 4 (shifted every 8): every colour meets every gender and article.
    category, article = FIXTURE_ARTICLES[(i + i // 8) % len(FIXTURE_ARTICLES)]
    gender = FIXTURE_GENDERS[i % len(FIXTURE_GENDERS)]
    style = FIXTURE_STYLES[i % len(FIXTURE_STYLES)]
    ident = str(100 + i)
    record = myntra_record(
        ident, title or f"{gender} {style} {colour} {article} no {i}", split=("train", "val", "test")[i % 3],
        gender=gender, subCategory=category, articleType=article, baseColour=colour.title(),
    )  # fmt: skip
    record.update(overrides)
    return record


def write_fixture_image(path: Path, i: int, colour: str) -> Path:
    """A product shot: a `colour` shape on a studio-white background, size and place varying with i."""
    rng = np.random.default_rng([7, i])
    image = Image.new("RGB", (48, 64), (250, 250, 250))
    w, h = int(rng.integers(14, 40)), int(rng.integers(18, 56))
    left, top = int(rng.integers(0, 48 - w)), int(rng.integers(0, 64 - h))
    ImageDraw.Draw(image).rectangle([left, top, left + w, top + h], fill=COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=92)
    return path


def make_index_catalog(root: Path, n: int = 32, *, start: int = 0, records: list[dict] | None = None) -> Path:
    """A products.jsonl catalog folder of fixture products start..start+n-1 (or the given records).

    Records' images are drawn in their title's fixture colour, unless the file already exists.
    """
    records = records if records is not None else [fixture_product(i) for i in range(start, start + n)]
    for record in records:
        path = root / record["image"]
        if not path.exists():
            i = int(record["id"]) - 100 if record["id"].isdigit() else abs(hash(record["id"])) % 1000
            colour = next((c for c in FIXTURE_COLOURS if c in record["title"].lower()), "grey")
            write_fixture_image(path, i, colour)
    write_jsonl(root / "products.jsonl", records)
    return root


@dataclass
class IndexFixture:
    index_dir: Path
    catalog_dir: Path
    encoder: FixtureEncoder


def build_fixture_index(
    root: Path, *, n: int = 32, index_type: str = "flat", encoder: Any = None, catalog_dir: Path | None = None
) -> IndexFixture:
    """Build an index of a fixture catalog under `root` (catalog in root/catalog, index in root/index)."""
    from indexer.build import build_index
    from vitrine.catalog import read_catalog

    catalog_dir = catalog_dir or make_index_catalog(root / "catalog", n)
    encoder = encoder or FixtureEncoder()
    index_dir = root / "index"
    build_index(read_catalog(catalog_dir), encoder, index_dir, index_type=index_type, threads=2)
    return IndexFixture(index_dir, catalog_dir, encoder)


def export_tiny_bundle(out: Path) -> Path:
    """A real ONNX bundle of the untrained 'tiny' model (32-d), seeded: torch's initial seed is random on
    some installs, and tests that read its rankings (a reranker reorders them) must see the same ones."""
    import torch

    from trainer.export import export_bundle
    from trainer.factory import create_model, get_tokenizer

    torch.manual_seed(0)
    model = create_model("tiny", pretrained="none")
    return export_bundle(model, get_tokenizer("tiny"), out)
