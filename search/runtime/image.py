"""Image preprocessing in numpy + Pillow and the ONNX image encoder.

`preprocess_image` reproduces open_clip's eval `image_transform` (the trainer's
`preprocess_val`) without torch: PIL resize, center crop (or pad), /255, normalise.
Every step uses the same PIL call and the same float32 arithmetic as torchvision,
so the pixels match to float rounding. One deliberate difference: the image is
converted to RGB *before* resizing (open_clip converts after), so palette and
greyscale uploads are resized as colour images; RGB inputs, which is what
catalog `ImageRef.open()` returns, are unaffected.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import onnxruntime as ort
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from search.errors import UserError

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
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
    if image.mode != settings.convert:
        image = image.convert(settings.convert)
    new_size = _resized_size(image.width, image.height, settings)
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


class ImageEncoder:
    """PIL images -> L2-normalised float32 embeddings (and patch features) through the ONNX image graph."""

    def __init__(
        self,
        session: ort.InferenceSession,
        settings: PreprocessSettings,
        *,
        embed_dim: int,
        input_name: str = "pixels",
        output_name: str = "embeddings",
        batch_size: int = 32,
        patches: PatchSpec | None = None,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"image batch size must be at least 1, got {batch_size}")
        self.session = session
        self.settings = settings
        self.embed_dim = embed_dim
        self.input_name = input_name
        self.output_name = output_name
        self.batch_size = batch_size
        self.patches = patches

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) float32 pixels -> (n, D) float32 embeddings."""
        size = self.settings.image_size
        assert pixels.ndim == 4 and pixels.shape[1:] == (3, size, size), pixels.shape
        (out,) = self.session.run([self.output_name], {self.input_name: pixels.astype(np.float32, copy=False)})
        assert out.shape == (pixels.shape[0], self.embed_dim), out.shape
        return out.astype(np.float32, copy=False)

    def encode_pixels_with_patches(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, 3, S, S) float32 pixels -> ((n, D) embeddings, (n, P, C) patch features), both float32."""
        spec = self._patch_spec()
        size = self.settings.image_size
        assert pixels.ndim == 4 and pixels.shape[1:] == (3, size, size), pixels.shape
        out, patches = self.session.run(
            [self.output_name, spec.output], {self.input_name: pixels.astype(np.float32, copy=False)}
        )
        assert out.shape == (pixels.shape[0], self.embed_dim), out.shape
        assert patches.shape == (pixels.shape[0], *spec.shape), (patches.shape, spec.shape)
        return out.astype(np.float32, copy=False), patches.astype(np.float32, copy=False)

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(len(images), D) float32 embeddings; preprocessed and run `batch_size` at a time."""
        images = self._image_list(images)
        if not images:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        parts = [self.encode_pixels(batch) for batch in self._pixel_batches(images)]
        return np.concatenate(parts, axis=0)

    def encode_with_patches(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """((len(images), D) embeddings, (len(images), P, C) patch features), float32."""
        spec = self._patch_spec()
        images = self._image_list(images)
        if not images:
            return np.zeros((0, self.embed_dim), np.float32), np.zeros((0, *spec.shape), np.float32)
        parts = [self.encode_pixels_with_patches(batch) for batch in self._pixel_batches(images)]
        return np.concatenate([e for e, _ in parts]), np.concatenate([p for _, p in parts])

    def _patch_spec(self) -> PatchSpec:
        if self.patches is None:
            raise UserError("this image encoder has no patches output (re-export the bundle with patches)")
        return self.patches

    @staticmethod
    def _image_list(images: Sequence[Image.Image]) -> list[Image.Image]:
        if isinstance(images, Image.Image):
            raise UserError("encode_images expects a list of PIL images, got a single image")
        return list(images)

    def _pixel_batches(self, images: list[Image.Image]) -> Iterator[np.ndarray]:
        for start in range(0, len(images), self.batch_size):
            yield preprocess_images(images[start : start + self.batch_size], self.settings)
