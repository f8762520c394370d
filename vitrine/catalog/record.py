"""`ProductRecord`: what an index keeps about a product for display and filtering.

It lives in the foundation because every layer reads it: the indexer stores it, the
`SearchIndex` seam returns it, and the service shows it and caches it in Redis.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ProductRecord:
    """What the index keeps about a product for display and filtering."""

    id: str
    title: str
    category: str
    subcategory: str
    description: str
    attributes: dict[str, str]
    image: str  # image location (a path, or "file.h5:input_image[row]")
    # Backfilled values of attributes the catalog lacks (`vitrine attributes predict`), with their
    # provenance: field -> {"value": str, "confidence": float}. Never overrides `attributes`.
    predicted: dict[str, dict[str, Any]] = field(default_factory=dict)

    def attribute(self, name: str) -> str:
        """category/subcategory answer like attributes, as `Product.attribute` does."""
        if name == "category":
            return self.category
        if name == "subcategory":
            return self.subcategory
        return self.attributes.get(name, "")

    def attribute_or_predicted(self, name: str) -> str:
        """The catalog's value, else the predicted one (what `include_predicted` filters read)."""
        return self.attribute(name) or str(self.predicted.get(name, {}).get("value", ""))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
