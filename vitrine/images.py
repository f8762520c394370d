"""Reading a product's image once for both hashing and decoding, and reopening it later by reference."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from PIL import Image

from vitrine.catalog.fashiongen import H5Image
from vitrine.catalog.product import BytesImage, FileImage, ImageRef


def read_image(ref: ImageRef) -> tuple[Image.Image, str, dict[str, Any]]:
    """(RGB image, digest of its content, JSON reference to reopen it). Raises what decoding raises."""
    if isinstance(ref, FileImage):
        data = Path(ref.path).read_bytes()
        image = BytesImage(data, name=str(ref.path)).open()  # decodes exactly as FileImage.open does
        return image, hashlib.sha256(data).hexdigest(), {"kind": "file", "path": str(Path(ref.path).absolute())}
    if isinstance(ref, BytesImage):
        return ref.open(), hashlib.sha256(ref.data).hexdigest(), {"kind": "none"}
    image = ref.open()
    digest = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()
    if isinstance(ref, H5Image):
        return image, digest, {"kind": "h5", "path": str(Path(ref.path).absolute()), "row": int(ref.row)}
    return image, digest, {"kind": "none"}


def open_image_ref(ref: dict[str, Any], description: str = "") -> Image.Image:
    """Decode the image a `read_image` reference points to."""
    kind = ref.get("kind")
    if kind == "file":
        return FileImage(Path(ref["path"])).open()
    if kind == "h5":
        return H5Image(Path(ref["path"]), int(ref["row"])).open()
    raise LookupError(f"the image of this product ({description or 'in-memory'}) was not stored by location and cannot be reopened")
