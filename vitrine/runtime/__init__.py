"""Torch-free encoders for exported model bundles (onnxruntime + tokenizers + Pillow).

    from vitrine.runtime import load_bundle
    encoder = load_bundle("bundles/fashion-lite")
    encoder.encode_texts(["red summer dress"])   # float32 (1, D), L2-normalised

Names load on first use: the manifest schema (`vitrine.runtime.manifest`) and the
preprocessing (`vitrine.runtime.preprocess`) import without onnxruntime.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from vitrine.lazy import lazy_exports

_EXPORTS = {
    "BUNDLE_FORMAT": "vitrine.runtime.manifest",
    "FORMAT_VERSION": "vitrine.runtime.manifest",
    "BundleError": "vitrine.runtime.manifest",
    "BundleManifest": "vitrine.runtime.manifest",
    "read_manifest": "vitrine.runtime.manifest",
    "BundleEncoder": "vitrine.runtime.bundle",
    "load_bundle": "vitrine.runtime.bundle",
    "ImageEncoder": "vitrine.runtime.image",
    "PatchSpec": "vitrine.runtime.preprocess",
    "PreprocessSettings": "vitrine.runtime.preprocess",
    "preprocess_image": "vitrine.runtime.preprocess",
    "preprocess_images": "vitrine.runtime.preprocess",
    "make_session": "vitrine.runtime.session",
    "TextEncoder": "vitrine.runtime.text",
    "TextTokenizer": "vitrine.runtime.tokenizer",
    "TokenizerSettings": "vitrine.runtime.tokenizer",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from vitrine.runtime.bundle import BundleEncoder, load_bundle
    from vitrine.runtime.image import ImageEncoder
    from vitrine.runtime.manifest import BUNDLE_FORMAT, FORMAT_VERSION, BundleError, BundleManifest, read_manifest
    from vitrine.runtime.preprocess import PatchSpec, PreprocessSettings, preprocess_image, preprocess_images
    from vitrine.runtime.session import make_session
    from vitrine.runtime.text import TextEncoder
    from vitrine.runtime.tokenizer import TextTokenizer, TokenizerSettings


__getattr__ = lazy_exports(__name__, _EXPORTS)
