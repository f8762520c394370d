"""What the harness needs from a model, and batched calls to it.

Any `vitrine.protocols.Encoder` (encode_texts, encode_images, describe) is an encoder: an
ONNX bundle, a torch model wrapped by the trainer, or the deterministic test encoder. The
harness batches the calls, loads images lazily per batch and checks every
output at the boundary, so a misbehaving model fails loudly instead of
producing plausible-looking metrics.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from vitrine.catalog.product import ImageRef
from vitrine.errors import UserError
from vitrine.protocols import Encoder

# float16 models round-trip through float32; 1e-3 still catches unnormalised output.
NORM_TOLERANCE = 1e-3

T = TypeVar("T")


class EncoderError(UserError):
    """The encoder is missing, cannot be built, or returned malformed embeddings."""


def check_embeddings(embs: object, n: int, what: str, dim: int | None = None) -> np.ndarray:
    """Assert `embs` is float32 (n, d), finite and L2-normalised; returns it as an ndarray."""
    if not isinstance(embs, np.ndarray):
        raise EncoderError(f"{what}: encoder returned {type(embs).__name__}, expected a numpy array")
    if embs.dtype != np.float32:
        raise EncoderError(f"{what}: encoder returned dtype {embs.dtype}, expected float32")
    if embs.ndim != 2 or embs.shape[0] != n:
        raise EncoderError(f"{what}: encoder returned shape {embs.shape} for {n} inputs, expected ({n}, d)")
    if dim is not None and embs.shape[1] != dim:
        raise EncoderError(f"{what}: embedding dimension {embs.shape[1]} differs from {dim} seen before")
    if not np.isfinite(embs).all():
        raise EncoderError(f"{what}: encoder returned NaN or infinite values")
    if n:
        norms = np.linalg.norm(embs, axis=1)
        worst = norms[np.argmax(np.abs(norms - 1.0))]
        if abs(worst - 1.0) > NORM_TOLERANCE:
            raise EncoderError(f"{what}: embeddings are not L2-normalised (a row has norm {worst:.4f})")
    return embs


def encode_in_batches(
    encode: Callable[[list[T]], np.ndarray],
    items: Sequence,
    *,
    load: Callable[[int], T],
    batch_size: int,
    what: str,
    progress: bool | None = None,
) -> np.ndarray:
    """Encode `items` batch by batch; `load(i)` produces the i-th encoder input on demand.

    Only one batch of loaded inputs is alive at a time (catalog images never all sit in memory).
    `progress=None` shows a tqdm bar only on a terminal.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    n = len(items)
    parts: list[np.ndarray] = []
    dim: int | None = None
    with tqdm(
        total=n, desc=f"encoding {what}", unit=what, disable=(not progress) if progress is not None else None
    ) as bar:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            batch = [load(i) for i in range(start, stop)]
            embs = check_embeddings(encode(batch), stop - start, what, dim)
            dim = embs.shape[1]
            parts.append(embs)
            bar.update(stop - start)
    if not parts:
        raise UserError(f"nothing to encode ({what})")
    return np.concatenate(parts, axis=0)


def encode_texts(
    encoder: Encoder, texts: Sequence[str], *, batch_size: int = 64, progress: bool | None = None
) -> np.ndarray:
    """(len(texts), d) float32 text embeddings."""
    return encode_in_batches(
        encoder.encode_texts,
        texts,
        load=texts.__getitem__,
        batch_size=batch_size,
        what="texts",
        progress=progress,
    )


def open_image(ref: ImageRef, owner: str = "") -> Image.Image:
    """`ref.open()` with unreadable images reported as one clear error."""
    try:
        return ref.open()
    except (OSError, ValueError) as exc:
        where = f" of product {owner}" if owner else ""
        raise UserError(f"cannot read image {ref.describe()}{where}: {exc}") from exc


def encode_images(
    encoder: Encoder,
    refs: Sequence[ImageRef],
    *,
    batch_size: int = 64,
    progress: bool | None = None,
    transform: Callable[[int, Image.Image], Image.Image] | None = None,
) -> np.ndarray:
    """(len(refs), d) float32 image embeddings; images are opened per batch.

    `transform(i, image)` (e.g. a seeded shopper-photo transform) is applied after loading.
    """

    def load(i: int) -> Image.Image:
        image = open_image(refs[i])
        return transform(i, image) if transform is not None else image

    return encode_in_batches(
        encoder.encode_images, refs, load=load, batch_size=batch_size, what="images", progress=progress
    )


def check_encoder(obj: object, source: str) -> Encoder:
    """`obj` if it is an Encoder, else a clear error naming where it came from."""
    missing = [m for m in ("encode_texts", "encode_images", "describe") if not callable(getattr(obj, m, None))]
    if missing:
        raise EncoderError(f"{source} gave {type(obj).__name__}, which lacks {' and '.join(m + '()' for m in missing)}")
    assert isinstance(obj, Encoder)
    return obj


def load_encoder(spec: str) -> Encoder:
    """An encoder from "module:attr", attr being a class, a zero-argument factory or an instance."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise EncoderError(
            f"--encoder expects MODULE:ATTR (e.g. tests.encoders:ColourHashEncoder), got {spec!r}"
        )
    # Like uvicorn's --app-dir: modules in the working directory import from the `vitrine`
    # console script too (whose sys.path starts at its bin folder, not here).
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EncoderError(f"cannot import encoder module {module_name!r}: {exc}") from exc
    try:
        target = getattr(module, attr)
    except AttributeError as exc:
        raise EncoderError(f"module {module_name!r} has no attribute {attr!r}") from exc
    if inspect.isclass(target) or (callable(target) and not hasattr(target, "encode_texts")):
        try:
            target = target()
        except TypeError as exc:
            raise EncoderError(f"{spec} must be callable with no arguments: {exc}") from exc
    return check_encoder(target, spec)


def load_bundle_encoder(path: str | Path) -> Encoder:
    """An encoder from an exported model bundle."""
    from vitrine.runtime import load_bundle  # onnxruntime loads only when a bundle is evaluated

    path = Path(path)
    if not path.exists():
        raise EncoderError(f"bundle not found: {path}")
    return load_bundle(path)
