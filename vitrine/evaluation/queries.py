"""Shopper queries for T2P evaluation, composed from catalog attributes the way shoppers type them.

"women red handbags" reads gender, colour, article type; relevant = every product matching all
named attributes (case-insensitive).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vitrine.catalog.product import Product

# Word order of shopper queries: "women ethnic red kurtas" reads gender, usage, colour, type.
SHOPPER_TEMPLATES: tuple[tuple[str, ...], ...] = (
    ("gender", "baseColour", "articleType"),  # women red handbags
    ("gender", "articleType"),  # men sports shoes
    ("baseColour", "articleType"),  # black watches
    ("gender", "usage", "articleType"),  # men formal shirts
)
# Values shoppers do not type: "unisex" matches nobody's intent, "NA" is a missing value.
SKIPPED_VALUES = {"gender": {"unisex"}, "usage": {"na"}}


def product_attribute(product: Product, name: str) -> str:
    """An attribute for shopper queries; the article type falls back to the product's subcategory."""
    value = product.attribute(name)
    if not value and name == "articleType":
        value = product.subcategory
    return value.strip()


@dataclass(frozen=True)
class ShopperQuery:
    """A typed query and the attributes (lower-cased) a product must have to be relevant."""

    text: str
    filters: tuple[tuple[str, str], ...]


def usable_combination(template: Sequence[str], values: Sequence[str]) -> bool:
    lowered = [v.lower() for v in values]
    if not all(lowered) or any(v in SKIPPED_VALUES.get(a, ()) for a, v in zip(template, lowered)):
        return False
    # "men casual casual shoes": skip a usage the article type already says.
    if "usage" in template and "articleType" in template:
        usage, article = lowered[template.index("usage")], lowered[template.index("articleType")]
        if usage in article:
            return False
    return True


def compose_shopper_queries(
    products: Sequence[Product],
    num_queries: int = 500,
    seed: int = 0,
    templates: Sequence[Sequence[str]] = SHOPPER_TEMPLATES,
) -> list[ShopperQuery]:
    """Up to `num_queries` distinct seeded shopper queries, each matching >= 1 product.

    Every attribute combination present in `products` is a candidate; the sample is spread
    as evenly as possible over the templates (short and long queries alike).
    """
    seen: set[str] = set()
    pools: list[list[ShopperQuery]] = []
    for template in templates:
        combos = {tuple(product_attribute(p, a).lower() for a in template) for p in products}
        pool = []
        for values in sorted(combos):
            if not usable_combination(template, values):
                continue
            text = " ".join(values)
            if text not in seen:
                seen.add(text)
                pool.append(ShopperQuery(text, tuple(zip(template, values))))
        pools.append(pool)

    rng = np.random.default_rng([seed, 4])
    # Water-filling: small pools give all they have, the rest share what remains.
    takes = [0] * len(pools)
    remaining = num_queries
    by_size = sorted(range(len(pools)), key=lambda i: len(pools[i]))
    for position, i in enumerate(by_size):
        takes[i] = min(len(pools[i]), remaining // (len(pools) - position))
        remaining -= takes[i]
    queries = []
    for pool, take in zip(pools, takes):
        queries += [pool[j] for j in sorted(rng.choice(len(pool), size=take, replace=False))]
    return queries


def relevance_matrix(queries: Sequence[ShopperQuery], products: Sequence[Product]) -> np.ndarray:
    """Boolean (q, n): does product j match every attribute of query i (case-insensitive)?"""
    names = sorted({a for q in queries for a, _ in q.filters})
    columns = {a: np.array([product_attribute(p, a).lower() for p in products], dtype=str) for a in names}
    relevant = np.ones((len(queries), len(products)), dtype=bool)
    for i, query in enumerate(queries):
        for attribute, value in query.filters:
            relevant[i] &= columns[attribute] == value
    return relevant
