"""Attribute backfill (KG-FLIP §5): heads that predict a product's attributes from its embeddings.

- `heads`: the numpy heads (linear softmax per attribute, with a fitted temperature), saved as npz + json;
  prediction needs numpy only, so the indexer and the service can apply them.
- `calibration`: temperature scaling, NLL and expected calibration error.
- `metrics`: recall at a precision (KG-FLIP's R@P90), accuracy.
- `train`: fitting the heads on embeddings (scikit-learn's multinomial logistic regression, imported lazily).
- `data`: which products have which attribute values, per split, and their embedding features.
"""
from __future__ import annotations

ATTRIBUTE_FIELDS = ("baseColour", "articleType", "gender", "usage", "season")
VIEWS = ("image", "title", "both")  # which embeddings a head reads: [image], [title] or [image; title]
