"""Product catalogs: the Product record and readers for JSONL, Kaggle and Fashion-Gen catalogs.

Names load on first use so `vitrine --help` does not pay for numpy/h5py/tqdm.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from vitrine.lazy import lazy_exports

_EXPORTS = {
    "BytesImage": "vitrine.catalog.product",
    "FileImage": "vitrine.catalog.product",
    "ImageRef": "vitrine.catalog.product",
    "Product": "vitrine.catalog.product",
    "H5Image": "vitrine.catalog.fashiongen",
    "FORMATS": "vitrine.catalog.registry",
    "Catalog": "vitrine.catalog.registry",
    "detect_format": "vitrine.catalog.registry",
    "iter_products": "vitrine.catalog.registry",
    "read_catalog": "vitrine.catalog.registry",
    "PROBLEM_KINDS": "vitrine.catalog.report",
    "CatalogReport": "vitrine.catalog.report",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from vitrine.catalog.fashiongen import H5Image
    from vitrine.catalog.product import BytesImage, FileImage, ImageRef, Product
    from vitrine.catalog.registry import FORMATS, Catalog, detect_format, iter_products, read_catalog
    from vitrine.catalog.report import PROBLEM_KINDS, CatalogReport


__getattr__ = lazy_exports(__name__, _EXPORTS)
