"""The product record every part of Vitrine shares, and where its images live."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image


@runtime_checkable
class ImageRef(Protocol):
    """Somewhere a product photo can be loaded from, lazily.

    Catalogs can be far larger than memory (Fashion-Gen has 293k images), so
    products hold references and pixels are only read when needed.
    """

    def open(self) -> Image.Image:
        """Decode the image as RGB; raises OSError/ValueError when it is unreadable."""
        ...

    def describe(self) -> str:
        """A short human-readable location, for reports."""
        ...


@dataclass(frozen=True)
class FileImage:
    path: Path

    def open(self) -> Image.Image:
        with Image.open(self.path) as im:
            im.load()
            return im.convert("RGB")

    def describe(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.path.is_file()


@dataclass(frozen=True)
class BytesImage:
    """An encoded image held in memory (uploads, tests)."""

    data: bytes
    name: str = "<bytes>"

    def open(self) -> Image.Image:
        with Image.open(io.BytesIO(self.data)) as im:
            im.load()
            return im.convert("RGB")

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class Product:
    id: str
    title: str
    images: tuple[ImageRef, ...]
    category: str = ""
    subcategory: str = ""
    description: str = ""
    attributes: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    split: str | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("product id must be non-empty")
        if not self.title.strip():
            raise ValueError(f"product {self.id}: title must be non-empty")
        if not self.images:
            raise ValueError(f"product {self.id}: at least one image is required")

    @property
    def image(self) -> ImageRef:
        """The primary image (the first one)."""
        return self.images[0]

    def attribute(self, name: str) -> str:
        """An attribute by name; category/subcategory answer too, so filters can treat them alike."""
        if name == "category":
            return self.category
        if name == "subcategory":
            return self.subcategory
        return self.attributes.get(name, "")
