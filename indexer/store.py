"""The product store: id -> what the search page shows, plus the id <-> Faiss label mapping.

Faiss indexes know products by int64 labels. The store keeps that mapping stable:
a product keeps its label when it is replaced, and a deleted product's label is never
reused (a stale label can never alias another product). `SqliteProductStore` is the
on-disk implementation each index version carries; the service may put another
implementation of `ProductStore` (Redis) in front of it.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from vitrine.catalog.record import ProductRecord
from vitrine.errors import UserError

STORE_FILE = "products.sqlite"
_SQL_CHUNK = 500  # ids per IN (...) query, below SQLite's variable limit

_SCHEMA = """
CREATE TABLE products (
    label INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    category TEXT NOT NULL,
    subcategory TEXT NOT NULL,
    description TEXT NOT NULL,
    attributes TEXT NOT NULL,     -- JSON object of str -> str
    image TEXT NOT NULL,          -- human-readable location (ImageRef.describe())
    image_ref TEXT NOT NULL,      -- JSON: how to reopen the image
    content_hash TEXT NOT NULL    -- record + image bytes: unchanged products are not re-embedded
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('next_label', '0');
"""
# Backfilled attribute values (`vitrine attributes predict`), kept apart from the catalog's own so
# their provenance is never lost; a product's rows go when it is replaced or deleted. Stores written
# before backfill lack the table: read-only they simply have no predictions.
_PREDICTED_SCHEMA = """
CREATE TABLE IF NOT EXISTS predicted_attributes (
    id TEXT NOT NULL,
    field TEXT NOT NULL,
    value TEXT NOT NULL,
    confidence REAL NOT NULL,
    PRIMARY KEY (id, field)
);
"""
_COLUMNS = "id, title, category, subcategory, description, attributes, image"


@dataclass
class StoredProduct:
    """A record plus what only the index needs: how to reopen its image and its content hash."""

    record: ProductRecord
    image_ref: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""


@runtime_checkable
class ProductStore(Protocol):
    """id -> ProductRecord. Implementations: SqliteProductStore (on disk), the service's Redis store."""

    def get(self, id: str) -> ProductRecord | None: ...

    def get_many(self, ids: Sequence[str]) -> list[ProductRecord | None]: ...

    def put_many(self, records: Iterable[ProductRecord]) -> Any: ...

    def delete(self, ids: Iterable[str]) -> int: ...

    def __len__(self) -> int: ...

    def __contains__(self, id: object) -> bool: ...


def _record_from_row(row: Sequence[Any]) -> ProductRecord:
    ident, title, category, subcategory, description, attributes, image = row
    return ProductRecord(ident, title, category, subcategory, description, json.loads(attributes), image)


class SqliteProductStore:
    """The store of one index version, in SQLite. Thread-safe; read-only unless opened writable."""

    def __init__(self, path: str | Path, *, writable: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"product store not found: {self.path}")
        self.writable = writable
        uri = f"{self.path.absolute().as_uri()}?mode={'rw' if writable else 'ro'}"
        try:
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            self._db.execute("SELECT count(*) FROM products").fetchone()
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.path}: not a Vitrine product store ({exc})") from exc
        self._lock = threading.RLock()
        if writable:
            with self._db:
                self._db.executescript(_PREDICTED_SCHEMA)
        self._has_predicted = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'predicted_attributes'"
        ).fetchone() is not None

    @classmethod
    def create(cls, path: str | Path) -> SqliteProductStore:
        """A new, empty, writable store at `path` (which must not exist)."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(path)
        with sqlite3.connect(path) as db:
            db.executescript(_SCHEMA + _PREDICTED_SCHEMA)
        db.close()
        return cls(path, writable=True)

    def copy_to(self, path: str | Path) -> SqliteProductStore:
        """A writable copy at `path` (SQLite's backup API: consistent even while others read this one)."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(path)
        target = sqlite3.connect(path)
        try:
            with self._lock:
                self._db.backup(target)
        finally:
            target.close()
        return SqliteProductStore(path, writable=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SqliteProductStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ protocol

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM products").fetchone()[0]

    def __contains__(self, id: object) -> bool:
        if not isinstance(id, str):
            return False
        with self._lock:
            return self._db.execute("SELECT 1 FROM products WHERE id = ?", (id,)).fetchone() is not None

    def get(self, id: str) -> ProductRecord | None:
        return self.get_many([id])[0]

    def get_many(self, ids: Sequence[str]) -> list[ProductRecord | None]:
        """Records in the order of `ids`; None where an id is unknown."""
        found = {}
        for chunk in _chunks(list(dict.fromkeys(ids))):
            query = f"SELECT {_COLUMNS} FROM products WHERE id IN ({','.join('?' * len(chunk))})"
            with self._lock:
                found.update((row[0], _record_from_row(row)) for row in self._db.execute(query, chunk))
                self._attach_predicted(found, chunk)
        return [found.get(i) for i in ids]

    def put_many(self, records: Iterable[ProductRecord | StoredProduct]) -> np.ndarray:
        """Insert or replace; returns each record's label (kept for known ids, new ones for new ids)."""
        self._check_writable()
        items = [r if isinstance(r, StoredProduct) else StoredProduct(r) for r in records]
        ids = [item.record.id for item in items]
        if len(set(ids)) != len(ids):
            raise ValueError("put_many got the same id twice")
        with self._lock, self._db:
            known = self._labels(ids)
            next_label = self.next_label
            labels = np.empty(len(items), dtype=np.int64)
            for i, ident in enumerate(ids):
                if ident in known:
                    labels[i] = known[ident]
                else:
                    labels[i] = next_label
                    next_label += 1
            self._db.executemany(
                "INSERT OR REPLACE INTO products VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        int(label), r.id, r.title, r.category, r.subcategory, r.description,
                        json.dumps(r.attributes, ensure_ascii=False, sort_keys=True), r.image,
                        json.dumps(item.image_ref, sort_keys=True), item.content_hash,
                    )
                    for label, item in zip(labels, items)
                    for r in [item.record]
                ],
            )  # fmt: skip
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'next_label'", (str(next_label),))
            # A replaced product's old predictions described its old record: keep only what it brings.
            self._delete_predicted(ids)
            self._db.executemany(
                "INSERT INTO predicted_attributes VALUES (?, ?, ?, ?)",
                [(r.id, name, p["value"], float(p["confidence"])) for item in items for r in [item.record]
                 for name, p in r.predicted.items()],
            )  # fmt: skip
        return labels

    def delete(self, ids: Iterable[str]) -> int:
        """Remove these ids; returns how many were present."""
        self._check_writable()
        removed = 0
        with self._lock, self._db:
            for chunk in _chunks(list(dict.fromkeys(ids))):
                cursor = self._db.execute(f"DELETE FROM products WHERE id IN ({','.join('?' * len(chunk))})", chunk)
                removed += cursor.rowcount
            self._delete_predicted(list(ids))
        return removed

    # ------------------------------------------------------------ backfilled values

    def put_predicted(self, rows: Iterable[tuple[str, str, str, float]]) -> int:
        """Store (id, field, value, confidence) predictions, replacing earlier ones of the same (id, field).

        Only for products present, and never for a field the catalog gives the product a value for."""
        self._check_writable()
        rows = list(rows)
        records = {r.id: r for r in self.get_many(list(dict.fromkeys(i for i, *_ in rows))) if r is not None}
        missing = sorted({i for i, *_ in rows} - set(records))
        if missing:
            raise KeyError(missing[0])
        known = [(i, f) for i, f, *_ in rows if records[i].attribute(f)]
        if known:
            raise ValueError(f"product {known[0][0]} has a catalog value for {known[0][1]!r}: predictions only fill gaps")
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO predicted_attributes VALUES (?, ?, ?, ?)",
                [(i, f, v, float(c)) for i, f, v, c in rows],
            )
        return len(rows)

    def clear_predicted(self) -> int:
        """Remove every prediction; returns how many there were."""
        self._check_writable()
        with self._lock, self._db:
            return self._db.execute("DELETE FROM predicted_attributes").rowcount

    def _delete_predicted(self, ids: list[str]) -> None:
        for chunk in _chunks(list(dict.fromkeys(ids))):
            self._db.execute(f"DELETE FROM predicted_attributes WHERE id IN ({','.join('?' * len(chunk))})", chunk)

    def _attach_predicted(self, records: dict[str, ProductRecord], ids: list[str]) -> None:
        if not self._has_predicted:
            return
        query = f"SELECT id, field, value, confidence FROM predicted_attributes WHERE id IN ({','.join('?' * len(ids))})"
        for ident, name, value, confidence in self._db.execute(query, ids):
            if ident in records:
                records[ident].predicted[name] = {"value": value, "confidence": float(confidence)}

    # ------------------------------------------------------------ index side

    @property
    def next_label(self) -> int:
        """The label the next new product gets; labels are never reused."""
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE key = 'next_label'").fetchone()[0])

    def labels_of(self, ids: Sequence[str]) -> dict[str, int]:
        """id -> label for the ids that are present."""
        with self._lock:
            return self._labels(list(ids))

    def _labels(self, ids: list[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for chunk in _chunks(ids):
            query = f"SELECT id, label FROM products WHERE id IN ({','.join('?' * len(chunk))})"
            found.update(self._db.execute(query, chunk))
        return found

    def image_ref(self, id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT image_ref FROM products WHERE id = ?", (id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def file_image_paths(self, folder_name: str) -> set[str]:
        """The recorded paths of the images stored as files (image_ref kind "file") in a folder called
        `folder_name`. SQLite narrows the rows by text first, so a catalog's other images are not parsed."""
        with self._lock:
            rows = self._db.execute("SELECT image_ref FROM products WHERE image_ref LIKE ?", (f"%/{folder_name}/%",)).fetchall()
        refs = [json.loads(row[0]) for row in rows]
        paths = [str(ref["path"]) for ref in refs if ref.get("kind") == "file" and "path" in ref]
        return {path for path in paths if Path(path).parent.name == folder_name}

    def content_hashes(self) -> dict[str, str]:
        """id -> content hash of every product."""
        with self._lock:
            return dict(self._db.execute("SELECT id, content_hash FROM products"))

    def scan(self) -> Iterator[tuple[int, ProductRecord]]:
        """(label, record) for every product, in label order."""
        with self._lock:
            rows = self._db.execute(f"SELECT label, {_COLUMNS} FROM products ORDER BY label").fetchall()
            predicted = (
                self._db.execute("SELECT id, field, value, confidence FROM predicted_attributes").fetchall()
                if self._has_predicted else []
            )  # fmt: skip
        by_id: dict[str, dict[str, dict[str, Any]]] = {}
        for ident, name, value, confidence in predicted:
            by_id.setdefault(ident, {})[name] = {"value": value, "confidence": float(confidence)}
        for row in rows:
            record = _record_from_row(row[1:])
            record.predicted = by_id.get(record.id, {})
            yield int(row[0]), record

    def _check_writable(self) -> None:
        if not self.writable:
            raise PermissionError(f"{self.path} is opened read-only (index versions never change once written)")


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), _SQL_CHUNK):
        yield items[start : start + _SQL_CHUNK]
