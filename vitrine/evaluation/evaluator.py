"""Evaluators: small objects that turn one encoded split into a metrics dict (as sentence-transformers'
evaluators do); `run_evaluation` runs the configured ones over a bundle, and the trainer's
validation and α tuning call the same objects on its model.

The split's texts and images are encoded once (`embed_split`); the retrieval protocols then work on
those embeddings alone. Product search encodes its own queries (shopper queries, shopper photos) and
can score them at several α at once (`sweep`), which is how α is tuned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

from PIL import Image

from vitrine.catalog.product import Product
from vitrine.errors import UserError
from vitrine.evaluation import product_search
from vitrine.evaluation.encoder import encode_images, encode_texts
from vitrine.evaluation.kagl import KAGL_QUERIES, kagl_metrics, kagl_query_texts
from vitrine.evaluation.photos import i2p_query_products, shopper_photo, shopper_photo_rng
from vitrine.evaluation.protocols import RetrievalSet, full_protocol, index_distinct, sample_protocol
from vitrine.evaluation.queries import compose_shopper_queries, relevance_matrix
from vitrine.protocols import Encoder
from vitrine.scoring import DEFAULT_ALPHA, TASK_KINDS, Alphas, check_alpha

log = logging.getLogger(__name__)

PROTOCOLS = ("sample", "full", "kagl", "t2p", "i2p")
# The report section of each protocol.
SECTIONS = {"sample": "retrieval", "full": "retrieval", "kagl": "kagl", "t2p": "product_search", "i2p": "product_search"}
TEXT_FIELDS = ("title", "description")
REPORT_FORMAT = "vitrine-eval/1"


@dataclass(frozen=True)
class EvalConfig:
    protocols: tuple[str, ...] = PROTOCOLS
    queries: int = 1000  # sample protocol queries per direction
    kagl_queries: int = 2000  # KAGL protocol: distinct titles as queries
    candidates: int = 100  # sample protocol negatives per query
    t2p_queries: int = 500
    i2p_queries: int = 1000
    alpha: float | None = None  # None: the encoder's own `alpha`, else DEFAULT_ALPHA
    seed: int = 0
    batch_size: int = 64
    text_field: str = "title"
    progress: bool | None = field(default=None, compare=False)  # None: bars only on a terminal

    def __post_init__(self) -> None:
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise UserError(
                f"unknown protocol(s) {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(PROTOCOLS)}"
            )
        if self.text_field not in TEXT_FIELDS:
            raise UserError(f"text field must be one of {', '.join(TEXT_FIELDS)}, got {self.text_field!r}")
        for name in ("queries", "candidates", "kagl_queries", "t2p_queries", "i2p_queries", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"alpha must be within [0, 1], got {self.alpha}")


def resolve_alpha(encoder: Encoder, alpha: float | None, task: str) -> float:
    """The explicit α, else the encoder's α for `task` ("t2p"/"i2p"), else 0.5 (an encoder without α)."""
    if alpha is not None:
        try:
            return check_alpha(alpha)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    alphas = encoder.alphas if isinstance(encoder, HasAlphas) else Alphas()
    return alphas.for_kind(TASK_KINDS[task])


@runtime_checkable
class HasAlphas(Protocol):
    """An encoder that carries its tuned α (a model bundle)."""

    @property
    def alphas(self) -> Alphas: ...


def product_texts(products: Sequence[Product], text_field: str) -> list[str]:
    """Each product's query text; an empty one is an error, not a silently dropped product."""
    texts = [getattr(p, text_field).strip() for p in products]
    missing = [p.id for p, t in zip(products, texts) if not t]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(products)} products have no {text_field} (first: {missing[0]}); "
            f"use --text-field title"
        )
    return texts


def embed_split(
    products: Sequence[Product],
    encoder: Encoder,
    *,
    text_field: str = "title",
    batch_size: int = 64,
    progress: bool | None = None,
) -> RetrievalSet:
    """Encode each distinct text and each product's first image once."""
    if len(products) < 2:
        raise UserError(f"evaluation needs at least 2 products, got {len(products)}")
    texts, text_of_product = index_distinct(product_texts(products, text_field))
    text_embs = encode_texts(encoder, texts, batch_size=batch_size, progress=progress)
    image_embs = encode_images(encoder, [p.image for p in products], batch_size=batch_size, progress=progress)
    if text_embs.shape[1] != image_embs.shape[1]:
        raise UserError(
            f"text embeddings have {text_embs.shape[1]} dimensions but image embeddings {image_embs.shape[1]}"
        )
    return RetrievalSet(
        texts=texts,
        text_of_product=text_of_product,
        groups=[p.subcategory for p in products],
        text_embs=text_embs,
        image_embs=image_embs,
    )


class Evaluator(Protocol):
    """One evaluation: a name, a call that returns metrics, and the metric that sums it up."""

    name: str
    primary_metric: str  # a path into the metrics dict, "t2i/R@1"

    def __call__(self, encoder: Encoder, products: Sequence[Product], data: RetrievalSet) -> dict: ...


def primary_value(evaluator: Evaluator, metrics: dict) -> float:
    """The evaluator's primary metric read out of its metrics dict."""
    value = metrics
    for key in evaluator.primary_metric.split("/"):
        value = value[key]
    return float(value)


class SampleRetrievalEvaluator:
    """T2I and I2T: each query's ground truth among 1 + K candidates from its subcategory."""

    name = "sample"
    primary_metric = "t2i/R@1"

    def __init__(self, num_queries: int = 1000, num_negatives: int = 100, seed: int = 0):
        self.num_queries, self.num_negatives, self.seed = num_queries, num_negatives, seed

    def __call__(self, encoder: Encoder, products: Sequence[Product], data: RetrievalSet) -> dict:
        return sample_protocol(
            data, num_queries=self.num_queries, num_negatives=self.num_negatives, seed=self.seed
        )


class FullRetrievalEvaluator:
    """T2I and I2T: every query against the whole split, relevance by text."""

    name = "full"
    primary_metric = "t2i/R@10"

    def __call__(self, encoder: Encoder, products: Sequence[Product], data: RetrievalSet) -> dict:
        return full_protocol(data)


class KaglEvaluator:
    """Marqo's KAGL protocol: distinct titles rank a gallery (the split, or a second catalog) of images."""

    name = "kagl"
    primary_metric = "MRR@10"

    def __init__(
        self,
        num_queries: int = KAGL_QUERIES,
        seed: int = 0,
        gallery: Sequence[Product] | None = None,
        batch_size: int = 64,
        progress: bool | None = None,
    ):
        self.num_queries, self.seed, self.gallery = num_queries, seed, gallery
        self.batch_size, self.progress = batch_size, progress

    def __call__(self, encoder: Encoder, products: Sequence[Product], data: RetrievalSet) -> dict:
        queries = kagl_query_texts([p.title for p in products], self.num_queries, self.seed)
        text_row = {t: i for i, t in enumerate(data.texts)}
        if all(q in text_row for q in queries):  # the split's titles are already encoded
            query_embs = data.text_embs[[text_row[q] for q in queries]]
        else:
            query_embs = encode_texts(encoder, queries, batch_size=self.batch_size, progress=self.progress)
        if self.gallery is None:
            gallery_embs, gallery_titles = data.image_embs, [p.title for p in products]
        else:
            gallery_embs = encode_images(encoder, [p.image for p in self.gallery], batch_size=self.batch_size,
                                         progress=self.progress)  # fmt: skip
            gallery_titles = [p.title for p in self.gallery]
        metrics = kagl_metrics(query_embs, queries, gallery_embs, gallery_titles)
        metrics["gallery_source"] = "split" if self.gallery is None else "gallery catalog"
        return metrics


class ProductSearchEvaluator:
    """Queries ranking whole products by the fused score at α; `sweep` scores several α at once."""

    name: str
    primary_metric: str
    default_queries: int

    def __init__(
        self,
        num_queries: int | None = None,
        alpha: float = DEFAULT_ALPHA,
        seed: int = 0,
        batch_size: int = 64,
        progress: bool | None = None,
    ):
        self.num_queries = self.default_queries if num_queries is None else num_queries
        self.alpha, self.seed, self.batch_size, self.progress = alpha, seed, batch_size, progress

    def __call__(self, encoder: Encoder, products: Sequence[Product], data: RetrievalSet) -> dict:
        return self.sweep(encoder, products, data, [self.alpha])[0]

    def sweep(
        self, encoder: Encoder, products: Sequence[Product], data: RetrievalSet, alphas: Sequence[float]
    ) -> list[dict]:
        raise NotImplementedError


class TextToProductEvaluator(ProductSearchEvaluator):
    """Shopper queries ("women red handbags") ranking products by the weighted T2P score."""

    name = "t2p"
    primary_metric = "nDCG@10"
    default_queries = 500

    def sweep(
        self, encoder: Encoder, products: Sequence[Product], data: RetrievalSet, alphas: Sequence[float]
    ) -> list[dict]:
        """Metrics at each α of `alphas`; the queries are encoded once."""
        queries = compose_shopper_queries(products, self.num_queries, self.seed)
        if not queries:
            reason = "no shopper queries: the products lack gender/baseColour/articleType/usage attributes"
            log.warning("t2p skipped: %s", reason)
            return [{"skipped": reason, "alpha": alpha} for alpha in alphas]
        query_embs = encode_texts(
            encoder, [q.text for q in queries], batch_size=self.batch_size, progress=self.progress
        )
        relevant = relevance_matrix(queries, products)
        out = []
        for alpha in alphas:
            metrics = product_search.t2p_metrics(query_embs, relevant, data.title_embs, data.image_embs, alpha)
            metrics["alpha"] = alpha
            metrics["candidates_per_query"] = data.num_products
            metrics["example_queries"] = [q.text for q in queries[:: max(1, len(queries) // 5)][:5]]
            out.append(metrics)
        return out


class ImageToProductEvaluator(ProductSearchEvaluator):
    """Seeded shopper photos of products ranking products by the weighted I2P score."""

    name = "i2p"
    primary_metric = "R@1"
    default_queries = 1000

    def sweep(
        self, encoder: Encoder, products: Sequence[Product], data: RetrievalSet, alphas: Sequence[float]
    ) -> list[dict]:
        """Metrics at each α of `alphas`; the photos are encoded once."""
        targets = i2p_query_products(len(products), self.num_queries, self.seed)

        def photograph(i: int, image: Image.Image) -> Image.Image:
            return shopper_photo(image, shopper_photo_rng(self.seed, int(targets[i])))

        query_embs = encode_images(
            encoder,
            [products[t].image for t in targets],
            batch_size=self.batch_size,
            progress=self.progress,
            transform=photograph,
        )
        out = []
        for alpha in alphas:
            metrics = product_search.i2p_metrics(query_embs, targets, data.title_embs, data.image_embs, alpha)
            metrics["alpha"] = alpha
            out.append(metrics)
        return out


def build_evaluators(
    config: EvalConfig, alphas: dict[str, float], gallery: Sequence[Product] | None = None
) -> list[Evaluator]:
    """The evaluators `config.protocols` asks for, in canonical order; `alphas` by task (t2p, i2p)."""
    common = dict(seed=config.seed, batch_size=config.batch_size, progress=config.progress)
    make = {
        "sample": lambda: SampleRetrievalEvaluator(config.queries, config.candidates, config.seed),
        "full": FullRetrievalEvaluator,
        "kagl": lambda: KaglEvaluator(config.kagl_queries, gallery=gallery, **common),
        "t2p": lambda: TextToProductEvaluator(config.t2p_queries, alpha=alphas["t2p"], **common),
        "i2p": lambda: ImageToProductEvaluator(config.i2p_queries, alpha=alphas["i2p"], **common),
    }
    return [make[name]() for name in PROTOCOLS if name in config.protocols]


def run_evaluation(
    encoder: Encoder,
    products: Sequence[Product],
    config: EvalConfig,
    *,
    context: dict | None = None,
    gallery: Sequence[Product] | None = None,
) -> dict:
    """Encode the split once, run the configured protocols, return the whole report as a dict.

    `context` (catalog path, split, ...) is recorded in the report's config. Everything except
    "timings_s" depends only on the inputs and the seed.
    """
    alphas = {task: resolve_alpha(encoder, config.alpha, task) for task in ("t2p", "i2p")}
    timings: dict[str, float] = {}
    started = time.perf_counter()
    data = embed_split(
        products,
        encoder,
        text_field=config.text_field,
        batch_size=config.batch_size,
        progress=config.progress,
    )
    timings["encode_split"] = time.perf_counter() - started

    sections: dict[str, dict[str, dict]] = {"retrieval": {}, "product_search": {}}
    for evaluator in build_evaluators(config, alphas, gallery):
        log.info("running %s", evaluator.name)
        t0 = time.perf_counter()
        result = evaluator(encoder, products, data)
        timings[evaluator.name] = time.perf_counter() - t0
        sections.setdefault(SECTIONS[evaluator.name], {})[evaluator.name] = result
    timings["total"] = time.perf_counter() - started

    settings = asdict(config)
    settings.pop("progress")
    settings["protocols"] = list(config.protocols)
    settings["alpha"] = alphas
    return {
        "format": REPORT_FORMAT,
        "encoder": {"description": encoder.describe(), "dim": int(data.text_embs.shape[1])},
        "config": {**(context or {}), **settings},
        "counts": {
            "products": data.num_products,
            "distinct_texts": len(data.texts),
            "subcategories": len(set(data.groups)),
        },
        "retrieval": sections["retrieval"],
        **({"kagl": sections["kagl"]["kagl"]} if "kagl" in sections else {}),
        "product_search": sections["product_search"],
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
