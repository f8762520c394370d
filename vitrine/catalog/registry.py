"""Finding a catalog's format and reading it into products plus a report of what was skipped."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

from tqdm import tqdm

from vitrine.catalog import fashiongen, jsonl, kaggle
from vitrine.catalog.images import ImageDecoder, missing_image
from vitrine.catalog.product import Product
from vitrine.catalog.splits import hashed_split
from vitrine.catalog.report import DUPLICATE_ID, CatalogReport, Problem, SourceRow, normalize_split
from vitrine.errors import CatalogFormatError

READERS: dict[str, ModuleType] = {"jsonl": jsonl, "kaggle": kaggle, "fashiongen": fashiongen}
FORMATS = tuple(READERS)
DECODE_BATCH = 256  # products handed to the decode pool at a time


def detect_format(path: str | Path) -> str:
    """'jsonl', 'kaggle' or 'fashiongen' from the file extension or the folder's contents."""
    path = Path(path)
    if not path.exists():
        raise CatalogFormatError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / jsonl.FILENAME).is_file():
            return "jsonl"
        if (path / kaggle.FILENAME).is_file():
            return "kaggle"
        if any(p for ext in fashiongen.EXTENSIONS for p in path.glob(f"*{ext}")):
            return "fashiongen"
        if len([p for ext in jsonl.EXTENSIONS for p in path.glob(f"*{ext}")]) == 1:
            return "jsonl"
        raise CatalogFormatError(
            f"{path}: no catalog in this folder (expected {jsonl.FILENAME}, "
            f"{kaggle.FILENAME} or Fashion-Gen .h5 files)"
        )
    suffix = path.suffix.lower()
    for name, reader in READERS.items():
        if suffix in reader.EXTENSIONS:
            return name
    raise CatalogFormatError(
        f"{path}: not a catalog file (unknown extension {suffix or '(none)'!r}; "
        f"expected .jsonl, a Kaggle styles.csv or Fashion-Gen .h5)"
    )


def open_source(
    path: str | Path, *, format: str | None = None, image_root: str | Path | None = None
) -> tuple[str, Iterator[SourceRow]]:
    """Validate the catalog now and return (format, lazily read source rows)."""
    path = Path(path).expanduser().absolute()
    if format is None:
        format = detect_format(path)
    elif format not in READERS:
        raise CatalogFormatError(f"unknown catalog format {format!r} (choose from {', '.join(FORMATS)})")
    elif not path.exists():
        raise CatalogFormatError(f"{path}: no such file or folder")
    root = Path(image_root).expanduser().absolute() if image_root is not None else None
    return format, READERS[format].open_rows(path, image_root=root)


def iter_products(
    path: str | Path,
    *,
    format: str | None = None,
    check_images: bool = False,
    split: str | None = None,
    limit: int | None = None,
    image_root: str | Path | None = None,
    report: CatalogReport | None = None,
) -> Iterator[Product]:
    """Stream a catalog's good products; skipped rows are tallied in `report` as they pass.

    The format is checked before this returns (CatalogFormatError); pass a `report`
    to read the tallies, complete once the iterator is exhausted.
    """
    format, rows = open_source(path, format=format, image_root=image_root)
    if report is None:
        report = CatalogReport(source=str(path), format=format)
    report.format = format
    report.images_decoded = check_images
    if limit is not None and limit < 1:
        raise ValueError("limit must be at least 1")
    return _pipeline(rows, report, check_images, normalize_split(split), limit)


def _pipeline(
    rows: Iterator[SourceRow],
    report: CatalogReport,
    check_images: bool,
    split: str | None,
    limit: int | None,
) -> Iterator[Product]:
    seen_ids: set[str] = set()
    pending: list[SourceRow] = []  # rows waiting for their images to be decoded
    remaining = limit if limit is not None else float("inf")
    decoder = ImageDecoder() if check_images else None

    def reject(row: SourceRow, problem: Problem) -> None:
        report.add_problem(problem, row.row, row.file)

    def flush() -> Iterator[Product]:
        nonlocal remaining
        batch = list(pending)
        pending.clear()
        for row, (product, problem) in zip(batch, decoder.check(r.product for r in batch)):
            if problem is not None:
                reject(row, problem)
            else:
                report.add_product(product)
                remaining -= 1
                yield product

    try:
        for row in rows:
            if row.file not in report.files:
                report.files.append(row.file)
            report.rows_seen += row.rows
            report.rows_merged += row.rows - 1
            if row.problem is not None:
                reject(row, row.problem)
                continue
            product = row.product
            if product.split is None:  # no split in the catalog: a deterministic one from the id
                product = replace(product, split=hashed_split(product.id))
                report.hashed_splits += 1
            if product.id in seen_ids:
                reject(row, Problem(DUPLICATE_ID, "duplicate id (the first occurrence is kept)", product.id))
                continue
            seen_ids.add(product.id)
            if split is not None and product.split != split:
                report.rows_excluded += 1
                continue
            problem = missing_image(product)
            if problem is not None:
                reject(row, problem)
                continue
            if decoder is None:
                report.add_product(product)
                remaining -= 1
                yield product
            else:
                pending.append(row)
                # Never hold more than the limit still needs, so no row is read past it.
                if len(pending) >= min(DECODE_BATCH, remaining):
                    yield from flush()
            if remaining <= 0:
                break
        if pending:
            yield from flush()
    finally:
        if decoder is not None:
            decoder.close()


@dataclass
class Catalog:
    """The good products of a catalog, and the report of everything skipped."""

    products: list[Product]
    report: CatalogReport
    source: Path
    format: str

    def __len__(self) -> int:
        return len(self.products)

    def __iter__(self) -> Iterator[Product]:
        return iter(self.products)

    def __getitem__(self, index: int) -> Product:
        return self.products[index]

    def by_split(self, name: str) -> list[Product]:
        wanted = normalize_split(name)
        return [p for p in self.products if p.split == wanted]

    def splits(self) -> dict[str, int]:
        """Products per split; None-split products count under '(none)'."""
        return dict(self.report.splits)


def read_catalog(
    path: str | Path,
    *,
    format: str | None = None,
    check_images: bool = False,
    split: str | None = None,
    limit: int | None = None,
    image_root: str | Path | None = None,
    progress: bool = False,
) -> Catalog:
    """Read a catalog (JSONL, Kaggle styles.csv or Fashion-Gen .h5) into memory.

    Bad rows are skipped and tallied in `catalog.report`; a file that is not a
    catalog raises CatalogFormatError. Image files are always checked to exist;
    `check_images` also decodes every image.
    """
    report = CatalogReport(source=str(path), format=format or "")
    products = iter_products(
        path, format=format, check_images=check_images, split=split,
        limit=limit, image_root=image_root, report=report,
    )  # fmt: skip
    with tqdm(products, desc="reading catalog", unit=" products", disable=not progress) as bar:
        items = list(bar)
    assert report.accounted(), "catalog rows went unaccounted"
    return Catalog(products=items, report=report, source=Path(path), format=report.format)
