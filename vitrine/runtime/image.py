"""The ONNX image encoder: PIL images -> embeddings (and patch features)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image

from vitrine.errors import UserError
from vitrine.runtime.patch_grid import pool_patches
from vitrine.runtime.preprocess import PatchSpec, PreprocessSettings, preprocess_images


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
        patch_grid: tuple[int, int] | None = None,
    ) -> None:
        """`patches`: the graph's patch output. `patch_grid`: a coarser grid to pool it to (the grid a
        bundle's reranker reads), so what is stored and served is already the reranker's input."""
        if batch_size < 1:
            raise UserError(f"image batch size must be at least 1, got {batch_size}")
        self.session = session
        self.settings = settings
        self.embed_dim = embed_dim
        self.input_name = input_name
        self.output_name = output_name
        self.batch_size = batch_size
        self.graph_patches = patches
        self.patches = patches
        if patches is not None and patch_grid is not None and tuple(patch_grid) != tuple(patches.grid):
            self.patches = patches.model_copy(update={"grid": tuple(patch_grid)})

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
        graph = self.graph_patches
        assert patches.shape == (pixels.shape[0], *graph.shape), (patches.shape, graph.shape)
        if graph.grid != spec.grid:
            return out.astype(np.float32, copy=False), pool_patches(patches, graph.grid, spec.grid)
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
