"""Scoring heads on a split: accuracy, NLL and ECE before / after temperature scaling, R@P90."""
from __future__ import annotations

from typing import Any

import numpy as np

from vitrine.attributes.calibration import expected_calibration_error, nll, softmax
from vitrine.attributes.data import AttributeData
from vitrine.attributes.heads import AttributeHeads
from vitrine.attributes.metrics import KG_FLIP_PRECISION, recall_at_precision
from vitrine.attributes.train import label_codes


def evaluate_heads(heads: AttributeHeads, data: AttributeData, *, min_precision: float = KG_FLIP_PRECISION) -> dict[str, dict[str, Any]]:
    """field -> metrics over data's products that have a value for that field."""
    features = heads.features(data.title, data.image)
    out: dict[str, dict[str, Any]] = {}
    for name, head in heads.heads.items():
        has = data.values[name] != ""
        codes = label_codes(head.classes, data.values[name][has])
        logits = head.logits(features[has])
        seen = codes >= 0
        row: dict[str, Any] = {"products": int(has.sum()), "unseen_values": int((~seen).sum()), "temperature": round(head.temperature, 4)}
        for tag, temperature in (("raw", 1.0), ("calibrated", head.temperature)):
            proba = softmax(logits, temperature)
            best = proba.argmax(axis=1)
            confidence = proba[np.arange(best.size), best]
            correct = best == codes
            row[tag] = {
                "accuracy": round(float(correct.mean()), 4) if correct.size else None,
                "nll": round(nll(logits[seen], codes[seen], temperature), 4),
                "ece": round(expected_calibration_error(confidence, correct), 4),
                f"r@p{round(min_precision * 100)}": recall_at_precision(confidence, correct, min_precision).to_dict(),
            }
        out[name] = row
    return out
