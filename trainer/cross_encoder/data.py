"""Training rows for the cross-encoder: pretraining pairs (MLM / MPM / TIA) and reranking groups.

Pretraining pairs put the product's title in the query segment with an empty title segment, the
form text-to-image reranking uses. Reranking groups hold one query, its product and hard negatives;
half of the groups drop the candidates' titles, so one model reranks images (T2I) and products (T2P).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from trainer.concepts import GENDER_WORDS, _is_number, words
from trainer.cross_encoder.knowledge import AttributeSchema
from trainer.cross_encoder.masking import IGNORE_INDEX, choose_mask_words, mask_patches, mask_words
from vitrine.catalog.product import Product
from vitrine.evaluation.queries import SHOPPER_TEMPLATES, product_attribute, usable_combination
from vitrine.runtime.rerank_inputs import PairEncoder, PairRow

QUERY_KINDS = ("title", "visual", "shopper")


@dataclass
class Batch:
    """Padded tensors for one forward pass, plus what the losses need."""

    input_ids: Tensor
    token_type_ids: Tensor
    attention_mask: Tensor
    patches: Tensor  # model input (MPM-masked patches zeroed)
    match: Tensor  # [B] float 1/0 (TIA labels; unused for reranking groups)
    mlm_labels: Tensor | None = None  # [B, T], IGNORE_INDEX off target
    patch_mask: Tensor | None = None  # [B, P] bool, patches to reconstruct
    patch_targets: Tensor | None = None  # [B, P, C] original features
    extra: dict = field(default_factory=dict)

    def inputs(self) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids, "token_type_ids": self.token_type_ids, "attention_mask": self.attention_mask, "patches": self.patches}


def _tensors(encoder: PairEncoder, rows: Sequence[PairRow], pad_to: int | None = None) -> dict[str, Tensor]:
    return {k: torch.from_numpy(v) for k, v in encoder.pad(rows, pad_to).items()}


def _replace_ids(row: PairRow, ids: np.ndarray) -> PairRow:
    return PairRow(ids, row.token_type_ids, row.word_ids, row.query_words)


class PretrainSampler:
    """FashionBERT pretraining batches. With `knowledge`: KG-MLIM masks attribute words first and
    KG-ITM negatives swap one attribute value (random text when the title names none); without it,
    random whole words and random texts."""

    def __init__(
        self,
        products: Sequence[Product],
        patches: np.ndarray,
        encoder: PairEncoder,
        schema: AttributeSchema,
        *,
        knowledge: bool = True,
        negative_ratio: float = 0.5,
        seed: int = 0,
    ) -> None:
        assert patches.ndim == 3 and patches.shape[0] == len(products)
        self.products, self.patches, self.encoder, self.schema = list(products), patches, encoder, schema
        self.knowledge, self.negative_ratio = knowledge, negative_ratio
        self.rng = np.random.default_rng([seed, 11])
        self.stats = {"rows": 0, "negatives": 0, "swap_negatives": 0, "masked_words": 0, "masked_attribute_words": 0}

    def _negative_text(self, i: int) -> str:
        title = self.products[i].title
        if self.knowledge:
            swapped = self.schema.swap(title, self.rng)
            if swapped is not None:
                self.stats["swap_negatives"] += 1
                return swapped
        while True:
            j = int(self.rng.integers(len(self.products)))
            if self.products[j].title != title:
                return self.products[j].title

    def batch(self, size: int) -> Batch:
        """`size` TIA rows (unmasked matched and mismatched pairs, as KG-ITM scores them), then a masked
        copy of each matched pair carrying the MLM and MPM targets. Masked rows are kept out of TIA:
        [MASK] tokens and zeroed patches would otherwise tell matched pairs apart, and masking a
        swapped attribute word would hide the very word that makes a pair mismatched."""
        idx = self.rng.choice(len(self.products), size=size, replace=len(self.products) < size)
        rows, labels, match, sources = [], [], [], []
        masked_rows, masked_labels, masked_sources = [], [], []
        for i in idx:
            title = self.products[i].title
            negative = self.rng.random() < self.negative_ratio
            text = self._negative_text(i) if negative else title
            row = self.encoder.row(text)
            rows.append(row)
            labels.append(np.full_like(row.input_ids, IGNORE_INDEX))
            match.append(0.0 if negative else 1.0)
            sources.append(i)
            if negative:
                self.stats["negatives"] += 1
                continue
            visible = sorted({int(w) for w in row.word_ids if w >= 0})  # words that survived truncation
            attribute_words = self.schema.attribute_words(title)
            priority = [visible.index(w) for w in attribute_words if w in visible] if self.knowledge else []
            chosen = [visible[k] for k in choose_mask_words(len(visible), self.rng, priority_words=priority)]
            ids, lab = mask_words(row.input_ids, row.word_ids, chosen, self.rng, mask_id=self.encoder.mask_id, vocab_size=self.encoder.vocab_size)
            masked_rows.append(_replace_ids(row, ids))
            masked_labels.append(lab)
            masked_sources.append(i)
            self.stats["masked_words"] += len(chosen)
            self.stats["masked_attribute_words"] += len(set(chosen) & set(attribute_words))
        self.stats["rows"] += size
        tia_rows = len(rows)
        t = _tensors(self.encoder, rows + masked_rows)
        total, width = t["input_ids"].shape
        mlm = np.full((total, width), IGNORE_INDEX, np.int64)
        for r, lab in enumerate(labels + masked_labels):
            mlm[r, : len(lab)] = lab
        targets = torch.from_numpy(np.asarray(self.patches[np.asarray(sources + masked_sources)], dtype=np.float32))
        num_patches = targets.shape[1]
        patch_mask = torch.zeros(total, num_patches, dtype=torch.bool)
        for r in range(tia_rows, total):
            patch_mask[r] = torch.from_numpy(mask_patches(num_patches, self.rng))
        inputs = targets.masked_fill(patch_mask[..., None], 0.0)
        return Batch(
            **t, patches=inputs, match=torch.tensor(match + [1.0] * len(masked_rows)), mlm_labels=torch.from_numpy(mlm),
            patch_mask=patch_mask, patch_targets=targets, extra={"tia_rows": tia_rows},
        )


class QueryMaker:
    """The fine-tuning queries of a product: its title, the title without brand and non-visual words,
    and an attribute-composed shopper query (the evaluation harness's templates)."""

    def __init__(self, brand_words: frozenset[str], visual_words: frozenset[str]) -> None:
        self.brand_words, self.visual_words = brand_words, visual_words

    def visual(self, title: str) -> str:
        tokens = words(title)
        start = 0
        while start < len(tokens) - 1 and tokens[start] in self.brand_words:
            start += 1
        body = tokens[start:]
        kept = [w for w in body[:-1] if (w in self.visual_words or w in GENDER_WORDS) and not _is_number(w)]
        return " ".join(kept + body[-1:]) if body else title.lower()

    def shopper(self, product: Product, rng: np.random.Generator) -> tuple[str, tuple[tuple[str, str], ...]] | None:
        order = rng.permutation(len(SHOPPER_TEMPLATES))
        for k in order:
            template = SHOPPER_TEMPLATES[k]
            values = tuple(product_attribute(product, a).lower() for a in template)
            if usable_combination(template, values):
                return " ".join(values), tuple(zip(template, values))
        return None

    def make(self, product: Product, kind: str, rng: np.random.Generator) -> tuple[str, tuple[tuple[str, str], ...]]:
        """(query text, attribute filters a relevant product must match; empty for title queries)."""
        if kind == "shopper":
            made = self.shopper(product, rng)
            if made is not None:
                return made
            kind = "visual"
        if kind == "visual":
            return self.visual(product.title), ()
        if kind == "title":
            return product.title, ()
        raise ValueError(f"unknown query kind {kind!r}")


@dataclass(frozen=True)
class RerankGroup:
    query: str
    positive: int
    negatives: tuple[int, ...]
    with_titles: bool
    swapped_query: str | None  # KG-ITM: the query with one attribute swapped, a negative for the positive
    first_stage: tuple[float, ...] = ()  # the dual encoder's scores of (positive, *negatives); empty if unknown


def is_relevant(query: str, filters: Sequence[tuple[str, str]], product: Product, maker: QueryMaker, kind: str) -> bool:
    """Would `product` count as a right answer to the query (so it cannot be a negative)?"""
    if filters:
        return all(product_attribute(product, a).lower() == v for a, v in filters)
    if kind == "visual":
        return maker.visual(product.title) == query
    return product.title.strip().lower() == query.strip().lower()


def rows_for_groups(
    groups: Sequence[RerankGroup], products: Sequence[Product], patches: np.ndarray, encoder: PairEncoder
) -> tuple[Batch, int]:
    """Rows for G groups: G * (1 + k) group rows (positive first in each group), then one row per
    KG-ITM swap. Returns the batch and k + 1. When every group carries first-stage scores they come
    as `extra["first_stage"]` (a swap row gets its positive's, so the prior cancels in the KG-ITM loss)."""
    width = 1 + len(groups[0].negatives)
    rows, which = [], []
    for g in groups:
        assert len(g.negatives) + 1 == width, "groups of one batch must have the same size"
        for j in (g.positive, *g.negatives):
            rows.append(encoder.row(g.query, products[j].title if g.with_titles else ""))
            which.append(j)
    swaps = [g for g in groups if g.swapped_query is not None]
    for g in swaps:
        rows.append(encoder.row(g.swapped_query, products[g.positive].title if g.with_titles else ""))
        which.append(g.positive)
    t = _tensors(encoder, rows)
    feats = torch.from_numpy(np.asarray(patches[np.asarray(which)], dtype=np.float32))
    match = torch.zeros(len(rows))
    match[torch.arange(len(groups)) * width] = 1.0
    extra: dict = {"groups": len(groups), "swaps": len(swaps)}
    if all(len(g.first_stage) == width for g in groups):
        prior = [x for g in groups for x in g.first_stage] + [g.first_stage[0] for g in swaps]
        extra["first_stage"] = torch.tensor(prior, dtype=torch.float32)
    return Batch(**t, patches=feats, match=match, extra=extra), width


__all__ = ["Batch", "PretrainSampler", "QUERY_KINDS", "QueryMaker", "RerankGroup", "is_relevant", "rows_for_groups"]
