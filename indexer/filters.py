"""Attribute filters: `{"gender": "women", "baseColour": ["red", "pink"]}` -> a row mask.

Fields are category, subcategory and every attribute name in the index. Values compare
case-insensitively; a list means any of its values; several fields must all match.
Columns are factorised once (value codes per row), so a mask is one `np.isin` per field.
`FilterColumns.normalise` is the validation and normal form every backend shares: the Faiss
backend turns it into a row mask, the Qdrant backend into a payload filter over `match_key` values.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from vitrine.errors import UserError

CORE_FIELDS = ("category", "subcategory")


class FilterError(UserError, ValueError):
    """A filter the index cannot apply (the service answers 4xx)."""


class UnknownFilterError(FilterError, KeyError):
    """A filter names a field no product has."""

    def __init__(self, field: str, known: Iterable[str]) -> None:
        self.field = field
        self.known = sorted(known)
        super().__init__(f"unknown filter field {field!r}; filterable fields: {', '.join(self.known) or '(none)'}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def match_key(value: str) -> str:
    """The form a value is compared in: trimmed and lower-cased."""
    return value.strip().lower()


class FilterColumns:
    """Per-row values of every filterable field, lower-cased and factorised."""

    def __init__(self, values: Mapping[str, list[str]], num_rows: int) -> None:
        self.num_rows = num_rows
        self._codes: dict[str, np.ndarray] = {}
        self._vocab: dict[str, dict[str, int]] = {}  # field -> lowered value -> code
        self._display: dict[str, list[str]] = {}  # field -> values as first seen (for pages)
        for name, column in values.items():
            assert len(column) == num_rows, (name, len(column), num_rows)
            vocab: dict[str, int] = {}
            display: dict[str, str] = {}
            codes = np.empty(num_rows, dtype=np.int32)
            for row, value in enumerate(column):
                key = match_key(value)
                codes[row] = vocab.setdefault(key, len(vocab))
                if key:
                    display.setdefault(key, value.strip())
            self._codes[name] = codes
            self._vocab[name] = vocab
            self._display[name] = sorted(display.values(), key=str.lower)
        self._by_lower = {name.lower(): name for name in self._codes}

    @classmethod
    def from_records(cls, records: Iterable[Any], *, include_predicted: bool = False) -> FilterColumns:
        """From ProductRecords (or Products) in row order. `include_predicted`: a product without a
        catalog value for a field takes its backfilled one (`ProductRecord.predicted`), if any."""
        records = list(records)
        names = set(CORE_FIELDS)
        for record in records:
            names.update(record.attributes)
            if include_predicted:
                names.update(record.predicted)
        read = (lambda r, name: r.attribute_or_predicted(name)) if include_predicted else (lambda r, name: r.attribute(name))
        values = {name: [read(record, name) for record in records] for name in sorted(names)}
        return cls(values, len(records))

    def fields(self) -> dict[str, list[str]]:
        """Filterable field -> its known (non-empty) values."""
        return {name: list(values) for name, values in self._display.items()}

    def field_name(self, name: str) -> str:
        """The field as stored; names match exactly, else case-insensitively."""
        if name in self._codes:
            return name
        if isinstance(name, str) and name.lower() in self._by_lower:
            return self._by_lower[name.lower()]
        raise UnknownFilterError(str(name), self._codes)

    def normalise(self, filters: Mapping[str, str | list[str] | tuple[str, ...]]) -> dict[str, list[str]]:
        """Field as stored -> the `match_key`s of its wanted values; FilterError / UnknownFilterError
        for a filter no backend can apply."""
        if not isinstance(filters, Mapping):
            raise FilterError(f"filters must be a mapping of field -> value(s), got {type(filters).__name__}")
        wanted_by_field: dict[str, list[str]] = {}
        for name, wanted in filters.items():
            field = self.field_name(name)
            values = [wanted] if isinstance(wanted, str) else wanted
            if not isinstance(values, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in values):
                raise FilterError(f"filter {name!r}: expected a string or a list of strings, got {wanted!r}")
            if not values:
                raise FilterError(f"filter {name!r}: empty list of values")
            keys = list(dict.fromkeys(match_key(v) for v in values))
            if field in wanted_by_field:  # one field named twice ("gender", "Gender"): both must match
                keys = [key for key in wanted_by_field[field] if key in keys]
            wanted_by_field[field] = keys
        return wanted_by_field

    def mask(self, filters: Mapping[str, str | list[str] | tuple[str, ...]]) -> np.ndarray:
        """Boolean (num_rows,): rows matching every field's value(s)."""
        mask = np.ones(self.num_rows, dtype=bool)
        for field, keys in self.normalise(filters).items():
            vocab = self._vocab[field]
            codes = [vocab[key] for key in keys if key in vocab]
            mask &= np.isin(self._codes[field], np.asarray(codes, dtype=np.int32))
        return mask
