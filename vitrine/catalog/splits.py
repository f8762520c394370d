"""Deterministic splits for products whose catalog gives none (the real Kaggle download has no split).

A product's split is a function of its id alone: sha256(id) modulo 100 -> train (80 %), val (10 %),
test (10 %). It never changes when rows are added, removed or reordered, so a model trained on
`train` is never evaluated on its own training products after the catalog grows.
"""
from __future__ import annotations

import hashlib

HASHED_SHARES = (("train", 80), ("val", 10), ("test", 10))
HASHED_SPLITS_NOTE = "splits assigned by hashed product id (train 80 %, val 10 %, test 10 %)"


def hashed_split(product_id: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(product_id.encode("utf-8", "surrogatepass")).digest()[:8], "big") % 100
    for name, share in HASHED_SHARES:
        if bucket < share:
            return name
        bucket -= share
    raise AssertionError("shares must sum to 100")
