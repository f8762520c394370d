"""Product catalogs: the Product record and readers for JSONL, Kaggle and Fashion-Gen catalogs.

Names load on first use so `vitrine --help` does not pay for numpy/h5py/tqdm.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from search.lazy import lazy_exports

_EXPORTS = {
    "BytesImage": "search.catalog.product",
    "FileImage": "search.catalog.product",
    "ImageRef": "search.catalog.product",
    "Product": "search.catalog.product",
    "H5Image": "search.catalog.fashiongen",
    "FORMATS": "search.catalog.registry",
    "Catalog": "search.catalog.registry",
    "detect_format": "search.catalog.registry",
    "iter_products": "search.catalog.registry",
    "read_catalog": "search.catalog.registry",
    "PROBLEM_KINDS": "search.catalog.report",
    "CatalogReport": "search.catalog.report",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from search.catalog.fashiongen import H5Image
    from search.catalog.product import BytesImage, FileImage, ImageRef, Product
    from search.catalog.registry import FORMATS, Catalog, detect_format, iter_products, read_catalog
    from search.catalog.report import PROBLEM_KINDS, CatalogReport


__getattr__ = lazy_exports(__name__, _EXPORTS)
