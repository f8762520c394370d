"""Kaggle "Fashion Product Images" as downloaded: styles.csv + images/<id>.jpg.

Some productDisplayName values in the real styles.csv hold unquoted commas, so those
rows carry extra fields; the title is the last column, so the extras are joined back.
"""
from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from vitrine.catalog.jsonl import product_row
from vitrine.catalog.report import MALFORMED_ROW, Problem, SourceRow, decode_text
from vitrine.errors import CatalogFormatError

FILENAME = "styles.csv"
EXTENSIONS = (".csv",)
COLUMNS = (
    "id", "gender", "masterCategory", "subCategory", "articleType",
    "baseColour", "season", "year", "usage", "productDisplayName",
)  # fmt: skip
TITLE_COLUMN = "productDisplayName"


def resolve_file(path: Path) -> Path:
    if path.is_file():
        return path
    candidate = path / FILENAME
    if candidate.is_file():
        return candidate
    raise CatalogFormatError(f"{path}: no {FILENAME} in this folder")


def open_rows(path: Path, *, image_root: Path | None = None) -> Iterator[SourceRow]:
    """Check the header now (CatalogFormatError if it is not styles.csv); rows come lazily."""
    file = resolve_file(path)
    with open(file, "rb") as fh:
        head = fh.readline(1 << 16)
    if b"\x00" in head:
        raise CatalogFormatError(f"{file}: binary data, not a Kaggle styles.csv")
    header = _parse_header(decode_text(head))
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise CatalogFormatError(
            f"{file}: not a Kaggle styles.csv (header lacks {', '.join(missing)}; "
            f"expected {','.join(COLUMNS)})"
        )
    return _rows(file, image_root or file.parent)


def _parse_header(line: str) -> list[str]:
    try:
        return _clean_header(next(csv.reader([line]), []))
    except csv.Error:
        return []


def _clean_header(fields: list[str]) -> list[str]:
    return [f.strip().lstrip("\ufeff") for f in fields]


def _rows(file: Path, image_root: Path) -> Iterator[SourceRow]:
    name = file.name
    with open(file, "rb") as fh:
        reader = csv.reader(decode_text(line, strip=False) for line in fh)
        header = _clean_header(next(reader))
        width = len(header)
        title_last = header[-1] == TITLE_COLUMN
        line_no = reader.line_num
        while True:
            row = line_no + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                line_no = reader.line_num
                yield SourceRow(row, name, problem=Problem(MALFORMED_ROW, f"unreadable CSV row: {exc}"))
                continue
            line_no = reader.line_num
            if not any(f.strip() for f in fields):
                continue  # blank lines are not rows
            if len(fields) > width and title_last:
                fields = fields[: width - 1] + [",".join(fields[width - 1 :])]
            if len(fields) != width:
                ident = fields[0].strip() or None
                msg = f"expected {width} fields, got {len(fields)}"
                yield SourceRow(row, name, problem=Problem(MALFORMED_ROW, msg, ident))
                continue
            record: dict[str, object] = dict(zip(header, fields))
            record["title"] = record.pop(TITLE_COLUMN)
            ident = str(record.get("id", "")).strip()
            if ident:
                record["image"] = f"images/{ident}.jpg"
            yield product_row(record, row, name, image_root)
