"""Image-trunk feature cache for LiT-style training with a locked image tower.

With the image tower frozen, its pooled features never change, so they are
computed once per (model, catalog) and training only runs the projection head.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from trainer.export import onnx_exportable_attention
from vitrine.catalog.product import Product

log = logging.getLogger(__name__)

# decoding threads: two on a small machine, more where cores would otherwise idle behind a GPU
DECODE_WORKERS = max(2, min(8, os.cpu_count() or 2))
PREFETCH = DECODE_WORKERS + 2  # batches decoded ahead of the forward pass
PARITY_TOLERANCE = 1e-3  # trunk features are O(1); ORT vs torch differ ~1e-5


def products_fingerprint(products: Sequence[Product]) -> str:
    """A stable hash of which products (ids, titles, images) a run saw."""
    h = hashlib.sha256()
    for p in products:
        h.update(json.dumps([p.id, p.title, [im.describe() for im in p.images]]).encode())
    return h.hexdigest()[:16]


def primary_image(product: Product) -> Image.Image:
    return product.image.open()


class _Trunk(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.image_trunk_features(pixels)


class OnnxTrunk:
    """The image trunk run by onnxruntime: several times faster than torch on a CPU for
    depthwise-conv nets like EfficientNet. Checked against torch before use."""

    def __init__(self, model, image_size: int, threads: int | None = None):
        import onnxruntime as ort

        self._dir = tempfile.TemporaryDirectory(prefix="vitrine-trunk-")
        path = Path(self._dir.name) / "trunk.onnx"
        dummy = torch.zeros(2, 3, image_size, image_size)
        with onnx_exportable_attention():
            torch.onnx.export(
                _Trunk(model).eval(), (dummy,), str(path), input_names=["pixels"], output_names=["features"],
                dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}}, dynamo=False,
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"pixels": pixels.numpy()})[0])


def choose_trunk(model, probe: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ONNX-run trunk when it matches torch on `probe` (CPU), else torch's own."""
    onnx_trunk = OnnxTrunk(model, model.image_size)
    diff = float((onnx_trunk(probe) - model.image_trunk_features(probe)).abs().max())
    if diff <= PARITY_TOLERANCE:
        return onnx_trunk
    log.warning("ONNX trunk differs from torch by %.2e; using torch", diff)
    return model.image_trunk_features


@torch.no_grad()
def compute_image_features(
    model,
    preprocess: Callable,
    products: Sequence[Any],
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "image features",
    open_image: Callable[[Any], Image.Image] = primary_image,
) -> np.ndarray:
    """Pooled trunk features [N, F] of each item's image (a product's primary image by default)."""
    model.eval()

    def load(batch: Sequence[Any]) -> torch.Tensor:
        return torch.stack([preprocess(open_image(item)) for item in batch])

    trunk = model.image_trunk_features
    if torch.device(device).type == "cpu" and len(products) > batch_size:
        trunk = choose_trunk(model, load(products[:4]))
    feats: list[np.ndarray] = []
    batches = [products[i : i + batch_size] for i in range(0, len(products), batch_size)]
    # PIL decoding releases the GIL, so threads overlap loading with the forward pass;
    # only PREFETCH batches are in flight, so memory stays bounded.
    with ThreadPoolExecutor(max_workers=DECODE_WORKERS) as pool:
        pending = deque(pool.submit(load, b) for b in batches[:PREFETCH])
        for i in tqdm(range(len(batches)), desc=desc, disable=not progress):
            pixels = pending.popleft().result()
            if i + PREFETCH < len(batches):
                pending.append(pool.submit(load, batches[i + PREFETCH]))
            out = trunk(pixels.to(device))
            feats.append(out.float().cpu().numpy())
    arr = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    assert arr.shape[0] == len(products)
    return arr.astype(np.float32)


def cached_image_features(
    model,
    preprocess: Callable,
    products: Sequence[Product],
    cache_dir: Path,
    model_key: str,
    **kw,
) -> np.ndarray:
    """Like `compute_image_features`, reusing `cache_dir/<key>.npz` when it matches."""
    key = hashlib.sha256(f"{model_key}|{products_fingerprint(products)}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"image-features-{key}.npz"
    ids = np.array([p.id for p in products])
    if path.is_file():
        with np.load(path) as z:
            if np.array_equal(z["ids"], ids):
                log.info("image features from cache %s", path)
                return z["features"]
    feats = compute_image_features(model, preprocess, products, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, ids=ids, features=feats)
    tmp.replace(path)
    return feats
