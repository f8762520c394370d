"""Reranking evaluation: the dual encoder's ranking, then the cross-encoder reordering its top N.

* Sample-protocol T2I (the same seeded queries and 100 same-subcategory negatives as `vitrine eval`):
  candidates are images, so the reranker reads (query, no title, patches).
* T2P shopper queries over the split: candidates are products, ranked by the α-fused score, and the
  reranker reads (query, title, patches).
* I2P (with `photos`): seeded shopper photos of products against every product by the α-fused score; the
  reranker reads (no query text, title, patches) with the photo's embedding in the query slot.
* TIA: the match classifier on (title, image) pairs against random texts, attribute-swapped texts and
  the dual encoder's hardest wrong titles; the dual encoder's own cosine AUC is reported beside it.

Aligned rerankers also read each row's dual-encoder embeddings (query, title, image); the evaluator
always passes them (`rerank_inputs.aligned_rows`), a plain reranker ignores them.

"reranked" orders the top N as the service does (match logit + the reranker's prior weight x the
first-stage score); "cross_only" by the match logit alone, to show what the cross-encoder adds.
With a `prior_grid`, "prior_sweep" reports T2I R@1 and T2P nDCG@10 for each candidate weight, from
the same logits: `best_prior_weight` picks one on a validation split.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from vitrine.catalog.product import Product
from vitrine.evaluation.protocols import index_distinct, recall_metrics, sample_query_products, sample_t2i_candidates
from vitrine.evaluation.queries import compose_shopper_queries, relevance_matrix
from vitrine.evaluation.ranking import ndcg_at_k, precision_at_k, rank_against_negatives, rank_of_positive, ranked_relevance
from vitrine.runtime.rerank_inputs import aligned_rows
from vitrine.scoring import add_prior, blend_product_vectors


class PairScorer(Protocol):
    def score(self, query: str, titles: Sequence[str], patches: np.ndarray, *, aligned: np.ndarray | None = None) -> np.ndarray: ...

    def score_pairs(
        self, queries: Sequence[str], titles: Sequence[str], patches: np.ndarray, *, aligned: np.ndarray | None = None
    ) -> np.ndarray: ...

    def with_prior(self, logits: np.ndarray, first_stage: np.ndarray) -> np.ndarray: ...


def reranked_rank(first_scores: np.ndarray, rerank_scores: np.ndarray, top: np.ndarray, positive: int) -> int:
    """0-based rank of candidate `positive` once the `top` candidates are reordered by `rerank_scores`
    (ties count against it, as in the first stage)."""
    hit = np.flatnonzero(top == positive)
    if hit.size == 0:
        return int((first_scores >= first_scores[positive]).sum() - 1)
    mine = rerank_scores[hit[0]]
    return int((rerank_scores >= mine).sum() - 1)


def top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n highest scores, best first."""
    n = min(n, scores.shape[0])
    part = np.argpartition(-scores, n - 1)[:n]
    return part[np.argsort(-scores[part], kind="stable")]


def binary_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive outscores a negative), ties counting half (Mann-Whitney U from average ranks)."""
    from scipy.stats import rankdata  # only the rerank evaluation needs scipy

    ranks = rankdata(np.concatenate([positive, negative]), method="average")
    u = ranks[: positive.size].sum() - positive.size * (positive.size + 1) / 2
    return float(u / (positive.size * negative.size))


def best_prior_weight(sweep: dict[str, Any]) -> float:
    """The weight of a `prior_sweep` with the best T2I R@1 + T2P nDCG@10; ties go to the larger
    weight (closer to the first stage's order)."""
    weights = sweep["weights"]
    t2i, t2p = sweep["t2i_R@1"], sweep.get("t2p_nDCG@10") or [0.0] * len(weights)
    assert len(t2i) == len(weights) == len(t2p)
    return max(zip(weights, t2i, t2p), key=lambda x: (x[1] + x[2], x[0]))[0]


class RerankEvaluator:
    def __init__(
        self,
        *,
        top_n: int = 20,
        num_queries: int = 1000,
        num_negatives: int = 100,
        t2p_queries: int = 500,
        tia_pairs: int = 1000,
        alpha_t2p: float = 0.5,
        seed: int = 0,
        prior_grid: Sequence[float] = (),
        progress: bool = True,
    ) -> None:
        if top_n < 1:
            raise ValueError("top_n must be >= 1")
        if any(w < 0 for w in prior_grid):
            raise ValueError("prior weights must be >= 0")
        self.prior_grid = tuple(float(w) for w in prior_grid)
        self.top_n, self.num_queries, self.num_negatives = top_n, num_queries, num_negatives
        self.t2p_queries, self.tia_pairs, self.alpha_t2p = t2p_queries, tia_pairs, alpha_t2p
        self.seed, self.progress = seed, progress

    def __call__(
        self,
        reranker: PairScorer,
        products: Sequence[Product],
        title_embs: np.ndarray,
        image_embs: np.ndarray,
        patches: np.ndarray,
        encode_texts: Callable[[list[str]], np.ndarray],
        *,
        swap: Callable[[str], str | None] | None = None,
        photos: tuple[np.ndarray, np.ndarray, float] | None = None,
    ) -> dict[str, Any]:
        """`photos`: (photo embeddings [Q, D], the product row each photographs [Q], α for image queries)."""
        n = len(products)
        assert title_embs.shape[0] == n and image_embs.shape == title_embs.shape and patches.shape[0] == n
        report: dict[str, Any] = {"top_n": self.top_n, "products": n}
        started = time.perf_counter()
        report["t2i_sample"] = self.sample_t2i(reranker, products, title_embs, image_embs, patches)
        report["t2p"] = self.t2p(reranker, products, title_embs, image_embs, patches, encode_texts)
        if photos is not None:
            report["i2p"] = self.i2p(reranker, products, title_embs, image_embs, patches, *photos)
        report["tia"] = self.tia(reranker, products, title_embs, image_embs, patches, encode_texts, swap)
        sweep = {"t2i_R@1": report["t2i_sample"].pop("prior_sweep"), "t2p_nDCG@10": report["t2p"].pop("prior_sweep", None)}
        if self.prior_grid:
            report["prior_sweep"] = {"weights": list(self.prior_grid), **sweep}
        report["seconds"] = round(time.perf_counter() - started, 1)
        return report

    def sample_t2i(self, reranker, products, title_embs, image_embs, patches) -> dict[str, Any]:
        titles = [p.title.strip() for p in products]  # as `vitrine eval` reads them
        texts, text_of_product = index_distinct(titles)
        groups = [p.subcategory for p in products]
        if len(products) < 2:
            raise ValueError("the sample protocol needs at least 2 products")
        queries = sample_query_products(len(products), self.num_queries, self.seed)
        sampled = sample_t2i_candidates(text_of_product, groups, queries, self.num_negatives, self.seed)
        before, after, alone, seconds = [], [], [], []
        swept: list[list[int]] = [[] for _ in self.prior_grid]
        for q, pos, negs in tqdm(zip(queries, sampled.positives, sampled.negatives), total=len(queries), desc="rerank t2i", disable=not self.progress):
            negs = negs[negs >= 0]
            cands = np.concatenate([[pos], negs])
            first = image_embs[cands] @ title_embs[q]
            before.append(int(rank_against_negatives(first[:1], first[None, 1:])[0]))
            top = top_n(first, self.top_n)
            t0 = time.perf_counter()
            aligned = aligned_rows(title_embs[q], None, image_embs[cands[top]])
            logits = reranker.score(titles[q], [""] * top.size, patches[cands[top]], aligned=aligned)
            scores = reranker.with_prior(logits, first[top])
            seconds.append(time.perf_counter() - t0)
            after.append(reranked_rank(first, scores, top, 0))
            alone.append(reranked_rank(first, logits, top, 0))
            for ranks, w in zip(swept, self.prior_grid):
                ranks.append(reranked_rank(first, add_prior(logits, first[top], w), top, 0))
        return {
            "prior_sweep": [recall_metrics(np.array(r))["R@1"] for r in swept],
            "dual_encoder": recall_metrics(np.array(before)),
            "reranked": recall_metrics(np.array(after)),
            "cross_only": recall_metrics(np.array(alone)),
            "queries": len(queries),
            "candidates_per_query": 1 + self.num_negatives,
            "rerank_ms_p50": round(1000 * float(np.median(seconds)), 2),
        }

    def t2p(self, reranker, products, title_embs, image_embs, patches, encode_texts) -> dict[str, Any]:
        queries = compose_shopper_queries(products, self.t2p_queries, self.seed)
        if not queries:
            return {"skipped": "no shopper queries"}
        relevant = relevance_matrix(queries, products)
        q_embs = encode_texts([q.text for q in queries])
        fused = blend_product_vectors(title_embs, image_embs, self.alpha_t2p)
        first = q_embs @ fused.T
        reranked, alone = first.copy(), first.copy()
        swept = [first.copy() for _ in self.prior_grid]
        for i, query in enumerate(tqdm(queries, desc="rerank t2p", disable=not self.progress)):
            top = top_n(first[i], self.top_n)
            aligned = aligned_rows(q_embs[i], title_embs[top], image_embs[top])
            logits = reranker.score(query.text, [products[j].title for j in top], patches[top], aligned=aligned)
            tables = [(reranked, reranker.with_prior(logits, first[i, top])), (alone, logits)]
            tables += [(table, add_prior(logits, first[i, top], w)) for table, w in zip(swept, self.prior_grid)]
            for table, scores in tables:  # reranked candidates stay above the rest, in rerank order
                table[i, top] = first[i].max() + 1.0 + (scores - scores.min())
        n_rel = relevant.sum(1)
        out: dict[str, Any] = {}
        if self.prior_grid:
            out["prior_sweep"] = [float(ndcg_at_k(ranked_relevance(t, relevant, 10), n_rel, 10).mean()) for t in swept]
        for name, scores in (("dual_encoder", first), ("reranked", reranked), ("cross_only", alone)):
            hits = ranked_relevance(scores, relevant, 10)
            out[name] = {
                "P@1": float(precision_at_k(hits, 1).mean()),
                "P@10": float(precision_at_k(hits, 10).mean()),
                "nDCG@10": float(ndcg_at_k(hits, n_rel, 10).mean()),
            }
        out.update(queries=len(queries), alpha=self.alpha_t2p)
        return out

    def i2p(self, reranker, products, title_embs, image_embs, patches, photo_embs, targets, alpha) -> dict[str, Any]:
        assert photo_embs.shape == (targets.shape[0], title_embs.shape[1]), (photo_embs.shape, targets.shape)
        first = photo_embs @ blend_product_vectors(title_embs, image_embs, alpha).T
        before = rank_of_positive(first, targets)  # as `vitrine eval`'s I2P ranks them
        after, alone = [], []
        swept: list[list[int]] = [[] for _ in self.prior_grid]
        for i, target in enumerate(tqdm(targets, desc="rerank i2p", disable=not self.progress)):
            top = top_n(first[i], self.top_n)
            aligned = aligned_rows(photo_embs[i], title_embs[top], image_embs[top])
            logits = reranker.score("", [products[j].title for j in top], patches[top], aligned=aligned)
            after.append(reranked_rank(first[i], reranker.with_prior(logits, first[i, top]), top, int(target)))
            alone.append(reranked_rank(first[i], logits, top, int(target)))
            for ranks, w in zip(swept, self.prior_grid):
                ranks.append(reranked_rank(first[i], add_prior(logits, first[i, top], w), top, int(target)))
        out = {"dual_encoder": recall_metrics(before), "reranked": recall_metrics(np.array(after)),
               "cross_only": recall_metrics(np.array(alone)), "queries": int(targets.shape[0]), "alpha": alpha}
        if self.prior_grid:
            out["prior_sweep_R@1"] = [recall_metrics(np.array(r))["R@1"] for r in swept]
        return out

    @staticmethod
    def _score_rows(reranker, texts: list[str], text_embs: np.ndarray, image_embs: np.ndarray, patches: np.ndarray, chunk: int = 64) -> np.ndarray:
        """(text, no title, patches) rows scored in batches: each row is its own query."""
        return np.concatenate([
            reranker.score_pairs(texts[s : s + chunk], [""] * len(texts[s : s + chunk]), patches[s : s + chunk],
                                 aligned=aligned_rows(text_embs[s : s + chunk], None, image_embs[s : s + chunk]))
            for s in range(0, len(texts), chunk)
        ])

    def tia(self, reranker, products, title_embs, image_embs, patches, encode_texts, swap) -> dict[str, Any]:
        """Match accuracy (logit > 0) and AUC of (title, image) pairs against mismatched texts: random
        titles, attribute swaps, and `hard` (for each image the dual encoder's top-ranked title of a
        product with another title). `dual_encoder_auc`: the first stage's cosine on the same pairs."""
        rng = np.random.default_rng([self.seed, 37])
        picks = rng.choice(len(products), size=min(self.tia_pairs, len(products)), replace=False)
        titles = [products[i].title for i in picks]
        pos = self._score_rows(reranker, titles, title_embs[picks], image_embs[picks], patches[picks])
        pos_cos = (title_embs[picks] * image_embs[picks]).sum(1)
        out: dict[str, Any] = {"pairs": int(picks.size)}
        # Each kind: its texts and, when they are products' titles, those products' rows (their stored
        # embeddings are reused); made-up texts (swaps) go through the text encoder.
        lowered = np.array([p.title.strip().lower() for p in products])
        sims = image_embs[picks] @ title_embs.T
        sims[lowered[None, :] == lowered[picks][:, None]] = -np.inf
        kinds: dict[str, tuple[list[str], np.ndarray | None]] = {}
        for kind, rows in (("random", rng.permutation(len(products))[: picks.size]), ("hard", sims.argmax(1))):
            kinds[kind] = ([products[int(j)].title for j in rows], rows)
        if swap is not None:
            kinds["attribute_swap"] = ([swap(t) for t in titles], None)
        for kind in ("random", "attribute_swap", "hard"):  # the report's order
            if kind not in kinds:
                continue
            texts, rows = kinds[kind]
            keep = [k for k, t in enumerate(texts) if t and t != titles[k]]
            kept = [texts[k] for k in keep]
            if rows is not None:
                embs = title_embs[rows[keep]]
            else:
                embs = encode_texts(kept) if kept else np.zeros((0, title_embs.shape[1]), np.float32)
            neg = self._score_rows(reranker, kept, embs, image_embs[picks[keep]], patches[picks[keep]])
            p = pos[keep]
            out[kind] = {
                "accuracy": float(((p > 0).sum() + (neg <= 0).sum()) / (2 * len(keep))),
                "auc": binary_auc(p, neg),
                "dual_encoder_auc": binary_auc(pos_cos[keep], (embs * image_embs[picks[keep]]).sum(1)),
                "negatives": len(keep),
            }
        return out


__all__ = ["RerankEvaluator", "best_prior_weight", "binary_auc", "reranked_rank", "top_n"]
