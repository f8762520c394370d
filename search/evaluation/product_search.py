"""Product search as a shop runs it (FashionKLIP §5): a query ranks whole products.

A product is its title and its photo, so a query scores against both:

    Score_t2p(q)     = α·sim(q, title) + (1−α)·sim(q, image)        (q: a typed query)
    Score_i2p(q_img) = α·sim(q_img, title) + (1−α)·sim(q_img, image) (q_img: a shopper's photo)

With unit-length embeddings both equal q · (α·title + (1−α)·image), so a service can index the
blended product vectors once (`blend_product_embs`) and search them by inner product.

T2P queries are composed from catalog attributes the way shoppers type them ("women red
handbags"); relevant = every product matching all named attributes. I2P queries are seeded,
realistic re-shoots of a product photo (crop, flip, light change, JPEG); relevant = that product.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from search.catalog.product import Product
from search.evaluation.protocols import QUERY_BLOCK, recall_metrics
from search.evaluation.ranking import (
    capped_recall_at_k,
    ndcg_at_k,
    precision_at_k,
    rank_of_positive,
    ranked_relevance,
)

I2P_KS = (1, 5, 10, 20)

# Word order of shopper queries: "women ethnic red kurtas" reads gender, usage, colour, type.
SHOPPER_TEMPLATES: tuple[tuple[str, ...], ...] = (
    ("gender", "baseColour", "articleType"),  # women red handbags
    ("gender", "articleType"),  # men sports shoes
    ("baseColour", "articleType"),  # black watches
    ("gender", "usage", "articleType"),  # men formal shirts
)
# Values shoppers do not type: "unisex" matches nobody's intent, "NA" is a missing value.
SKIPPED_VALUES = {"gender": {"unisex"}, "usage": {"na"}}

# I2P photo transform ranges.
CROP_RANGE = (0.80, 0.95)  # kept fraction of each side
FLIP_PROBABILITY = 0.5
ENHANCE_RANGE = (0.90, 1.10)  # brightness, contrast, saturation factors
JPEG_QUALITY_RANGE = (60, 90)  # inclusive


# ---------------------------------------------------------------- scoring


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")


def blend_product_embs(title_embs: np.ndarray, image_embs: np.ndarray, alpha: float) -> np.ndarray:
    """(n, d) α·title + (1−α)·image: one vector per product whose inner product is the weighted score."""
    _check_alpha(alpha)
    assert title_embs.ndim == 2 and title_embs.shape == image_embs.shape, (title_embs.shape, image_embs.shape)
    return (alpha * title_embs + (1.0 - alpha) * image_embs).astype(np.float32, copy=False)


def _weighted(
    query_embs: np.ndarray, title_embs: np.ndarray, image_embs: np.ndarray, alpha: float
) -> np.ndarray:
    assert query_embs.ndim in (1, 2) and query_embs.shape[-1] == title_embs.shape[1], (
        query_embs.shape,
        title_embs.shape,
    )
    return query_embs @ blend_product_embs(title_embs, image_embs, alpha).T


def weighted_t2p(
    q_text_emb: np.ndarray, title_embs: np.ndarray, image_embs: np.ndarray, alpha: float
) -> np.ndarray:
    """Score_t2p = α·sim(q, title) + (1−α)·sim(q, image): (d,) -> (n,), or (q, d) -> (q, n)."""
    return _weighted(q_text_emb, title_embs, image_embs, alpha)


def weighted_i2p(
    q_image_emb: np.ndarray, title_embs: np.ndarray, image_embs: np.ndarray, alpha: float
) -> np.ndarray:
    """Score_i2p = α·sim(q_img, title) + (1−α)·sim(q_img, image): (d,) -> (n,), or (q, d) -> (q, n)."""
    return _weighted(q_image_emb, title_embs, image_embs, alpha)


# ---------------------------------------------------------------- T2P: shopper queries


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


def _usable(template: Sequence[str], values: Sequence[str]) -> bool:
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
            if not _usable(template, values):
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


def t2p_metrics(
    query_embs: np.ndarray, relevant: np.ndarray, title_embs: np.ndarray, image_embs: np.ndarray, alpha: float
) -> dict:
    """P@1, P@10, nDCG@10 (binary gains) and capped R@10, averaged over queries (ties against)."""
    assert query_embs.shape[0] == relevant.shape[0] and relevant.shape[1] == title_embs.shape[0]
    n_relevant = relevant.sum(axis=1)
    assert (n_relevant >= 1).all(), "every shopper query needs at least one relevant product"
    products = blend_product_embs(title_embs, image_embs, alpha)
    per_query: dict[str, list[np.ndarray]] = {"P@1": [], "P@10": [], "nDCG@10": [], "R@10_capped": []}
    for start in range(0, query_embs.shape[0], QUERY_BLOCK):
        block = slice(start, start + QUERY_BLOCK)
        hits = ranked_relevance(query_embs[block] @ products.T, relevant[block], 10)
        per_query["P@1"].append(precision_at_k(hits, 1))
        per_query["P@10"].append(precision_at_k(hits, 10))
        per_query["nDCG@10"].append(ndcg_at_k(hits, n_relevant[block], 10))
        per_query["R@10_capped"].append(capped_recall_at_k(hits, n_relevant[block], 10))
    metrics: dict = {name: float(np.concatenate(values).mean()) for name, values in per_query.items()}
    metrics["queries"] = int(query_embs.shape[0])
    metrics["median_relevant_per_query"] = float(np.median(n_relevant))
    metrics["R@10_capped_definition"] = "relevant products in the top 10 / min(10, relevant products)"
    return metrics


# ---------------------------------------------------------------- I2P: shopper photos


def shopper_photo(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A seeded, realistic re-shoot of a catalog photo.

    Random crop keeping 80-95 % of each side, horizontal flip (p = 0.5), brightness, contrast
    and saturation each within ±10 %, then a JPEG round trip at quality 60-90.
    """
    width, height = image.size
    keep_w, keep_h = rng.uniform(*CROP_RANGE, size=2)
    crop_w, crop_h = max(1, round(width * keep_w)), max(1, round(height * keep_h))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    flip = rng.random() < FLIP_PROBABILITY
    factors = rng.uniform(*ENHANCE_RANGE, size=3)
    quality = int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1))

    photo = image.convert("RGB").crop((left, top, left + crop_w, top + crop_h))
    if flip:
        photo = ImageOps.mirror(photo)
    for enhancer, factor in zip(
        (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), factors
    ):
        photo = enhancer(photo).enhance(float(factor))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as reloaded:
        return reloaded.convert("RGB")


def shopper_photo_rng(seed: int, product_index: int) -> np.random.Generator:
    """The generator for one product's query photo: independent of batch size and query order."""
    return np.random.default_rng([seed, 3, product_index])


def i2p_query_products(num_products: int, num_queries: int, seed: int) -> np.ndarray:
    """min(num_queries, num_products) distinct seeded product indices to photograph."""
    rng = np.random.default_rng([seed, 5])
    return np.sort(rng.choice(num_products, size=min(num_queries, num_products), replace=False))


def i2p_metrics(
    query_embs: np.ndarray, targets: np.ndarray, title_embs: np.ndarray, image_embs: np.ndarray, alpha: float
) -> dict:
    """R@1/5/10/20 of each photo's own product among all products (ties against)."""
    assert query_embs.shape[0] == targets.shape[0], (query_embs.shape, targets.shape)
    products = blend_product_embs(title_embs, image_embs, alpha)
    ranks = np.concatenate(
        [
            rank_of_positive(
                query_embs[start : start + QUERY_BLOCK] @ products.T, targets[start : start + QUERY_BLOCK]
            )
            for start in range(0, query_embs.shape[0], QUERY_BLOCK)
        ]
    )
    metrics = recall_metrics(ranks, ks=I2P_KS)
    metrics["candidates_per_query"] = int(title_embs.shape[0])
    return metrics
