"""`load_bundle`: an exported model bundle as an onnxruntime encoder (see `vitrine.runtime.manifest`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vitrine.runtime.image import ImageEncoder
from vitrine.runtime.manifest import BundleError, BundleManifest, bundle_fingerprint, read_manifest, verify_files
from vitrine.runtime.preprocess import PatchSpec
from vitrine.runtime.reranker import RerankerSpec, reranker_spec
from vitrine.runtime.session import make_session
from vitrine.runtime.text import TextEncoder
from vitrine.runtime.tokenizer import TextTokenizer
from vitrine.scoring import Alphas


class BundleEncoder:
    """An exported model bundle as an encoder: `encode_texts` / `encode_images` on onnxruntime."""

    def __init__(
        self,
        path: Path,
        manifest: BundleManifest,
        text: TextEncoder,
        image: ImageEncoder,
        fingerprint: str,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.text = text
        self.image = image
        self.fingerprint = fingerprint

    @property
    def alphas(self) -> Alphas:
        """The bundle's α, per query kind (see `vitrine.scoring`)."""
        return Alphas.of(self.manifest)

    @property
    def embed_dim(self) -> int:
        return self.manifest.embed_dim

    @property
    def image_size(self) -> int:
        return self.manifest.image_size

    @property
    def embeds_like(self) -> str | None:
        return self.manifest.embeds_like

    @property
    def model_name(self) -> str:
        return self.manifest.model.name

    @property
    def patch_spec(self) -> PatchSpec | None:
        """The patch features this encoder gives (grid, dim): the image graph's, pooled to the grid of
        the bundle's reranker when it reads a coarser one; None when the bundle has none."""
        return self.image.patches

    @property
    def reranker_spec(self) -> RerankerSpec | None:
        """The cross-encoder this bundle carries (`vitrine rerank export`), or None."""
        return reranker_spec(self.manifest)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """float32 (len(texts), D), rows L2-normalised."""
        return self.text.encode(texts)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """float32 (len(images), D), rows L2-normalised."""
        return self.image.encode(images)

    def encode_images_with_patches(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """(float32 (len(images), D) L2-normalised embeddings, float32 (len(images), P, C) patch features)."""
        if self.patch_spec is None:
            raise BundleError(f"bundle {self.path} has no patches output; re-export it with this version's trainer")
        return self.image.encode_with_patches(images)

    def describe(self) -> str:
        return f"bundle {self.model_name} {self.fingerprint} ({self.path})"


def _reranker_grid(manifest: BundleManifest) -> tuple[int, int] | None:
    """The coarser grid the bundle's reranker reads, when it pools the image graph's patches."""
    from vitrine.runtime.reranker import reranker_spec

    spec = reranker_spec(manifest)
    if spec is None or manifest.patches is None or spec.source_grid is None:
        return None
    if tuple(spec.source_grid) != tuple(manifest.patches.grid):
        raise BundleError(f"the reranker pools a {spec.source_grid} grid, the image graph gives {manifest.patches.grid}")
    return tuple(spec.patch_grid)


def load_bundle(
    path: str | Path,
    *,
    threads: int | None = None,
    device: str = "cpu",
    verify: bool = True,
    text_batch_size: int = 64,
    image_batch_size: int = 32,
) -> BundleEncoder:
    """Open a bundle directory for encoding.

    threads: ORT intra-op threads per session (default $VITRINE_THREADS or 2).
    device: "cpu", "cuda" (CPU fallback with a warning when unavailable) or "auto".
    verify: check every file against its sha256 in the manifest.
    """
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    tokenizer = TextTokenizer.from_dir(path / manifest.tokenizer.dir, manifest.tokenizer)
    text_spec, image_spec = manifest.text_encoder, manifest.image_encoder
    text = TextEncoder(
        make_session(path / text_spec.file, threads=threads, device=device),
        tokenizer,
        embed_dim=manifest.embed_dim,
        input_name=text_spec.input_name,
        output_name=text_spec.output_name,
        batch_size=text_batch_size,
    )
    image_session = make_session(path / image_spec.file, threads=threads, device=device)
    if manifest.patches is not None:
        outputs = [o.name for o in image_session.get_outputs()]
        if manifest.patches.output not in outputs:
            raise BundleError(
                f"bundle {path}: the manifest lists a {manifest.patches.output!r} output, but "
                f"{image_spec.file} only has {', '.join(outputs)}"
            )
    image = ImageEncoder(
        image_session,
        manifest.preprocess,
        embed_dim=manifest.embed_dim,
        input_name=image_spec.input_name,
        output_name=image_spec.output_name,
        batch_size=image_batch_size,
        patches=manifest.patches,
        patch_grid=_reranker_grid(manifest),
    )
    return BundleEncoder(path, manifest, text, image, bundle_fingerprint(path))
