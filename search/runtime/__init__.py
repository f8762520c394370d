"""Torch-free encoders for exported model bundles (onnxruntime + tokenizers + Pillow).

    from search.runtime import load_bundle
    encoder = load_bundle("bundles/fashion-lite")
    encoder.encode_texts(["red summer dress"])   # float32 (1, D), L2-normalised
"""
from search.runtime.bundle import (
    BUNDLE_FORMAT,
    FORMAT_VERSION,
    BundleEncoder,
    BundleError,
    BundleManifest,
    load_bundle,
    read_manifest,
)
from search.runtime.image import ImageEncoder, PreprocessSettings, preprocess_image, preprocess_images
from search.runtime.session import make_session
from search.runtime.text import TextEncoder
from search.runtime.tokenizer import TextTokenizer, TokenizerSettings

__all__ = [
    "BUNDLE_FORMAT",
    "FORMAT_VERSION",
    "BundleEncoder",
    "BundleError",
    "BundleManifest",
    "ImageEncoder",
    "PreprocessSettings",
    "TextEncoder",
    "TextTokenizer",
    "TokenizerSettings",
    "load_bundle",
    "make_session",
    "preprocess_image",
    "preprocess_images",
    "read_manifest",
]
