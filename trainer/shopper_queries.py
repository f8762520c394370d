"""Shopper queries as a training signal: catalog attributes spelled the way shoppers type them.

A product's title and photo are trained to match each other; a shopper types "women red handbags", which
names attributes, not a title. This module draws, for each training product, one query its own
attributes spell ("men formal shirts", "red handbags", ...) and says which products of a batch match
every attribute the query names (its positives). The query-to-product loss (`trainer.loss.query_product_loss`)
then places such queries near the titles and photos of every matching product.

The templates are every subset of (gender, usage, baseColour) in shopper word order, followed by the
article type: a superset of the evaluation's four (`vitrine.evaluation.queries.SHOPPER_TEMPLATES`).
Only training products are read; the evaluation composes its queries from val or test products.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from vitrine.catalog.product import Product
from vitrine.evaluation.queries import product_attribute, usable_combination

QUERY_ATTRIBUTES = ("gender", "usage", "baseColour", "articleType")  # shopper word order
TRAINING_TEMPLATES: tuple[tuple[str, ...], ...] = tuple(
    tuple(a for a in QUERY_ATTRIBUTES if a == "articleType" or a in chosen)
    for size in range(len(QUERY_ATTRIBUTES))
    for chosen in itertools.combinations(QUERY_ATTRIBUTES[:-1], size)
)


class ShopperQuerySampler:
    """Per training product, the queries its attributes spell; a seeded draw of one per product and batch.

    `codes` [N, A] holds each product's value of each attribute as an integer (-1: missing); a drawn
    query is a row of codes with -1 where the query names nothing (a wildcard).
    """

    def __init__(self, products: Sequence[Product], templates: Sequence[Sequence[str]] = TRAINING_TEMPLATES) -> None:
        self.attributes = tuple(a for a in QUERY_ATTRIBUTES if any(a in t for t in templates))
        values = [[product_attribute(p, a).lower() for a in self.attributes] for p in products]
        vocab = {a: {v: i for i, v in enumerate(sorted({row[k] for row in values if row[k]}))}
                 for k, a in enumerate(self.attributes)}  # fmt: skip
        self.codes = np.array([[vocab[a].get(row[k], -1) for k, a in enumerate(self.attributes)] for row in values],
                              dtype=np.int64).reshape(len(products), len(self.attributes))  # fmt: skip
        texts: dict[str, int] = {}
        self.choices: list[list[tuple[int, np.ndarray]]] = []  # per product: (text id, query codes)
        for row, codes in zip(values, self.codes):
            mine = []
            for template in templates:
                picked = [self.attributes.index(a) for a in template]
                spelled = [row[k] for k in picked]
                if not usable_combination(template, spelled):
                    continue
                text = " ".join(spelled)
                query = np.full(len(self.attributes), -1, dtype=np.int64)
                query[picked] = codes[picked]
                mine.append((texts.setdefault(text, len(texts)), query))
            self.choices.append(mine)
        self.texts = list(texts)

    def draw(self, rows: np.ndarray, picks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One query for each product in `rows` that has one, the `picks[i]`-th (mod its count): (the rows
        that have one, their text ids, their query codes [b, A]). Picks drawn per product, not per batch,
        give a product the same query whichever process's shard it lands in."""
        assert len(rows) == len(picks), (len(rows), len(picks))
        kept, text_ids, queries = [], [], []
        for row, pick in zip(np.asarray(rows).tolist(), np.asarray(picks).tolist()):
            mine = self.choices[row]
            if mine:
                text_id, query = mine[pick % len(mine)]
                kept.append(row)
                text_ids.append(text_id)
                queries.append(query)
        empty = np.zeros((0, len(self.attributes)), dtype=np.int64)
        return (np.asarray(kept, dtype=np.int64), np.asarray(text_ids, dtype=np.int64),
                np.stack(queries) if queries else empty)  # fmt: skip

    def positives(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Boolean [q, n]: does product rows[j] have every attribute query i names?"""
        assert queries.ndim == 2 and queries.shape[1] == len(self.attributes), queries.shape
        products = self.codes[np.asarray(rows)]
        return ((queries[:, None, :] == -1) | (queries[:, None, :] == products[None, :, :])).all(axis=-1)
