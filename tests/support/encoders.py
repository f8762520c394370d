"""A deterministic numpy encoder for tests: no model, but real (colour) signal.

Embedding layout, all in one space:

    [ colour (len(COLOURS)) | word hash (HASH_DIM) | image appearance (APPEARANCE_DIM) ]

* text: colour words it names ("navy blue") -> colour dims; every word hashed into the
  word-hash dims (so equal titles embed equally and article words matter text-to-text).
* image: the mean colour of the non-background pixels, softly assigned to the colour
  prototypes -> colour dims (so "red" titles meet red photos); a flip-invariant colour
  histogram and symmetric grey thumbnail -> appearance dims (so a re-shot photo finds
  its product).
"""

from __future__ import annotations

import re
import zlib

import numpy as np
from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
    "navy blue": (30, 40, 90),
    "blue": (40, 90, 200),
    "brown": (120, 70, 30),
    "red": (200, 30, 30),
    "green": (40, 140, 60),
    "pink": (240, 140, 170),
    "purple": (110, 50, 140),
    "yellow": (240, 210, 40),
    "beige": (220, 200, 160),
    "silver": (190, 190, 195),
    "maroon": (110, 20, 30),
    "orange": (240, 130, 30),
    "gold": (210, 170, 60),
    "olive": (110, 110, 40),
    "cream": (250, 240, 210),
}
HASH_DIM = 64
HIST_BINS = 4  # per channel
THUMB = 8  # grey thumbnail side
APPEARANCE_DIM = HIST_BINS**3 + THUMB * THUMB // 2
BACKGROUND = 235  # pixels brighter than this in every channel are studio background
COLOUR_SIGMA = 45.0
_WORD = re.compile(r"[a-z0-9]+")
# Longest phrases first, so "navy blue" is not also read as "blue".
_COLOUR_PHRASES = sorted(COLOURS, key=len, reverse=True)
_PROTOTYPES = np.array(list(COLOURS.values()), dtype=np.float64)


def _normalise(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norms, 1e-12)).astype(np.float32)


class ColourHashEncoder:
    """Deterministic, numpy-only encoder implementing vitrine.evaluation.encoder.Encoder."""

    dim = len(COLOURS) + HASH_DIM + APPEARANCE_DIM

    def describe(self) -> str:
        return (
            f"ColourHashEncoder(colours={len(COLOURS)}, hash_dim={HASH_DIM}, appearance_dim={APPEARANCE_DIM})"
        )

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        for row, text in zip(out, texts):
            lowered = " " + " ".join(_WORD.findall(text.lower())) + " "
            for phrase in _COLOUR_PHRASES:
                if f" {phrase} " in lowered:
                    row[list(COLOURS).index(phrase)] = 2.0
                    lowered = lowered.replace(f" {phrase} ", " ")
            for word in lowered.split():
                row[len(COLOURS) + zlib.crc32(word.encode()) % HASH_DIM] += 1.0
            if not row.any():
                row[len(COLOURS)] = 1.0  # no words at all: still a unit vector
        return _normalise(out)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        return (
            _normalise(np.stack([self._image_features(im) for im in images]))
            if images
            else np.zeros((0, self.dim), np.float32)
        )

    def _image_features(self, image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image.convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.float64).reshape(
            -1, 3
        )
        foreground = pixels[~(pixels > BACKGROUND).all(axis=1)]
        if len(foreground) < 16:
            foreground = pixels
        mean = foreground.mean(axis=0)
        weights = np.exp(-((_PROTOTYPES - mean) ** 2).sum(axis=1) / (2 * COLOUR_SIGMA**2))
        colour = weights / max(weights.sum(), 1e-12)

        bins = np.minimum((foreground / 256 * HIST_BINS).astype(int), HIST_BINS - 1)
        codes = (bins[:, 0] * HIST_BINS + bins[:, 1]) * HIST_BINS + bins[:, 2]
        hist = np.bincount(codes, minlength=HIST_BINS**3) / len(foreground)

        grey = np.asarray(image.convert("L").resize((THUMB, THUMB), Image.BILINEAR), dtype=np.float64) / 255
        symmetric = (grey + grey[:, ::-1])[:, : THUMB // 2] / 2  # flip-invariant
        shape = symmetric.ravel() - symmetric.mean()

        features = np.zeros(self.dim)
        features[: len(COLOURS)] = colour / max(np.linalg.norm(colour), 1e-12)
        appearance = np.concatenate(
            [hist / max(np.linalg.norm(hist), 1e-12), shape / max(np.linalg.norm(shape), 1e-12)]
        )
        features[len(COLOURS) + HASH_DIM :] = appearance / max(np.linalg.norm(appearance), 1e-12)
        return features
