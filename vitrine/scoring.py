"""One home for product scoring (FashionKLIP §5): the fusion formula and which α a query kind uses.

A product is its title and its photo, so a query scores against both:

    Score_t2p(q)     = α·sim(q, title) + (1−α)·sim(q, image)        (q: a typed query, kind "text")
    Score_i2p(q_img) = α·sim(q_img, title) + (1−α)·sim(q_img, image) (q_img: a shopper's photo, kind "image")

With unit-length embeddings both equal q · (α·title + (1−α)·image), so product vectors can be
blended once (`blend_product_vectors`) and searched by inner product. Every caller (the index's
exact re-ranking, the evaluation harness, the reranker's hard-negative mining, the service) uses
these functions; nothing else writes the formula out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import numpy as np

QueryKind = Literal["text", "image"]
QUERY_KINDS: tuple[QueryKind, ...] = ("text", "image")
# The evaluation harness's task names for the same two kinds.
TASK_KINDS: dict[str, QueryKind] = {"t2p": "text", "i2p": "image"}
DEFAULT_ALPHA = 0.5



@dataclass(frozen=True)
class Hit:
    """One search result: the fused score and its parts (t2t & t2i for text queries, i2t & i2i for image queries)."""

    id: str
    score: float
    title_sim: float
    image_sim: float


ArrayOrFloat = TypeVar("ArrayOrFloat", np.ndarray, float)


def check_alpha(alpha: float) -> float:
    """`alpha` as a float, or ValueError when it lies outside [0, 1]."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    return alpha


def fuse(title: ArrayOrFloat, image: ArrayOrFloat, alpha: float) -> ArrayOrFloat:
    """α·title + (1−α)·image: similarities, or (being linear) the vectors themselves."""
    alpha = check_alpha(alpha)
    return alpha * title + (1.0 - alpha) * image


def blend_product_vectors(title_embs: np.ndarray, image_embs: np.ndarray, alpha: float) -> np.ndarray:
    """(n, d) float32 α·title + (1−α)·image: one vector per product whose inner product is the fused score."""
    assert title_embs.ndim == 2 and title_embs.shape == image_embs.shape, (title_embs.shape, image_embs.shape)
    return np.asarray(fuse(title_embs, image_embs, alpha), dtype=np.float32)


def fused_scores(query_embs: np.ndarray, title_embs: np.ndarray, image_embs: np.ndarray, alpha: float) -> np.ndarray:
    """Fused scores of queries against products: (d,) -> (n,), or (q, d) -> (q, n)."""
    assert query_embs.ndim in (1, 2) and query_embs.shape[-1] == title_embs.shape[1], (query_embs.shape, title_embs.shape)
    return query_embs @ blend_product_vectors(title_embs, image_embs, alpha).T


def weighted_t2p(q_text_emb: np.ndarray, title_embs: np.ndarray, image_embs: np.ndarray, alpha: float) -> np.ndarray:
    """Score_t2p for typed queries: (d,) -> (n,), or (q, d) -> (q, n)."""
    return fused_scores(q_text_emb, title_embs, image_embs, alpha)


def weighted_i2p(q_image_emb: np.ndarray, title_embs: np.ndarray, image_embs: np.ndarray, alpha: float) -> np.ndarray:
    """Score_i2p for shopper photos: (d,) -> (n,), or (q, d) -> (q, n)."""
    return fused_scores(q_image_emb, title_embs, image_embs, alpha)


def add_prior(logits: np.ndarray, first_stage: np.ndarray, weight: float) -> np.ndarray:
    """Rerank scores: the cross-encoder's match logits + weight x the candidates' first-stage scores."""
    first_stage = np.asarray(first_stage, dtype=np.float32)
    if first_stage.shape != logits.shape:
        raise ValueError(f"first_stage must have one score per candidate ({logits.shape[0]}), got {first_stage.shape}")
    return logits + np.float32(weight) * first_stage


@dataclass(frozen=True)
class Alphas:
    """A bundle's α: one joint value, optionally tuned per query kind (None: use the joint one)."""

    alpha: float = DEFAULT_ALPHA
    alpha_t2p: float | None = None
    alpha_i2p: float | None = None

    def __post_init__(self) -> None:
        for value in (self.alpha, self.alpha_t2p, self.alpha_i2p):
            if value is not None:
                check_alpha(value)

    def for_kind(self, kind: QueryKind) -> float:
        """The α for "text" (T2P) or "image" (I2P) queries: the tuned one, else the joint one."""
        if kind not in QUERY_KINDS:
            raise ValueError(f"unknown query kind {kind!r}; expected one of {QUERY_KINDS}")
        tuned = self.alpha_t2p if kind == "text" else self.alpha_i2p
        return float(self.alpha if tuned is None else tuned)

    def resolve(self, kind: QueryKind, explicit: float | None = None) -> float:
        """An explicit α (a request's, a command line's) wins; else this kind's."""
        return check_alpha(explicit) if explicit is not None else self.for_kind(kind)

    def as_dict(self) -> dict[str, float | None]:
        return {"alpha": self.alpha, "alpha_t2p": self.alpha_t2p, "alpha_i2p": self.alpha_i2p}

    @classmethod
    def of(cls, source: AlphaFields) -> Alphas:
        """The α fields of a bundle or index manifest."""
        return cls(source.alpha, source.alpha_t2p, source.alpha_i2p)


class AlphaFields(Protocol):
    """What carries α: the bundle manifest and the index manifest (pydantic models)."""

    @property
    def alpha(self) -> float: ...

    @property
    def alpha_t2p(self) -> float | None: ...

    @property
    def alpha_i2p(self) -> float | None: ...
