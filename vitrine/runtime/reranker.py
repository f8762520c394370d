"""The bundle's reranker on onnxruntime: scores (query, title, image patches) rows with the cross-encoder.

Rows are variable-length: each candidate's `[CLS] query [SEP] title [SEP]` is as long as its text, and a
batch of K candidates is padded only to its longest row (FashionBERT's VSL), then the patches follow.
An aligned reranker (`aligned_dim` > 0) also reads each row's dual-encoder embeddings (query, title,
image; `rerank_inputs.aligned_rows`). A reranker may read a coarser patch grid than the bundle's
image encoder gives (`source_grid`): finer patches are pooled to its grid here (`patch_grid.pool_patches`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from vitrine.errors import UserError
from vitrine.runtime.manifest import BundleManifest
from vitrine.runtime.patch_grid import pool_patches
from vitrine.runtime.rerank_inputs import ALIGNED_SLOTS, PairEncoder
from vitrine.runtime.session import make_session
from vitrine.scoring import add_prior

RERANKER_KEY = "reranker"  # the bundle manifest's field
INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask", "patches")
ALIGNED_INPUT = "aligned"  # [K, 3, D]: only in aligned rerankers' graphs
OUTPUT_NAME = "scores"


class RerankerSpec(BaseModel):
    """The bundle manifest's `reranker` entry."""

    model_config = ConfigDict(extra="allow", frozen=True)

    file: str
    tokenizer: str
    model: str = ""
    layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    max_query_tokens: int = Field(ge=1)
    max_title_tokens: int = Field(ge=0)
    patch_grid: tuple[int, int]
    patch_dim: int = Field(ge=1)
    source_grid: tuple[int, int] | None = None  # the image encoder's grid when the reranker pools it; None: patch_grid
    aligned_dim: int = Field(default=0, ge=0)  # > 0: rows carry the dual encoder's embeddings of this size
    default_top_n: int = Field(default=20, ge=1)
    # Rerank score = match logit + prior_weight x first-stage score (learned in fine-tuning; 0: logit alone).
    prior_weight: float = 0.0
    precision: str = "float32"  # or "int8": a dynamically quantized graph
    parity: dict[str, Any] = Field(default_factory=dict)

    @property
    def num_patches(self) -> int:
        return self.patch_grid[0] * self.patch_grid[1]

    @property
    def input_grid(self) -> tuple[int, int]:
        """The patch grid the reranker accepts from an index or an encoder (pooled to patch_grid)."""
        return tuple(self.source_grid) if self.source_grid is not None else tuple(self.patch_grid)

    @property
    def input_names(self) -> tuple[str, ...]:
        return INPUT_NAMES + ((ALIGNED_INPUT,) if self.aligned_dim else ())


def reranker_spec(manifest: BundleManifest | Mapping[str, Any]) -> RerankerSpec | None:
    """The reranker entry of a bundle manifest (a BundleManifest or its dict), None when absent."""
    extras = manifest if isinstance(manifest, Mapping) else (manifest.model_extra or {})
    raw = extras.get(RERANKER_KEY)
    if raw is None:
        return None
    try:
        return RerankerSpec.model_validate(raw)
    except Exception as exc:
        raise UserError(f"the bundle's reranker entry is invalid: {exc}") from exc


class Reranker:
    def __init__(self, session: Any, encoder: PairEncoder, spec: RerankerSpec) -> None:
        self.session, self.encoder, self.spec = session, encoder, spec
        names = [i.name for i in session.get_inputs()]
        if sorted(names) != sorted(spec.input_names):
            raise UserError(f"reranker graph inputs {names} != {list(spec.input_names)}")

    @classmethod
    def load(cls, bundle_dir: str | Path, spec: RerankerSpec, *, threads: int | None = None, device: str = "cpu") -> Reranker:
        bundle_dir = Path(bundle_dir)
        path = bundle_dir / spec.file
        if not path.is_file():
            raise UserError(f"reranker graph missing: {path}")
        encoder = PairEncoder.from_file(
            bundle_dir / spec.tokenizer, max_query_tokens=spec.max_query_tokens, max_title_tokens=spec.max_title_tokens
        )
        return cls(make_session(path, threads=threads, device=device), encoder, spec)

    @property
    def layers(self) -> int:
        return self.spec.layers

    @property
    def aligned(self) -> bool:
        return self.spec.aligned_dim > 0

    def model_patches(self, patches: np.ndarray) -> np.ndarray:
        """float32 patches on the reranker's own grid, from its grid or from `source_grid` (pooled)."""
        k = patches.shape[0]
        c = self.spec.patch_dim
        if patches.shape == (k, self.spec.num_patches, c):
            return np.ascontiguousarray(patches, dtype=np.float32)
        src = self.spec.input_grid
        if patches.shape == (k, src[0] * src[1], c):
            return pool_patches(patches, src, self.spec.patch_grid)
        raise UserError(f"patches must be {(k, self.spec.num_patches, c)} or {(k, src[0] * src[1], c)}, got {tuple(patches.shape)}")

    def score_pairs(
        self, queries: Sequence[str], titles: Sequence[str], patches: np.ndarray, *, pad_to: int | None = None,
        aligned: np.ndarray | None = None,
    ) -> np.ndarray:
        """float32 [K] match logits for K (query, title, patches) rows (and their [K, 3, D] dual-encoder
        embeddings for an aligned reranker). `pad_to` pads the text to a fixed width instead of the
        batch's longest row (only to measure what VSL saves)."""
        k = len(queries)
        if patches.ndim != 3 or patches.shape[0] != k:
            raise UserError(f"patches must be [{k}, P, {self.spec.patch_dim}], got {tuple(patches.shape)}")
        if self.aligned:
            expected = (k, len(ALIGNED_SLOTS), self.spec.aligned_dim)
            if aligned is None or aligned.shape != expected:
                raise UserError(f"this reranker reads the dual encoder's embeddings: aligned must be {expected}, "
                                f"got {None if aligned is None else tuple(aligned.shape)}")
        elif aligned is not None:
            aligned = None  # a plain reranker ignores them, so callers can always pass them
        if k == 0:
            return np.zeros(0, np.float32)
        feeds = self.encoder.batch(queries, titles, pad_to=pad_to)
        feeds["patches"] = self.model_patches(patches)
        if aligned is not None:
            feeds[ALIGNED_INPUT] = np.ascontiguousarray(aligned, dtype=np.float32)
        (scores,) = self.session.run([OUTPUT_NAME], feeds)
        assert scores.shape == (k,)
        return scores.astype(np.float32)

    def score(
        self, query: str, titles: Sequence[str], patches: np.ndarray, *, first_stage: np.ndarray | None = None,
        pad_to: int | None = None, aligned: np.ndarray | None = None,
    ) -> np.ndarray:
        """One query against K candidates (titles may be "" to score the image alone). With the
        candidates' `first_stage` scores, the rerank scores (logit + prior_weight x first stage);
        without, the cross-encoder's logits alone."""
        logits = self.score_pairs([query] * len(titles), titles, patches, pad_to=pad_to, aligned=aligned)
        return logits if first_stage is None else self.with_prior(logits, first_stage)

    @property
    def prior_weight(self) -> float:
        return float(self.spec.prior_weight)

    def with_prior(self, logits: np.ndarray, first_stage: np.ndarray) -> np.ndarray:
        """Rerank scores from match logits and the same candidates' first-stage scores."""
        return add_prior(logits, first_stage, self.spec.prior_weight)


def load_reranker(bundle_dir: str | Path, manifest: BundleManifest | Mapping[str, Any], *, threads: int | None = None, device: str = "cpu") -> Reranker | None:
    """The bundle's reranker, or None when the bundle carries none."""
    spec = reranker_spec(manifest)
    return None if spec is None else Reranker.load(bundle_dir, spec, threads=threads, device=device)


def rerank_order(first_stage: np.ndarray, rerank_scores: np.ndarray) -> np.ndarray:
    """Positions of the top-N first-stage candidates ordered by rerank score (stable on ties)."""
    assert first_stage.ndim == 1 and rerank_scores.shape == first_stage.shape
    return first_stage[np.argsort(-rerank_scores, kind="stable")]


__all__ = ["ALIGNED_INPUT", "Reranker", "RerankerSpec", "add_prior", "load_reranker", "rerank_order", "reranker_spec"]
