"""JSON Lines catalogs: one product object a line (the shared fashion-products format).

Fields: id, title, image (or images: [...]), optional split, description, category,
subcategory; Myntra-style subCategory/articleType stand in for category/subcategory.
Image paths are relative to the file's folder (or `image_root`); absolute paths work too.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

from vitrine.catalog.product import FileImage, Product
from vitrine.catalog.report import (
    EMPTY_TITLE,
    MALFORMED_ROW,
    Problem,
    SourceRow,
    decode_text,
    normalize_split,
)
from vitrine.errors import CatalogFormatError

FILENAME = "products.jsonl"
EXTENSIONS = (".jsonl", ".ndjson")

# Fields that become Product fields rather than attributes.
_CORE_FIELDS = frozenset(
    {"id", "title", "image", "images", "split", "description", "category", "subcategory", "width", "height"}
)
_SNIFF_LINES = 20


def resolve_file(path: Path) -> Path:
    """The JSONL file itself, or `products.jsonl` (else the only *.jsonl) inside a folder."""
    if path.is_file():
        return path
    candidate = path / FILENAME
    if candidate.is_file():
        return candidate
    found = sorted(p for ext in EXTENSIONS for p in path.glob(f"*{ext}"))
    if len(found) == 1:
        return found[0]
    raise CatalogFormatError(f"{path}: no {FILENAME} in this folder")


def open_rows(path: Path, *, image_root: Path | None = None) -> Iterator[SourceRow]:
    """Check `path` is a JSONL catalog now (CatalogFormatError if not); rows come lazily."""
    file = resolve_file(path)
    _sniff(file)
    return _rows(file, image_root or file.parent)


def _sniff(file: Path) -> None:
    with open(file, "rb") as fh:
        head = fh.read(65536)
        if not head.strip():
            raise CatalogFormatError(f"{file}: empty file, not a JSONL catalog")
        if b"\x00" in head:
            raise CatalogFormatError(f"{file}: binary data, not a JSONL catalog")
        fh.seek(0)
        for _ in range(_SNIFF_LINES):
            line = fh.readline(1 << 20)
            if not line:
                break
            try:
                record = json.loads(decode_text(line))
            except ValueError:
                continue
            if isinstance(record, dict) and "id" in record:
                return
    raise CatalogFormatError(
        f"{file}: not a JSONL catalog (no JSON object with an 'id' in its first {_SNIFF_LINES} lines)"
    )


def _rows(file: Path, image_root: Path) -> Iterator[SourceRow]:
    name = file.name
    with open(file, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            text = decode_text(raw)
            if not text:
                continue  # blank lines are not rows
            try:
                record = json.loads(text)
            except ValueError as exc:
                yield SourceRow(line_no, name, problem=Problem(MALFORMED_ROW, f"invalid JSON: {exc}"))
                continue
            if not isinstance(record, dict):
                msg = f"expected a JSON object, got {type(record).__name__}"
                yield SourceRow(line_no, name, problem=Problem(MALFORMED_ROW, msg))
                continue
            yield product_row(record, line_no, name, image_root)


def _scalar(value: object) -> str:
    if value is None or isinstance(value, (dict, list)):
        return ""
    return decode_text(value)


def product_row(
    record: Mapping[str, object],
    row: int,
    file: str,
    image_root: Path,
    *,
    split: str | None = None,
) -> SourceRow:
    """Map one Myntra-style record to a product, or to the problem that prevents it."""

    def problem(kind: str, message: str, ident: str | None = None) -> SourceRow:
        return SourceRow(row, file, problem=Problem(kind, message, ident))

    ident = _scalar(record.get("id"))
    if not ident:
        return problem(MALFORMED_ROW, "missing required field 'id'")
    if "title" not in record:
        return problem(MALFORMED_ROW, "missing required field 'title'", ident)
    title = _scalar(record.get("title"))
    if not title:
        return problem(EMPTY_TITLE, "empty title", ident)

    raw_images = record.get("images") if record.get("images") is not None else record.get("image")
    if isinstance(raw_images, str):
        raw_images = [raw_images]
    if not isinstance(raw_images, list) or not raw_images or not all(
        isinstance(p, str) and p.strip() for p in raw_images
    ):
        return problem(MALFORMED_ROW, "missing required field 'image' (a path string)", ident)
    images = tuple(FileImage(image_root / p.strip()) for p in raw_images)

    attributes = {k: v for k, v in ((str(k), _scalar(v)) for k, v in record.items() if k not in _CORE_FIELDS) if v}
    product = Product(
        id=ident,
        title=title,
        images=images,
        category=_scalar(record.get("category")) or attributes.get("subCategory", ""),
        subcategory=_scalar(record.get("subcategory")) or attributes.get("articleType", ""),
        description=_scalar(record.get("description")),
        attributes=attributes,
        split=normalize_split(record.get("split")) or split,
    )
    return SourceRow(row, file, product=product)
