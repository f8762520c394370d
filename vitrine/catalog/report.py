"""What reading a catalog found: rows seen, products kept, and every row skipped and why.

Readers never drop a row silently. Each source row becomes either a product or a
problem, so `rows_seen == products + skipped + rows_merged + rows_excluded` always holds.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vitrine.catalog.product import Product
from vitrine.catalog.splits import HASHED_SPLITS_NOTE

# Problem kinds, in the order reports list them.
MALFORMED_ROW = "malformed_row"  # bad JSON, wrong field count, missing required field
EMPTY_TITLE = "empty_title"
DUPLICATE_ID = "duplicate_id"  # the first occurrence is kept
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"  # only found when images are decoded
PROBLEM_KINDS = (MALFORMED_ROW, EMPTY_TITLE, DUPLICATE_ID, MISSING_IMAGE, CORRUPT_IMAGE)

MAX_EXAMPLES = 5

_SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val", "training": "train"}


def normalize_split(value: object) -> str | None:
    """'validation' and friends -> 'val'; empty -> None."""
    if value is None:
        return None
    text = str(value).strip().lower()
    return _SPLIT_ALIASES.get(text, text) or None


def decode_text(value: object, *, strip: bool = True) -> str:
    """Bytes from real-world files: UTF-8, else cp1252, else latin-1 (which never fails)."""
    if isinstance(value, (bytes, bytearray)):
        for encoding in ("utf-8", "cp1252", "latin-1"):
            try:
                value = bytes(value).decode(encoding)
                break
            except UnicodeDecodeError:
                continue
    text = str(value)
    return text.replace("\x00", "").strip() if strip else text


@dataclass(frozen=True)
class Problem:
    """Why one source row (or product) was skipped."""

    kind: str
    message: str
    id: str | None = None

    def __post_init__(self) -> None:
        assert self.kind in PROBLEM_KINDS, self.kind


@dataclass(frozen=True)
class SourceRow:
    """One record from a reader: a product or a problem, located in its file.

    `row` is 1-based: the line number in text files, the row index + 1 in HDF5.
    `rows` > 1 when several file rows form one product (Fashion-Gen images).
    """

    row: int
    file: str
    product: Product | None = None
    problem: Problem | None = None
    rows: int = 1

    def __post_init__(self) -> None:
        assert (self.product is None) != (self.problem is None), "exactly one of product/problem"
        assert self.rows >= 1


@dataclass(frozen=True)
class ProblemExample:
    row: int
    file: str
    id: str | None
    message: str

    def where(self, show_file: bool) -> str:
        unit = "row" if self.file.endswith((".h5", ".hdf5")) else "line"
        prefix = f"{self.file} " if show_file else ""
        ident = f" (id {self.id})" if self.id else ""
        return f"{prefix}{unit} {self.row}{ident}"


@dataclass
class ProblemTally:
    count: int = 0
    examples: list[ProblemExample] = field(default_factory=list)


@dataclass
class CatalogReport:
    source: str
    format: str
    rows_seen: int = 0
    products: int = 0
    rows_merged: int = 0  # extra rows that added an image to an earlier product
    rows_excluded: int = 0  # rows of other splits when a split was asked for
    hashed_splits: int = 0  # rows without a split label, given one by hashed product id
    images_decoded: bool = False
    files: list[str] = field(default_factory=list)
    problems: dict[str, ProblemTally] = field(default_factory=dict)
    splits: Counter = field(default_factory=Counter)
    categories: Counter = field(default_factory=Counter)
    attribute_counts: Counter = field(default_factory=Counter)  # attribute -> products with a value for it

    def add_problem(self, problem: Problem, row: int, file: str) -> None:
        tally = self.problems.setdefault(problem.kind, ProblemTally())
        tally.count += 1
        if len(tally.examples) < MAX_EXAMPLES:
            tally.examples.append(ProblemExample(row, file, problem.id, problem.message))

    def add_product(self, product: Product) -> None:
        self.products += 1
        self.splits[product.split or "(none)"] += 1
        self.categories[product.category or "(none)"] += 1
        self.attribute_counts.update(name for name, value in product.attributes.items() if str(value).strip())

    def missing_attributes(self) -> dict[str, int]:
        """Attribute -> products without a value for it, over every attribute some product has (most missing first)."""
        missing = {name: self.products - count for name, count in self.attribute_counts.items()}
        return dict(sorted(missing.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def skipped(self) -> int:
        return sum(t.count for t in self.problems.values())

    @property
    def ok(self) -> bool:
        return not self.problems

    def accounted(self) -> bool:
        """Every row seen became a product, a problem, an extra image or an excluded row."""
        return self.rows_seen == self.products + self.skipped + self.rows_merged + self.rows_excluded

    def problem_count(self, kind: str) -> int:
        return self.problems[kind].count if kind in self.problems else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "files": list(self.files),
            "ok": self.ok,
            "rows_seen": self.rows_seen,
            "products": self.products,
            "skipped": self.skipped,
            "rows_merged": self.rows_merged,
            "rows_excluded": self.rows_excluded,
            "images_decoded": self.images_decoded,
            "splits": dict(self.splits),
            "hashed_splits": self.hashed_splits,
            "categories": dict(self.categories.most_common()),
            "missing_attributes": self.missing_attributes(),
            "problems": {
                kind: {
                    "count": tally.count,
                    "examples": [vars(e).copy() for e in tally.examples],
                }
                for kind, tally in self._sorted_problems()
            },
        }

    def format_text(self, top_categories: int = 10) -> str:
        lines = [
            f"Catalog {self.source} ({self.format}): {self.products:,} products "
            f"from {self.rows_seen:,} rows",
        ]
        details = []
        if self.rows_merged:
            details.append(f"{self.rows_merged:,} rows were extra images of earlier products")
        if self.rows_excluded:
            details.append(f"{self.rows_excluded:,} rows of other splits excluded")
        details.append("images decoded" if self.images_decoded else "images checked for existence only")
        lines.append("  " + "; ".join(details))
        if self.splits:
            lines.append("Splits: " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.splits.items())))
        if self.hashed_splits:
            lines.append(f"  {self.hashed_splits:,} rows had no split: {HASHED_SPLITS_NOTE}")
        if self.categories:
            common = self.categories.most_common(top_categories)
            more = len(self.categories) - len(common)
            text = ", ".join(f"{k} {v:,}" for k, v in common) + (f", ... ({more} more)" if more else "")
            lines.append(f"Categories ({len(self.categories)}): {text}")
        if self.attribute_counts:
            missing = self.missing_attributes()
            gaps = {name: n for name, n in missing.items() if n}
            if gaps:
                lines.append(f"Missing attribute values ({len(gaps)} of {len(missing)} attributes have gaps):")
                lines.extend(f"  {name}: {n:,} ({n / self.products:.1%})" for name, n in gaps.items())
            else:
                lines.append(f"Missing attribute values: none ({len(missing)} attributes, all filled)")
        if self.ok:
            lines.append("Problems: none")
            return "\n".join(lines)
        lines.append(f"Problems: {self.skipped:,} rows skipped")
        show_file = len(self.files) > 1
        for kind, tally in self._sorted_problems():
            lines.append(f"  {kind}: {tally.count:,}")
            for ex in tally.examples:
                lines.append(f"    {ex.where(show_file)}: {ex.message}")
            if tally.count > len(tally.examples):
                lines.append(f"    ... and {tally.count - len(tally.examples):,} more")
        return "\n".join(lines)

    def _sorted_problems(self) -> list[tuple[str, ProblemTally]]:
        return sorted(self.problems.items(), key=lambda kv: PROBLEM_KINDS.index(kv[0]))
