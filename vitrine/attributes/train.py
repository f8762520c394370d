"""Fitting attribute heads: multinomial logistic regression per attribute (`softmax.fit_softmax`),
C chosen on val, then a temperature fitted on val, and the confidence floors val gives per precision."""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from vitrine.attributes.calibration import fit_temperature, nll
from vitrine.attributes.data import AttributeData
from vitrine.attributes.heads import AttributeHead, AttributeHeads, view_features
from vitrine.attributes.metrics import recall_at_precision
from vitrine.attributes.softmax import fit_softmax
from vitrine.errors import UserError

log = logging.getLogger(__name__)

# Inverse L2 strength. The vectors are unit length, so weak regularisation wins: C=1 lost to C=10 on
# val for every attribute tried on the shared catalog, and each fit costs minutes on the shared machine.
C_GRID = (10.0, 100.0)


def label_codes(classes: Sequence[str], values: np.ndarray) -> np.ndarray:
    """Index of each value in `classes`; -1 for a value the head never saw."""
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup.get(v, -1) for v in values], dtype=np.int64)


def fit_head(field: str, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
             *, c_grid: Sequence[float] = C_GRID) -> AttributeHead:  # fmt: skip
    """The head with the best val accuracy over `c_grid` (ties: the smaller C), temperature fitted on val."""
    has_train, has_val = y_train != "", y_val != ""
    classes = sorted(set(y_train[has_train].tolist()))
    if len(classes) < 2:
        raise UserError(f"{field}: the train split has {len(classes)} distinct value(s); a head needs at least 2")
    x_train, y_train, x_val, y_val = x_train[has_train], y_train[has_train], x_val[has_val], y_val[has_val]
    val_codes = label_codes(classes, y_val)
    train_codes = label_codes(classes, y_train)
    best: tuple[float, AttributeHead] | None = None
    for c in sorted(c_grid):
        start = time.perf_counter()
        weight, bias, iterations = fit_softmax(x_train, train_codes, len(classes), C=c)
        head = AttributeHead(field, classes, weight, bias)
        accuracy = float((head.logits(x_val).argmax(axis=1) == val_codes).mean()) if len(y_val) else 0.0
        log.info("%s C=%g: val accuracy %.4f (%.1f s)", field, c, accuracy, time.perf_counter() - start)
        if best is None or accuracy > best[0]:
            best = (accuracy, head)
            head.info = {"C": c, "val_accuracy": round(accuracy, 4), "train_products": len(y_train),
                         "iterations": iterations}  # fmt: skip
    _, head = best
    seen = val_codes >= 0  # a value train never had has no logit: NLL cannot score it
    logits = head.logits(x_val[seen])
    head.temperature = fit_temperature(logits, val_codes[seen])
    head.info.update(val_nll=round(nll(logits, val_codes[seen]), 4),
                     val_nll_calibrated=round(nll(logits, val_codes[seen], head.temperature), 4))  # fmt: skip
    # The confidence floor that kept val's answers >= 90 % right: what `predict --min-precision 0.9` applies.
    _, confidence = head.predict(x_val)
    correct = head.logits(x_val).argmax(axis=1) == val_codes
    head.info["val_thresholds"] = {
        str(p): recall_at_precision(confidence, correct, p).threshold for p in (0.8, 0.9, 0.95)
    }
    return head


def train_heads(data: AttributeData, *, view: str, fields: Sequence[str], bundle_fingerprint: str,
                c_grid: Sequence[float] = C_GRID) -> AttributeHeads:  # fmt: skip
    """Heads for `fields` on `view`, fitted on data's train split and chosen and calibrated on val."""
    train, val = data.split("train"), data.split("val")
    x_train = view_features(view, train.title, train.image)
    x_val = view_features(view, val.title, val.image)
    heads = {f: fit_head(f, x_train, train.values[f], x_val, val.values[f], c_grid=c_grid) for f in fields}
    return AttributeHeads(view=view, embed_dim=int(data.title.shape[1]), bundle_fingerprint=bundle_fingerprint, heads=heads)
