"""Compact patch features: PCA channels, int8 codes with one scale per product.

The reranker reads each candidate's (P, C) patch grid (7 x 7 x 320 for the demo bundle: 31,360 B a
product in float16). Stored compactly, a product keeps `r` PCA coefficients per patch as int8:

    coef = ((patch - mean) @ components.T) / component_std         (P, r), whitened
    code = round(coef / scale), scale = max|coef| / 127            one float16 scale per product
    patch ~ mean + (code * scale * component_std) @ components     what `decode` gives the reranker

P * r + 2 bytes a product (49 x 24 + 2 = 1,178 B at the default r). The basis (mean, components,
std; ~30 KB) is fitted once on the first build's patches and kept by upserts, so codes of every
version of an index decode with the same basis.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CODE_DTYPE = np.int8
SCALE_DTYPE = np.float16
DEFAULT_COMPONENTS = 24  # 49 x 24 int8 + a scale = 1,178 B a product (issue 13: <= 3 KB a product in all)
CODE_BUDGET = 49 * DEFAULT_COMPONENTS  # int8 code bytes a product; a coarser grid keeps more channels a patch


def components_for(num_patches: int, dim: int) -> int:
    """PCA channels a patch keeps within CODE_BUDGET: 24 of 320 on a 7 x 7 grid, 130 on 3 x 3."""
    return max(1, min(dim, CODE_BUDGET // max(1, num_patches)))
FIT_MAX_PRODUCTS = 4096  # products sampled to fit the basis (x P patch rows)
_ENCODE_CHUNK = 4096


@dataclass(frozen=True)
class PatchCodec:
    """A fitted PCA basis: `encode` (n, P, C) -> int8 codes (n, P, r) + scales (n,), `decode` back."""

    mean: np.ndarray  # float32 (C,)
    components: np.ndarray  # float32 (r, C), orthonormal rows
    std: np.ndarray  # float32 (r,), the coefficients' standard deviation on the fitting sample

    @property
    def num_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def dim(self) -> int:
        return int(self.components.shape[1])

    @classmethod
    def fit(cls, patches: np.ndarray, components: int = DEFAULT_COMPONENTS, *, seed: int = 0) -> PatchCodec:
        """PCA of the patch rows of up to FIT_MAX_PRODUCTS products of `patches` (n, P, C)."""
        n, _, c = patches.shape
        if n == 0:
            raise ValueError("cannot fit a patch basis on no products")
        rows = np.sort(np.random.default_rng(seed).choice(n, min(n, FIT_MAX_PRODUCTS), replace=False))
        x = np.asarray(patches[rows], dtype=np.float64).reshape(-1, c)
        mean = x.mean(axis=0)
        x -= mean
        cov = x.T @ x / max(1, x.shape[0] - 1)
        values, vectors = np.linalg.eigh(cov)
        order = np.argsort(values)[::-1][: min(components, c)]
        basis = vectors[:, order].T  # (r, C)
        std = np.sqrt(np.maximum(values[order], 0.0))
        std = np.where(std > 1e-12, std, 1.0)  # a constant channel: any scale decodes it
        return cls(mean.astype(np.float32), np.ascontiguousarray(basis, dtype=np.float32), std.astype(np.float32))

    def encode(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, P, C) float -> (codes int8 (n, P, r), scales float16 (n,))."""
        n, p, c = patches.shape
        assert c == self.dim, (patches.shape, self.dim)
        codes = np.empty((n, p, self.num_components), CODE_DTYPE)
        scales = np.empty(n, SCALE_DTYPE)
        for start in range(0, n, _ENCODE_CHUNK):
            block = np.asarray(patches[start : start + _ENCODE_CHUNK], dtype=np.float32)
            coef = ((block - self.mean) @ self.components.T) / self.std
            peak = np.abs(coef).max(axis=(1, 2))
            scale = np.where(peak > 0, peak / 127.0, 1.0).astype(SCALE_DTYPE)
            # divide by the float16 scale actually stored, so decoding multiplies by the same number
            q = np.rint(coef / scale.astype(np.float32)[:, None, None])
            codes[start : start + len(block)] = np.clip(q, -127, 127).astype(CODE_DTYPE)
            scales[start : start + len(block)] = scale
        return codes, scales

    def decode(self, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """(codes (n, P, r), scales (n,)) -> float32 (n, P, C)."""
        coef = np.asarray(codes, dtype=np.float32) * np.asarray(scales, dtype=np.float32)[:, None, None]
        return (coef * self.std) @ self.components + self.mean

    def bytes_per_product(self, num_patches: int) -> int:
        return num_patches * self.num_components * np.dtype(CODE_DTYPE).itemsize + np.dtype(SCALE_DTYPE).itemsize

    def save(self, path: Path) -> None:
        with open(path, "wb") as fh:  # np.savez would append .npz to a name without it
            np.savez(fh, mean=self.mean, components=self.components, std=self.std)

    @classmethod
    def load(cls, path: Path) -> PatchCodec:
        with np.load(path) as data:
            return cls(data["mean"].astype(np.float32), data["components"].astype(np.float32), data["std"].astype(np.float32))


class CompactPatches:
    """A version's compact patches, memory-mapped, read as float32 (n, P, C) like the full array.

    Indexing with rows decodes just those rows, so `ProductIndex`/`QdrantIndex` read compact and
    full patches the same way (`np.asarray(patches[rows], dtype=np.float32)`).
    """

    def __init__(self, codes: np.ndarray, scales: np.ndarray, codec: PatchCodec) -> None:
        assert codes.ndim == 3 and scales.shape == (codes.shape[0],), (codes.shape, scales.shape)
        assert codes.shape[2] == codec.num_components, (codes.shape, codec.num_components)
        self.codes = codes
        self.scales = scales
        self.codec = codec

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]), self.codec.dim)

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        return self.codec.decode(self.codes[rows], self.scales[rows])
