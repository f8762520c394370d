"""The products' attribute values per split, and their embeddings (the heads' features).

Embeddings come from the index the catalog was built into (its stored vectors: no encoding at all)
or from the bundle itself (`embed_products`, cached in an npz keyed by bundle fingerprint and ids,
so a catalog is embedded once).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitrine.catalog.product import Product
from vitrine.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class AttributeData:
    """Products (rows) with their split, attribute values ("" where missing) and title/image vectors."""

    ids: list[str]
    splits: np.ndarray  # (n,) str
    values: dict[str, np.ndarray]  # field -> (n,) str
    title: np.ndarray  # (n, D) float32
    image: np.ndarray  # (n, D) float32

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.title.shape[0] != n or self.image.shape[0] != n or self.splits.shape != (n,):
            raise ValueError(f"{n} ids, {self.title.shape[0]} title / {self.image.shape[0]} image vectors, {self.splits.shape} splits")

    @classmethod
    def from_products(cls, products: Sequence[Product], fields: Sequence[str], title: np.ndarray, image: np.ndarray) -> AttributeData:
        return cls(
            ids=[p.id for p in products],
            splits=np.array([p.split or "" for p in products], dtype=object).astype(str),
            values={f: np.array([p.attribute(f).strip() for p in products], dtype=object).astype(str) for f in fields},
            title=np.asarray(title, np.float32),
            image=np.asarray(image, np.float32),
        )

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

    def take(self, rows: np.ndarray) -> AttributeData:
        return AttributeData(
            ids=[self.ids[i] for i in rows], splits=self.splits[rows],
            values={f: v[rows] for f, v in self.values.items()}, title=self.title[rows], image=self.image[rows],
        )  # fmt: skip

    def split(self, name: str) -> AttributeData:
        part = self.take(self.rows(name))
        if not len(part):
            raise UserError(f"the catalog has no {name!r} products: the heads need train, val and test splits")
        return part


def embed_products(products: Sequence[Product], encoder, cache: Path | None, *, threads: int | None = None,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(title, image) vectors of `products` with a ServingEncoder, read from / written to `cache` (npz)."""
    ids = np.array([p.id for p in products], dtype=str)
    if cache is not None and cache.is_file():
        with np.load(cache) as stored:
            if str(stored["fingerprint"]) == encoder.fingerprint and np.array_equal(stored["ids"], ids):
                log.info("embeddings of %d products read from %s", len(ids), cache)
                return stored["title"], stored["image"]
        log.info("%s holds other products or another bundle's vectors: embedding again", cache)
    from vitrine.embed import ProductEmbedder

    result = ProductEmbedder(encoder, threads=threads, progress=progress, desc="embedding").embed(list(products))
    if result.errors:
        raise UserError(f"{len(result.errors)} products could not be embedded, e.g. {result.errors[0].id}: {result.errors[0].message}")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, ids=ids, fingerprint=np.array(encoder.fingerprint), title=result.text, image=result.image)
    return result.text, result.image
