"""Shopper photos for I2P evaluation: seeded, realistic re-shoots of a product's catalog photo."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# I2P photo transform ranges.
CROP_RANGE = (0.80, 0.95)  # kept fraction of each side
FLIP_PROBABILITY = 0.5
ENHANCE_RANGE = (0.90, 1.10)  # brightness, contrast, saturation factors
JPEG_QUALITY_RANGE = (60, 90)  # inclusive


def shopper_photo(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A seeded, realistic re-shoot of a catalog photo.

    Random crop keeping 80-95 % of each side, horizontal flip (p = 0.5), brightness, contrast
    and saturation each within ±10 %, then a JPEG round trip at quality 60-90.
    """
    width, height = image.size
    keep_w, keep_h = rng.uniform(*CROP_RANGE, size=2)
    crop_w, crop_h = max(1, round(width * keep_w)), max(1, round(height * keep_h))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    flip = rng.random() < FLIP_PROBABILITY
    factors = rng.uniform(*ENHANCE_RANGE, size=3)
    quality = int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1))

    photo = image.convert("RGB").crop((left, top, left + crop_w, top + crop_h))
    if flip:
        photo = ImageOps.mirror(photo)
    for enhancer, factor in zip(
        (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), factors
    ):
        photo = enhancer(photo).enhance(float(factor))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as reloaded:
        return reloaded.convert("RGB")


def shopper_photo_rng(seed: int, product_index: int) -> np.random.Generator:
    """The generator for one product's query photo: independent of batch size and query order."""
    return np.random.default_rng([seed, 3, product_index])


def i2p_query_products(num_products: int, num_queries: int, seed: int) -> np.ndarray:
    """min(num_queries, num_products) distinct seeded product indices to photograph."""
    rng = np.random.default_rng([seed, 5])
    return np.sort(rng.choice(num_products, size=min(num_queries, num_products), replace=False))
