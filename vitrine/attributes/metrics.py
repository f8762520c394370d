"""KG-FLIP's deployment metric: recall at 90 % precision.

A head answers for the products it is most confident about and abstains on the rest. Ranking
predictions by confidence, the threshold is set as low as it can go while the answered ones stay
at least `min_precision` correct; recall is the correct answers over all products, coverage the
answered share. Cuts fall only between different confidences, so tied predictions are answered
or withheld together, as a threshold would.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

KG_FLIP_PRECISION = 0.9


@dataclass(frozen=True)
class RecallAtPrecision:
    recall: float  # correct answers / all products
    coverage: float  # answered / all products
    precision: float  # correct / answered (>= the target, or 0 when nothing is answered)
    threshold: float | None  # answer when confidence >= this; None: answer nothing
    count: int  # all products

    def to_dict(self) -> dict:
        return asdict(self)


def recall_at_precision(confidence: np.ndarray, correct: np.ndarray, min_precision: float = KG_FLIP_PRECISION) -> RecallAtPrecision:
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, bool)
    if confidence.shape != correct.shape or confidence.ndim != 1:
        raise ValueError(f"confidence {confidence.shape} and correct {correct.shape} must be equal 1-d shapes")
    n = confidence.size
    if n == 0:
        return RecallAtPrecision(0.0, 0.0, 0.0, None, 0)
    order = np.argsort(-confidence, kind="stable")
    ranked = confidence[order]
    hits = np.cumsum(correct[order])
    answered = np.arange(1, n + 1)
    ends_tie_group = np.append(ranked[1:] != ranked[:-1], True)
    ok = ends_tie_group & (hits >= min_precision * answered - 1e-12)
    if not ok.any():
        return RecallAtPrecision(0.0, 0.0, 0.0, None, n)
    cut = int(np.flatnonzero(ok)[-1])
    return RecallAtPrecision(
        recall=float(hits[cut] / n),
        coverage=float((cut + 1) / n),
        precision=float(hits[cut] / (cut + 1)),
        threshold=float(ranked[cut]),
        count=n,
    )
