"""Fashion-Gen HDF5 files (fashiongen_256_256_{train,validation}.h5), streamed.

Each file row is one photo: `input_image` [N,256,256,3] uint8 plus [N,1] byte-string
columns. Rows sharing `input_productID` are one product with several images, and
need not be consecutive. Pixels are never loaded here: products hold `H5Image`
references, and text columns are read in chunks.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vitrine.catalog.product import Product
from vitrine.catalog.report import EMPTY_TITLE, MALFORMED_ROW, Problem, SourceRow, decode_text
from vitrine.errors import CatalogFormatError

EXTENSIONS = (".h5", ".hdf5")
IMAGE_DATASET = "input_image"
ID_DATASET = "input_productID"
TITLE_DATASET = "input_name"
REQUIRED = (IMAGE_DATASET, ID_DATASET, TITLE_DATASET)
# Optional text columns -> Product field; the extra ones become attributes when present.
FIELD_DATASETS = {
    "input_description": "description",
    "input_category": "category",
    "input_subcategory": "subcategory",
}
ATTRIBUTE_DATASETS = {
    "input_brand": "brand",
    "input_gender": "gender",
    "input_season": "season",
    "input_department": "department",
    "input_composition": "composition",
}
CHUNK_ROWS = 8192

# One open handle per file per process: h5py handles must not cross a fork.
_handles: dict[str, tuple[int, object]] = {}
_handles_lock = threading.Lock()


def _h5_file(path: Path):
    import h5py

    key = str(path)
    with _handles_lock:
        entry = _handles.get(key)
        if entry is None or entry[0] != os.getpid():
            # After a fork the parent's handle is dropped, not closed: closing would touch shared state.
            _handles[key] = (os.getpid(), h5py.File(key, "r"))
            entry = _handles[key]
        return entry[1]


@dataclass(frozen=True)
class H5Image:
    """One photo in a Fashion-Gen file: row `row` (0-based) of `input_image`."""

    path: Path
    row: int

    def open(self) -> Image.Image:
        pixels = np.asarray(_h5_file(self.path)[IMAGE_DATASET][self.row])
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"{self.describe()}: expected HxWx3 uint8, got {pixels.shape} {pixels.dtype}")
        return Image.fromarray(pixels, "RGB")

    def describe(self) -> str:
        return f"{self.path}:{IMAGE_DATASET}[{self.row}]"


def split_from_name(name: str) -> str | None:
    lower = name.lower()
    if "train" in lower:
        return "train"
    if "valid" in lower or "_val" in lower:
        return "val"
    if "test" in lower:
        return "test"
    return None


def resolve_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for ext in EXTENSIONS for p in path.glob(f"*{ext}"))
    if not files:
        raise CatalogFormatError(f"{path}: no .h5 files in this folder")
    return files


def open_rows(path: Path, *, image_root: Path | None = None) -> Iterator[SourceRow]:
    """Check every file's schema now (CatalogFormatError if wrong); rows come lazily."""
    del image_root  # images live inside the files
    files = resolve_files(path)
    for file in files:
        _check_schema(file)
    return (row for file in files for row in _file_rows(file))


def _check_schema(file: Path) -> None:
    import h5py

    try:
        handle = h5py.File(file, "r")
    except OSError as exc:
        raise CatalogFormatError(f"{file}: not an HDF5 file ({exc})") from None
    with handle:
        missing = [name for name in REQUIRED if not isinstance(handle.get(name), h5py.Dataset)]
        if missing:
            raise CatalogFormatError(
                f"{file}: not a Fashion-Gen file (missing datasets {', '.join(missing)})"
            )
        shape = handle[IMAGE_DATASET].shape
        if len(shape) != 4 or shape[3] != 3:
            raise CatalogFormatError(f"{file}: {IMAGE_DATASET} has shape {shape}, expected [N,H,W,3]")
        for name in (ID_DATASET, TITLE_DATASET, *FIELD_DATASETS, *ATTRIBUTE_DATASETS):
            if name in handle and len(handle[name]) != shape[0]:
                raise CatalogFormatError(
                    f"{file}: {name} has {len(handle[name])} rows but {IMAGE_DATASET} has {shape[0]}"
                )


@dataclass
class _Group:
    """The rows of one productID, with the text of its first row that has a title."""

    first_row: int
    rows: list[int] = field(default_factory=list)
    text: dict[str, str] | None = None


def _column(dataset, start: int, stop: int) -> list[str]:
    values = np.asarray(dataset[start:stop]).reshape(stop - start, -1)[:, 0]
    if values.dtype.kind in "iu":
        return [str(int(v)) for v in values]
    if values.dtype.kind == "f":
        return [str(int(v)) if float(v).is_integer() else str(v) for v in values]
    return [decode_text(v) for v in values]


def _file_rows(file: Path) -> Iterator[SourceRow]:
    import h5py

    name = file.name
    split = split_from_name(name)
    groups: dict[str, _Group] = {}
    bad: list[SourceRow] = []
    with h5py.File(file, "r") as handle:
        text_columns = {
            ds: key
            for ds, key in {TITLE_DATASET: "title", **FIELD_DATASETS, **ATTRIBUTE_DATASETS}.items()
            if ds in handle
        }
        n = len(handle[ID_DATASET])
        for start in range(0, n, CHUNK_ROWS):
            stop = min(n, start + CHUNK_ROWS)
            ids = _column(handle[ID_DATASET], start, stop)
            columns = {key: _column(handle[ds], start, stop) for ds, key in text_columns.items()}
            for offset, ident in enumerate(ids):
                index = start + offset
                if not ident:
                    problem = Problem(MALFORMED_ROW, f"empty {ID_DATASET}")
                    bad.append(SourceRow(index + 1, name, problem=problem))
                    continue
                group = groups.get(ident)
                if group is None:
                    group = groups[ident] = _Group(first_row=index)
                group.rows.append(index)
                if group.text is None and columns["title"][offset]:
                    group.text = {key: values[offset] for key, values in columns.items()}

    records = [(g.first_row + 1, ident, g) for ident, g in groups.items()]
    records += [(r.row, None, r) for r in bad]
    records.sort(key=lambda rec: rec[0])
    for row, ident, item in records:
        if isinstance(item, SourceRow):
            yield item
        else:
            yield _product_row(file, split, row, ident, item)


def _product_row(file: Path, split: str | None, row: int, ident: str, group: _Group) -> SourceRow:
    if group.text is None:
        problem = Problem(EMPTY_TITLE, f"empty {TITLE_DATASET}", ident)
        return SourceRow(row, file.name, problem=problem, rows=len(group.rows))
    text = group.text
    product = Product(
        id=ident,
        title=text["title"],
        images=tuple(H5Image(file, r) for r in group.rows),
        category=text.get("category", ""),
        subcategory=text.get("subcategory", ""),
        description=text.get("description", ""),
        attributes={key: text[key] for key in ATTRIBUTE_DATASETS.values() if text.get(key)},
        split=split,
    )
    return SourceRow(row, file.name, product=product, rows=len(group.rows))
