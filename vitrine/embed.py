"""Embedding a catalog: titles and images through the encoder, batched, with image work in threads.

Per batch, a thread pool reads, hashes, decodes and preprocesses the images of the
next batches while the main thread runs the encoder (onnxruntime releases the GIL),
so decoding overlaps inference. With a bundle encoder the pool produces the model's
input pixels (`vitrine.runtime.preprocess_image`) and the main thread only runs the
ONNX graph; any other encoder gets decoded PIL images.

When the encoder has a `patch_spec` (a bundle exported with patches), each image also
yields its patch features, kept as float16 (n, P, C) beside the vectors.

A product whose data is bad (empty title, unreadable image) becomes a ProductError
and is skipped (or, with `strict`, raises). An encoder that raises is not a product
problem: the error propagates.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from vitrine.catalog.product import Product
from vitrine.errors import UserError
from vitrine.images import read_image
from vitrine.protocols import ServingEncoder
from vitrine.runtime.preprocess import PatchSpec

DEFAULT_BATCH_SIZE = 64
PREFETCH_BATCHES = 2  # batches being decoded ahead of the encoder
TEXT_GROUP = 512  # titles encoded together: sorted by length, they pad less (~1.3-1.6x faster)
PATCH_DTYPE = np.float16  # patch features are O(1..10): half precision halves what each product stores


class ProductError(BaseModel):
    """One product that could not be embedded (a row-level report, never a crash), and why."""

    model_config = ConfigDict(frozen=True)

    id: str
    stage: str  # record | image | embedding
    message: str


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def content_hash(product: Product, image_digest: str) -> str:
    """What decides whether an upsert re-embeds a product: its shown fields and its image bytes."""
    fields = [product.title, product.category, product.subcategory, product.description,
              sorted(product.attributes.items()), product.image.describe(), image_digest]  # fmt: skip
    return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode()).hexdigest()[:32]


@dataclass
class _Prepared:
    product: Product
    image_ref: dict[str, Any]
    content_hash: str
    image_input: Any = None  # pixels or PIL image; None when unchanged
    unchanged: bool = False


@dataclass
class EmbeddingResult:
    """Embedded products (row i of `text`/`image` is `products[i]`), skipped ones and failures."""

    products: list[Product]
    image_refs: list[dict[str, Any]]
    content_hashes: list[str]
    text: np.ndarray  # (n, D) float32
    image: np.ndarray  # (n, D) float32
    unchanged: list[str] = field(default_factory=list)  # ids whose content hash matched
    errors: list[ProductError] = field(default_factory=list)
    seconds: float = 0.0
    patches: np.ndarray | None = None  # (n, P, C) float16 when the encoder has a patch_spec

    def __post_init__(self) -> None:
        n = len(self.products)
        assert self.text.shape[0] == n and self.image.shape == self.text.shape, (n, self.text.shape, self.image.shape)
        assert len(self.image_refs) == n and len(self.content_hashes) == n
        if self.patches is not None:
            assert self.patches.ndim == 3 and self.patches.shape[0] == n, (n, self.patches.shape)
            assert self.patches.dtype == PATCH_DTYPE, self.patches.dtype

    @property
    def products_per_s(self) -> float | None:
        return len(self.products) / self.seconds if self.seconds > 0 and self.products else None


class _ImageStage:
    """Per-image work for the pool and the batched encoder call for the main thread.

    A model bundle takes the pool's preprocessed pixels, so the main thread only runs the ONNX
    graph; any other encoder gets decoded PIL images. `encode` returns (embeddings, patches or None).
    """

    def __init__(self, encoder: ServingEncoder) -> None:
        from vitrine.runtime.bundle import BundleEncoder  # onnxruntime: only when embedding

        self.patch_spec = encoder.patch_spec
        with_patches = self.patch_spec is not None
        self.encode: Callable[[list[Any]], tuple[np.ndarray, np.ndarray | None]]
        if isinstance(encoder, BundleEncoder):
            from vitrine.runtime.preprocess import preprocess_image

            runtime, settings = encoder.image, encoder.image.settings
            self.prepare: Callable[[Image.Image], Any] = lambda im: preprocess_image(im, settings)
            if with_patches:
                self.encode = lambda xs: runtime.encode_pixels_with_patches(np.stack(xs))
            else:
                self.encode = lambda xs: (runtime.encode_pixels(np.stack(xs)), None)
        else:
            self.prepare = lambda im: im
            if with_patches:
                self.encode = lambda xs: encoder.encode_images_with_patches(list(xs))
            else:
                self.encode = lambda xs: (encoder.encode_images(list(xs)), None)


class ProductEmbedder:
    """Embeds products' titles and images with `encoder` (encode_texts / encode_images)."""

    def __init__(
        self,
        encoder: ServingEncoder,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        threads: int | None = None,
        progress: bool = False,
        desc: str = "indexing",
        strict: bool = False,
    ) -> None:
        """strict: the first product with bad data raises UserError instead of being skipped."""
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.encoder = encoder
        self.batch_size = batch_size
        self.threads = default_threads() if threads is None else threads
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.progress = progress
        self.desc = desc
        self.strict = strict
        self.images = _ImageStage(encoder)
        self.dim: int = encoder.embed_dim

    def _prepare(self, product: Product, known_hashes: Mapping[str, str]) -> _Prepared | ProductError:
        """Pool work for one product; bad data becomes a ProductError."""
        if not product.title.strip():
            return ProductError(id=product.id, stage="record", message="empty title")
        try:
            image, digest, ref = read_image(product.image)
        except Exception as exc:  # any decoder failure is this product's problem
            return ProductError(id=product.id, stage="image", message=f"unreadable image {product.image.describe()}: {_describe(exc)}")
        prepared = _Prepared(product, ref, content_hash(product, digest))
        if known_hashes.get(product.id) == prepared.content_hash:
            prepared.unchanged = True
            return prepared
        try:
            prepared.image_input = self.images.prepare(image)
        except Exception as exc:
            return ProductError(id=product.id, stage="image", message=f"cannot preprocess image {product.image.describe()}: {_describe(exc)}")
        return prepared

    @property
    def patch_spec(self) -> PatchSpec | None:
        """The encoder's PatchSpec, or None when it gives no patch features."""
        return self.images.patch_spec

    def _check_patches(self, out: np.ndarray, n: int) -> np.ndarray:
        """Encoder patches (n, P, C) -> float16; inf where a value overflows half precision."""
        spec = self.patch_spec
        out = np.asarray(out)
        if out.shape != (n, *spec.shape):
            raise RuntimeError(f"encoder returned patch features of shape {out.shape} for {n} inputs, expected {(n, *spec.shape)}")
        with np.errstate(over="ignore"):  # overflow becomes inf, which the finiteness check reports
            return out.astype(PATCH_DTYPE)

    def _check(self, name: str, out: np.ndarray, n: int) -> np.ndarray:
        out = np.asarray(out)
        if out.ndim != 2 or out.shape[0] != n:
            raise RuntimeError(f"encoder returned {name} embeddings of shape {out.shape} for {n} inputs")
        if out.shape[1] != self.dim:
            raise RuntimeError(f"encoder returned {name} embeddings of dim {out.shape[1]}, expected {self.dim}")
        return out.astype(np.float32, copy=False)

    def embed(self, products: Sequence[Product], *, known_hashes: Mapping[str, str] | None = None) -> EmbeddingResult:
        """Embed every product whose content hash differs from `known_hashes` (all when None).

        Images are encoded a batch at a time as the pool delivers them; titles wait for
        TEXT_GROUP of them, so the text encoder can sort them by length and pad less.
        """
        known = known_hashes or {}
        start = time.perf_counter()
        kept: list[_Prepared] = []
        texts: list[np.ndarray] = []
        images: list[np.ndarray] = []
        spec = self.patch_spec
        # Filled in place: a whole catalog's patches are large (49 x 320 x 2 bytes a product), so
        # never a list of batches plus their concatenation. Untouched pages cost no memory.
        patches = np.empty((len(products), *spec.shape), PATCH_DTYPE) if spec is not None else None
        patches_finite: list[np.ndarray] = []
        unchanged: list[str] = []
        errors: list[ProductError] = []
        batches = (products[i : i + self.batch_size] for i in range(0, len(products), self.batch_size))
        pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="index-decode")
        pending: deque[list[Future]] = deque()

        def submit_next() -> None:
            batch = next(batches, None)
            if batch is not None:
                pending.append([pool.submit(self._prepare, p, known) for p in batch])

        def encode_titles() -> None:
            titles = [p.product.title for p in kept[sum(len(t) for t in texts) :]]
            if titles:
                texts.append(self._check("text", self.encoder.encode_texts(titles), len(titles)))

        bar = tqdm(total=len(products), desc=self.desc, unit=" products", disable=not self.progress, dynamic_ncols=True)
        try:
            for _ in range(PREFETCH_BATCHES):
                submit_next()
            while pending:
                results = [f.result() for f in pending.popleft()]
                submit_next()  # keep the pool busy while this batch is encoded
                ready = []
                for item in results:
                    if isinstance(item, ProductError):
                        if self.strict:
                            raise UserError(f"product {item.id}: {item.message}")
                        errors.append(item)
                    elif item.unchanged:
                        unchanged.append(item.product.id)
                    else:
                        ready.append(item)
                if ready:
                    embedded, patch_features = self.images.encode([p.image_input for p in ready])
                    images.append(self._check("image", embedded, len(ready)))
                    if patches is not None:
                        half = self._check_patches(patch_features, len(ready))
                        patches[len(kept) : len(kept) + len(ready)] = half
                        patches_finite.append(np.isfinite(half).all(axis=(1, 2)))
                    for item in ready:
                        item.image_input = None  # pixels are 0.6 MB a product at 224 px: never keep them
                    kept += ready
                    if len(kept) - sum(len(t) for t in texts) >= TEXT_GROUP:
                        encode_titles()
                bar.update(len(results))
                if errors:
                    bar.set_postfix(errors=len(errors), refresh=False)
            encode_titles()
        finally:
            bar.close()
            pool.shutdown(wait=True, cancel_futures=True)
        dim = self.dim
        text = np.concatenate(texts) if texts else np.zeros((0, dim), np.float32)
        image = np.concatenate(images) if images else np.zeros((0, dim), np.float32)
        finite = np.isfinite(text).all(axis=1) & np.isfinite(image).all(axis=1)
        if patches is not None:
            finite &= np.concatenate(patches_finite) if patches_finite else np.zeros(0, bool)
            patches = patches[: len(kept)] if finite.all() else patches[: len(kept)][finite]
        for item in (p for p, ok in zip(kept, finite) if not ok):
            error = ProductError(id=item.product.id, stage="embedding", message="the encoder returned a non-finite embedding")
            if self.strict:
                raise UserError(f"product {error.id}: {error.message}")
            errors.append(error)
        kept = [p for p, ok in zip(kept, finite) if ok]
        return EmbeddingResult(
            products=[p.product for p in kept],
            image_refs=[p.image_ref for p in kept],
            content_hashes=[p.content_hash for p in kept],
            text=text[finite],
            image=image[finite],
            unchanged=unchanged,
            errors=errors,
            seconds=time.perf_counter() - start,
            patches=patches,
        )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
