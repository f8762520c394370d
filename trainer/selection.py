"""Model selection on val, shared by both trainers: the validation metrics and the score that picks
the best epoch, α per query kind, and atomic checkpoints with resume.

Both run the evaluator objects of `vitrine.evaluation`, the same ones `vitrine eval` runs on a bundle.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitrine.catalog.product import Product
from vitrine.evaluation.evaluator import (
    FullRetrievalEvaluator,
    ImageToProductEvaluator,
    SampleRetrievalEvaluator,
    TextToProductEvaluator,
)
from vitrine.evaluation.protocols import RetrievalSet
from vitrine.protocols import Encoder

log = logging.getLogger(__name__)

ALPHA_GRID = tuple(round(a, 2) for a in np.linspace(0.0, 1.0, 11))


@dataclass
class ValidationEvaluators:
    """The evaluator objects a trainer validates and tunes α with, built once per run."""

    sample: SampleRetrievalEvaluator
    full: FullRetrievalEvaluator
    t2p: TextToProductEvaluator
    i2p: ImageToProductEvaluator

    @classmethod
    def for_val(cls, *, queries: int, seed: int, num_t2p: int = 500, num_i2p: int = 500,
                progress: bool = False) -> ValidationEvaluators:  # fmt: skip
        return cls(SampleRetrievalEvaluator(queries, seed=seed), FullRetrievalEvaluator(),
                   TextToProductEvaluator(num_t2p, seed=seed, progress=progress),
                   ImageToProductEvaluator(num_i2p, seed=seed, progress=progress))  # fmt: skip


def validation_metrics(evaluators: ValidationEvaluators, encoder: Encoder, products: Sequence[Product],
                       data: RetrievalSet) -> dict:  # fmt: skip
    """Sample and full retrieval on val, and `score`: the mean of the three headline numbers
    (sample T2I R@1, sample I2T R@1, full T2I R@10), which picks the best epoch."""
    sample = evaluators.sample(encoder, products, data)
    full = evaluators.full(encoder, products, data)
    metrics = {
        "sample_t2i_R@1": sample["t2i"]["R@1"], "sample_i2t_R@1": sample["i2t"]["R@1"],
        "sample_t2i_R@10": sample["t2i"]["R@10"], "sample_i2t_R@10": sample["i2t"]["R@10"],
        "full_t2i_R@10": full["t2i"]["R@10"], "full_i2t_R@10": full["i2t"]["R@10"],
    }  # fmt: skip
    metrics["score"] = (metrics["sample_t2i_R@1"] + metrics["sample_i2t_R@1"] + metrics["full_t2i_R@10"]) / 3
    return metrics


def pick_alphas(evaluators: ValidationEvaluators, encoder: Encoder, products: Sequence[Product],
                data: RetrievalSet) -> dict:  # fmt: skip
    """α on val: per query kind (T2P nDCG@10 for text, I2P R@1 for photos) and jointly (their mean)."""
    t2p = evaluators.t2p.sweep(encoder, products, data, ALPHA_GRID)
    i2p = evaluators.i2p.sweep(encoder, products, data, ALPHA_GRID)
    sweep = [{"alpha": alpha, "t2p_nDCG@10": t["nDCG@10"], "i2p_R@1": i["R@1"], "score": (t["nDCG@10"] + i["R@1"]) / 2}
             for alpha, t, i in zip(ALPHA_GRID, t2p, i2p)]  # fmt: skip
    return {"alpha": max(sweep, key=lambda r: r["score"])["alpha"], "sweep": sweep,
            "alpha_t2p": max(sweep, key=lambda r: r["t2p_nDCG@10"])["alpha"],
            "alpha_i2p": max(sweep, key=lambda r: r["i2p_R@1"])["alpha"]}  # fmt: skip


def save_checkpoint(path: Path, state: dict) -> Path:
    """torch.save to a temporary file, then rename: a killed run never leaves a half-written checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def resume_state(path: Path, device: torch.device, model, optimizer, scheduler) -> dict | None:
    """Load `path` (last.pt) into model, optimizer and scheduler; the checkpoint, or None when absent."""
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    log.info("resumed from %s at epoch %d", path, ckpt["epoch"])
    return ckpt
