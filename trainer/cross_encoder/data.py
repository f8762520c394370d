"""Training rows for the cross-encoder: pretraining pairs (MLM / MPM / TIA) and reranking groups.

Pretraining pairs put the product's title in the query segment with an empty title segment, the
form text-to-image reranking uses. Reranking groups hold one query, its product and hard negatives;
half of the groups drop the candidates' titles, so one model reranks images (T2I) and products (T2P).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from trainer.concepts import GENDER_WORDS, _is_number, words
from trainer.cross_encoder.knowledge import AttributeSchema
from trainer.cross_encoder.masking import IGNORE_INDEX, choose_mask_words, mask_patches, mask_words
from vitrine.catalog.product import Product
from vitrine.evaluation.queries import SHOPPER_TEMPLATES, product_attribute, usable_combination
from vitrine.runtime.rerank_inputs import PairEncoder, PairRow, aligned_rows

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
    aligned: Tensor | None = None  # [B, 3, D] dual-encoder (query, title, image) embeddings, for aligned models

    def inputs(self) -> dict[str, Tensor]:
        feeds = {"input_ids": self.input_ids, "token_type_ids": self.token_type_ids, "attention_mask": self.attention_mask, "patches": self.patches}
        if self.aligned is not None:
            feeds["aligned"] = self.aligned
        return feeds


@dataclass(frozen=True)
class DualEmbeddings:
    """The dual encoder's view of the training products (row i = product i): L2-normalised title and
    image embeddings, and its text encoder for texts that are no product's title (queries, swaps)."""

    titles: np.ndarray  # float32 [N, D]
    images: np.ndarray  # float32 [N, D]
    encode_texts: Callable[[list[str]], np.ndarray]

    def __post_init__(self) -> None:
        assert self.titles.ndim == 2 and self.titles.shape == self.images.shape, (self.titles.shape, self.images.shape)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.titles.shape[1]), np.float32)
        out = np.asarray(self.encode_texts(list(texts)), dtype=np.float32)
        assert out.shape == (len(texts), self.titles.shape[1]), out.shape
        return out


def _tensors(encoder: PairEncoder, rows: Sequence[PairRow], pad_to: int | None = None) -> dict[str, Tensor]:
    return {k: torch.from_numpy(v) for k, v in encoder.pad(rows, pad_to).items()}


def _replace_ids(row: PairRow, ids: np.ndarray) -> PairRow:
    return PairRow(ids, row.token_type_ids, row.word_ids, row.query_words)


NEGATIVE_KINDS = ("swap", "hard_image", "hard_title", "random")


class PretrainSampler:
    """FashionBERT pretraining batches. With `knowledge`: KG-MLIM masks attribute words first and
    KG-ITM negatives swap one attribute value (random text when the title names none); without it,
    random whole words and random texts. With `hard` ([N, k] top-ranked wrong images of each title,
    [N, k] top-ranked wrong titles of each image, `mining.tia_hard_negatives`), negatives are drawn
    evenly from the swaps, the dual encoder's hard negatives of both directions and random texts (issue 12).
    With `dual`, rows carry the dual encoder's embeddings for aligned models."""

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
        hard: tuple[np.ndarray, np.ndarray] | None = None,
        dual: DualEmbeddings | None = None,
    ) -> None:
        assert patches.ndim == 3 and patches.shape[0] == len(products)
        if hard is not None:
            assert hard[0].shape[0] == len(products) and hard[1].shape[0] == len(products), (hard[0].shape, hard[1].shape)
        if dual is not None:
            assert dual.titles.shape[0] == len(products), dual.titles.shape
        self.products, self.patches, self.encoder, self.schema = list(products), patches, encoder, schema
        self.knowledge, self.negative_ratio, self.hard, self.dual = knowledge, negative_ratio, hard, dual
        self.rng = np.random.default_rng([seed, 11])
        self.stats = {"rows": 0, "negatives": 0, "swap_negatives": 0, "hard_image_negatives": 0, "hard_title_negatives": 0,
                      "masked_words": 0, "masked_attribute_words": 0}

    def _random_title(self, i: int) -> int:
        title = self.products[i].title
        while True:
            j = int(self.rng.integers(len(self.products)))
            if self.products[j].title != title:
                return j

    def _negative(self, i: int) -> tuple[str, int, int | None]:
        """(text, image row, product whose title the text is, or None for a made-up text)."""
        # Random texts stay in the mix: hard negatives alone never show the match head a plainly wrong
        # pair, and its AUC against random titles fell to 0.68 (docs/RESULTS.md, issue 12).
        kinds = ["swap"] if self.knowledge else []
        if self.hard is not None:
            kinds += ["hard_image", "hard_title", "random"]
        kind = kinds[int(self.rng.integers(len(kinds)))] if kinds else "random"
        if kind == "swap":
            swapped = self.schema.swap(self.products[i].title, self.rng)
            if swapped is not None:
                self.stats["swap_negatives"] += 1
                return swapped, i, None
            kind = "hard_title" if self.hard is not None else "random"
        if kind == "hard_image":
            self.stats["hard_image_negatives"] += 1
            return self.products[i].title, int(self.rng.choice(self.hard[0][i])), i
        if kind == "hard_title":
            self.stats["hard_title_negatives"] += 1
            j = int(self.rng.choice(self.hard[1][i]))
            return self.products[j].title, i, j
        j = self._random_title(i)
        return self.products[j].title, i, j

    def _aligned(self, text_of: list[int | None], texts: list[str], images: list[int]) -> Tensor | None:
        if self.dual is None:
            return None
        made = [k for k, j in enumerate(text_of) if j is None]
        query = np.zeros((len(texts), self.dual.titles.shape[1]), np.float32)
        known = [k for k, j in enumerate(text_of) if j is not None]
        query[known] = self.dual.titles[[text_of[k] for k in known]]
        query[made] = self.dual.encode([texts[k] for k in made])
        return torch.from_numpy(aligned_rows(query, None, self.dual.images[np.asarray(images)]))

    def batch(self, size: int) -> Batch:
        """`size` TIA rows (unmasked matched and mismatched pairs, as KG-ITM scores them), then a masked
        copy of each matched pair carrying the MLM and MPM targets. Masked rows are kept out of TIA:
        [MASK] tokens and zeroed patches would otherwise tell matched pairs apart, and masking a
        swapped attribute word would hide the very word that makes a pair mismatched."""
        idx = self.rng.choice(len(self.products), size=size, replace=len(self.products) < size)
        rows, labels, match, sources, texts, text_of = [], [], [], [], [], []
        masked_rows, masked_labels, masked_sources = [], [], []
        for i in idx:
            i = int(i)
            title = self.products[i].title
            negative = self.rng.random() < self.negative_ratio
            text, image, owner = self._negative(i) if negative else (title, i, i)
            row = self.encoder.row(text)
            rows.append(row)
            labels.append(np.full_like(row.input_ids, IGNORE_INDEX))
            match.append(0.0 if negative else 1.0)
            sources.append(image)
            texts.append(text)
            text_of.append(owner)
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
        aligned = self._aligned(text_of + masked_sources, texts + [self.products[i].title for i in masked_sources], sources + masked_sources)
        return Batch(
            **t, patches=inputs, match=torch.tensor(match + [1.0] * len(masked_rows)), mlm_labels=torch.from_numpy(mlm),
            patch_mask=patch_mask, patch_targets=targets, extra={"tia_rows": tia_rows}, aligned=aligned,
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
    query_embedding: np.ndarray | None = field(default=None, compare=False)  # the dual encoder's [D], for aligned models
    swapped_embedding: np.ndarray | None = field(default=None, compare=False)


def is_relevant(query: str, filters: Sequence[tuple[str, str]], product: Product, maker: QueryMaker, kind: str) -> bool:
    """Would `product` count as a right answer to the query (so it cannot be a negative)?"""
    if filters:
        return all(product_attribute(product, a).lower() == v for a, v in filters)
    if kind == "visual":
        return maker.visual(product.title) == query
    return product.title.strip().lower() == query.strip().lower()


def rows_for_groups(
    groups: Sequence[RerankGroup], products: Sequence[Product], patches: np.ndarray, encoder: PairEncoder,
    dual: DualEmbeddings | None = None,
) -> tuple[Batch, int]:
    """Rows for G groups: G * (1 + k) group rows (positive first in each group), then one row per
    KG-ITM swap. Returns the batch and k + 1. When every group carries first-stage scores they come
    as `extra["first_stage"]` (a swap row gets its positive's, so the prior cancels in the KG-ITM loss).
    With `dual` (aligned models), rows carry the query's, title's and image's embeddings."""
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
    which_arr = np.asarray(which)
    feats = torch.from_numpy(np.asarray(patches[which_arr], dtype=np.float32))
    aligned = None
    if dual is not None:
        if any(g.query_embedding is None or (g.swapped_query is not None and g.swapped_embedding is None) for g in groups):
            raise ValueError("aligned rows need the groups' query (and swapped query) embeddings: mine them with `dual`")
        query = [g.query_embedding for g in groups for _ in range(width)] + [g.swapped_embedding for g in swaps]
        titled = np.asarray([g.with_titles for g in groups for _ in range(width)] + [g.with_titles for g in swaps])
        titles = dual.titles[which_arr] * titled[:, None]
        aligned = torch.from_numpy(aligned_rows(np.stack(query), titles, dual.images[which_arr]))
    match = torch.zeros(len(rows))
    match[torch.arange(len(groups)) * width] = 1.0
    extra: dict = {"groups": len(groups), "swaps": len(swaps)}
    if all(len(g.first_stage) == width for g in groups):
        prior = [x for g in groups for x in g.first_stage] + [g.first_stage[0] for g in swaps]
        extra["first_stage"] = torch.tensor(prior, dtype=torch.float32)
    return Batch(**t, patches=feats, match=match, extra=extra, aligned=aligned), width


__all__ = ["NEGATIVE_KINDS", "QUERY_KINDS", "Batch", "DualEmbeddings", "PretrainSampler", "QueryMaker", "RerankGroup", "is_relevant", "rows_for_groups"]
