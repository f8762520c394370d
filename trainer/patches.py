"""Per-product bundle features for training the reranker: what the index stores, cached on disk.

The cross-encoder reranker is served from the vectors and float16 patch features the indexer
stores, so it trains on exactly those: they come from the bundle's own ONNX encoders
(`load_bundle`) through the indexer's `ProductEmbedder` (same image decoding in a thread pool,
preprocessing, batching and float16 rounding). They are computed once per (bundle, product
list) and kept under `cache_dir` as .npy files; patches are memory-mapped when read back.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.features import products_fingerprint
from vitrine.catalog.product import Product
from vitrine.embed import PATCH_DTYPE, ProductEmbedder
from vitrine.errors import UserError
from vitrine.runtime.bundle import BundleEncoder, load_bundle
from vitrine.runtime.manifest import BundleError

log = logging.getLogger(__name__)

CACHE_PREFIX = "bundle-features-"
_ARRAYS = ("ids", "text", "image", "patches")


@dataclass(frozen=True)
class ProductFeatures:
    """Row i of every array belongs to product `ids[i]` (the order of the products given)."""

    ids: np.ndarray  # str (N,)
    text: np.ndarray  # float32 (N, D), L2-normalised title embeddings
    image: np.ndarray  # float32 (N, D), L2-normalised image embeddings
    patches: np.ndarray  # float16 (N, P, C) patch features (a read-only memmap when from the cache)

    def __post_init__(self) -> None:
        n = self.ids.shape[0]
        assert self.ids.ndim == 1 and self.ids.dtype.kind == "U", (self.ids.shape, self.ids.dtype)
        assert self.text.ndim == 2 and self.text.shape[0] == n and self.image.shape == self.text.shape, (n, self.text.shape, self.image.shape)
        assert self.text.dtype == np.float32 and self.image.dtype == np.float32, (self.text.dtype, self.image.dtype)
        assert self.patches.ndim == 3 and self.patches.shape[0] == n and self.patches.dtype == PATCH_DTYPE, (n, self.patches.shape, self.patches.dtype)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def bundle_product_features(
    bundle_dir: str | Path,
    products: Sequence[Product],
    cache_dir: str | Path,
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> ProductFeatures:
    """Title/image embeddings and patch features of `products` from the bundle at `bundle_dir`.

    Cached under `cache_dir`, keyed by the bundle fingerprint and `products_fingerprint(products)`;
    a later call with the same bundle and products reads the cache. Training data must be clean:
    a product with an empty title or an image that fails to open raises UserError naming it.
    """
    products = list(products)
    if not products:
        raise UserError("no products to encode")
    repeated = [ident for ident, count in Counter(p.id for p in products).items() if count > 1]
    if repeated:
        raise UserError(f"product id {repeated[0]!r} occurs more than once; each product must be listed once")
    ids = np.array([p.id for p in products], dtype=str)
    bundle = load_bundle(bundle_dir)
    spec = bundle.patch_spec
    if spec is None:
        raise BundleError(f"bundle {bundle.path} has no patches output; re-export it with this version's trainer")
    key = hashlib.sha256(f"{bundle.fingerprint}|{products_fingerprint(products)}".encode()).hexdigest()[:20]
    folder = Path(cache_dir).expanduser() / f"{CACHE_PREFIX}{key}"
    cached = _read_cache(folder, ids, bundle)
    if cached is not None:
        log.info("bundle features from cache %s", folder)
        return cached

    embedder = ProductEmbedder(bundle, batch_size=batch_size, progress=progress, desc="bundle features", strict=True)
    result = embedder.embed(products)
    # strict: every product was embedded, in order, or embed raised
    assert [p.id for p in result.products] == ids.tolist() and result.patches is not None
    features = ProductFeatures(ids, result.text, result.image, result.patches)
    _write_cache(folder, features, meta={
        "bundle": str(bundle.path), "bundle_fingerprint": bundle.fingerprint,
        "products_fingerprint": products_fingerprint(products), "products": len(features),
        "patches": spec.model_dump(mode="json"), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })  # fmt: skip
    reread = _read_cache(folder, ids, bundle)
    assert reread is not None, folder
    return reread


def _read_cache(folder: Path, ids: np.ndarray, bundle: BundleEncoder) -> ProductFeatures | None:
    """The cached features when `folder` holds them for exactly `ids` and this bundle's shapes, else None."""
    if not all((folder / f"{name}.npy").is_file() for name in _ARRAYS):
        return None
    spec = bundle.patch_spec
    try:
        features = ProductFeatures(
            ids=np.load(folder / "ids.npy"),
            text=np.load(folder / "text.npy"),
            image=np.load(folder / "image.npy"),
            patches=np.load(folder / "patches.npy", mmap_mode="r"),
        )
    except (ValueError, OSError, AssertionError) as exc:  # truncated or foreign files: recompute
        log.warning("ignoring unreadable bundle feature cache %s: %s", folder, exc)
        return None
    expected = {"text": (len(ids), bundle.embed_dim), "patches": (len(ids), *spec.shape)}
    if not np.array_equal(features.ids, ids) or features.text.shape != expected["text"] or features.patches.shape != expected["patches"]:
        log.warning("ignoring bundle feature cache %s: it does not match these products and bundle", folder)
        return None
    return features


def _write_cache(folder: Path, features: ProductFeatures, *, meta: dict) -> None:
    """Write into a temporary folder beside `folder`, then rename it into place (readers never see half a cache)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(features, name)))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private
        if folder.exists():  # an invalid cache (a valid one would have been read)
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["ProductFeatures", "bundle_product_features"]
