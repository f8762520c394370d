"""Image preprocessing in numpy + Pillow: the eval transform's settings and its torch-free replica.

`preprocess_image` reproduces open_clip's eval `image_transform` (the trainer's
`preprocess_val`) without torch: PIL resize, center crop (or pad), /255, normalise.
Every step uses the same PIL call and the same float32 arithmetic as torchvision,
so the pixels match to float rounding. One deliberate difference: the image is
converted to RGB *before* resizing (open_clip converts after), so palette and
greyscale uploads are resized as colour images; RGB inputs, which is what
catalog `ImageRef.open()` returns, are unaffected.

No onnxruntime here: the bundle manifest's schema and the trainer import this module.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vitrine.errors import UserError

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
# The resize is bounded before it runs: with "shortest", a 1x10000 image at 224 px would become
# 224x2,240,000 px (GBs). At most this many crops' worth of pixels (a 64:1 aspect ratio) is resized.
MAX_RESIZED_CROPS = 64
# The crop open_clip's image_transform pairs with each resize mode.
DEFAULT_CROP = {"shortest": "center", "longest": "center_or_pad", "squash": "none"}


class PreprocessSettings(BaseModel):
    """How a PIL image becomes the `pixels` input: the eval transform's parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(ge=1)
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    crop: Literal["center", "center_or_pad", "none"] | None = None  # None: open_clip's pairing for resize_mode
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fill_color: int = Field(default=0, ge=0, le=255)
    convert: Literal["RGB"] = "RGB"

    @model_validator(mode="after")
    def _check(self) -> PreprocessSettings:
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.crop is None:
            object.__setattr__(self, "crop", DEFAULT_CROP[self.resize_mode])
        return self


class PatchSpec(BaseModel):
    """The image graph's second output: patch features float32 [batch, P, C], P = grid h * w, row-major."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: str = "patches"
    grid: tuple[int, int]
    dim: int = Field(ge=1)

    @model_validator(mode="after")
    def _check(self) -> PatchSpec:
        if min(self.grid) < 1:
            raise ValueError(f"grid must be two positive sizes, got {self.grid}")
        return self

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def shape(self) -> tuple[int, int]:
        """(P, C) of one image's patches."""
        return self.num_patches, self.dim


def _resized_size(width: int, height: int, s: PreprocessSettings) -> tuple[int, int]:
    """(width, height) after the resize step, computed as torchvision/open_clip do."""
    size = s.image_size
    if s.resize_mode == "squash":
        return size, size
    if s.resize_mode == "shortest":
        # torchvision F.resize with an int: shortest side -> size, the other truncated.
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    # open_clip ResizeKeepRatio(longest=1): the longest side -> size, rounded.
    ratio = max(height / size, width / size)
    return round(width / ratio), round(height / ratio)


def checked_resized_size(width: int, height: int, settings: PreprocessSettings) -> tuple[int, int]:
    """`_resized_size`, or UserError when the resize would be degenerate or too large to do."""
    new_width, new_height = _resized_size(width, height, settings)
    if new_width < 1 or new_height < 1:
        raise UserError(f"image of {width}x{height} px is too thin to resize to {settings.image_size} px")
    if new_width * new_height > MAX_RESIZED_CROPS * settings.image_size**2:
        raise UserError(
            f"image of {width}x{height} px is too elongated: its aspect ratio is over {MAX_RESIZED_CROPS}:1"
        )
    return new_width, new_height


def _center_crop_or_pad(pixels: np.ndarray, size: int, *, pad: bool, fill: int) -> np.ndarray:
    """Center crop an (H, W, 3) uint8 array to (size, size), padding first when `pad` and it is smaller."""
    height, width = pixels.shape[:2]
    if pad and (height < size or width < size):
        top = (size - height) // 2 if size > height else 0
        left = (size - width) // 2 if size > width else 0
        bottom = (size - height + 1) // 2 if size > height else 0
        right = (size - width + 1) // 2 if size > width else 0
        pixels = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), constant_values=fill)
        height, width = pixels.shape[:2]
    if height < size or width < size:
        raise UserError(f"image of {width}x{height} px is smaller than the {size} px crop")
    # torchvision rounds the offsets with Python's round (halves to even).
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return pixels[top : top + size, left : left + size]


def preprocess_image(image: Image.Image, settings: PreprocessSettings) -> np.ndarray:
    """float32 (3, S, S) normalised pixels for one image."""
    if not isinstance(image, Image.Image):
        raise UserError(f"expected a PIL image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise UserError(f"image has no pixels ({image.width}x{image.height})")
    new_size = checked_resized_size(image.width, image.height, settings)  # before any pixel work
    if image.mode != settings.convert:
        image = image.convert(settings.convert)
    if new_size != image.size:
        image = image.resize(new_size, _RESAMPLE[settings.interpolation])
    pixels = np.asarray(image, dtype=np.uint8)
    if settings.crop != "none":
        pixels = _center_crop_or_pad(
            pixels, settings.image_size, pad=settings.crop == "center_or_pad", fill=settings.fill_color
        )
    # Same float32 arithmetic as ToTensor (x / 255) and Normalize ((x - mean) / std).
    chw = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(settings.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(settings.std, dtype=np.float32)[:, None, None]
    out = (chw - mean) / std
    assert out.shape == (3, settings.image_size, settings.image_size), out.shape
    return out


def preprocess_images(images: Sequence[Image.Image], settings: PreprocessSettings) -> np.ndarray:
    """float32 (n, 3, S, S) batch."""
    size = settings.image_size
    if not images:
        return np.zeros((0, 3, size, size), dtype=np.float32)
    return np.ascontiguousarray(np.stack([preprocess_image(im, settings) for im in images]))
