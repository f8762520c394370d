"""Attribute heads as plain arrays: per attribute a linear softmax layer and a temperature.

Saved as `heads.npz` (weights) + `heads.json` (classes, temperatures, what they were trained on),
a few hundred KB, and applied with numpy alone: the indexer backfills with them, no torch, no
scikit-learn.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitrine.attributes import VIEWS
from vitrine.attributes.calibration import softmax
from vitrine.errors import UserError

HEADS_FORMAT = "vitrine-attribute-heads"
HEADS_JSON = "heads.json"
HEADS_NPZ = "heads.npz"


def view_features(view: str, title: np.ndarray, image: np.ndarray) -> np.ndarray:
    """What a head of `view` reads: the image vectors, the title vectors, or both side by side."""
    if view == "image":
        return np.asarray(image, np.float32)
    if view == "title":
        return np.asarray(title, np.float32)
    if view == "both":
        return np.hstack([np.asarray(image, np.float32), np.asarray(title, np.float32)])
    raise ValueError(f"unknown view {view!r}; expected one of {', '.join(VIEWS)}")


@dataclass
class AttributeHead:
    """softmax((x @ weight + bias) / temperature) over `classes`."""

    field: str
    classes: list[str]
    weight: np.ndarray  # (D, K) float32
    bias: np.ndarray  # (K,) float32
    temperature: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)  # C, val accuracy, ... (reported, not used)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, np.float64) @ self.weight.astype(np.float64) + self.bias.astype(np.float64)

    def proba(self, features: np.ndarray, *, calibrated: bool = True) -> np.ndarray:
        return softmax(self.logits(features), self.temperature if calibrated else 1.0)

    def predict(self, features: np.ndarray, *, calibrated: bool = True) -> tuple[list[str], np.ndarray]:
        """(predicted value, its confidence) per row."""
        proba = self.proba(features, calibrated=calibrated)
        best = proba.argmax(axis=1)
        return [self.classes[i] for i in best], proba[np.arange(len(best)), best]


@dataclass
class AttributeHeads:
    """One head per attribute over one view of a bundle's embeddings."""

    view: str
    embed_dim: int  # of one tower; a "both" head reads 2 * embed_dim
    bundle_fingerprint: str
    heads: dict[str, AttributeHead]

    @property
    def fields(self) -> list[str]:
        return list(self.heads)

    def features(self, title: np.ndarray, image: np.ndarray) -> np.ndarray:
        for name, vectors in (("title", title), ("image", image)):
            if np.asarray(vectors).ndim != 2 or np.asarray(vectors).shape[1] != self.embed_dim:
                raise UserError(f"the heads read {self.embed_dim}-d {name} vectors, got shape {np.asarray(vectors).shape}")
        return view_features(self.view, title, image)

    def predict(self, title: np.ndarray, image: np.ndarray) -> dict[str, tuple[list[str], np.ndarray]]:
        """field -> (values, calibrated confidences), one per row of the vectors."""
        features = self.features(title, image)
        return {name: head.predict(features) for name, head in self.heads.items()}

    # ------------------------------------------------------------ files

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for name, head in self.heads.items():
            arrays[f"{name}.weight"] = head.weight.astype(np.float32)
            arrays[f"{name}.bias"] = head.bias.astype(np.float32)
        np.savez(folder / HEADS_NPZ, **arrays)
        meta = {
            "format": HEADS_FORMAT,
            "view": self.view,
            "embed_dim": self.embed_dim,
            "bundle_fingerprint": self.bundle_fingerprint,
            "heads": {
                name: {"classes": head.classes, "temperature": head.temperature, "info": head.info}
                for name, head in self.heads.items()
            },
        }
        (folder / HEADS_JSON).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> AttributeHeads:
        folder = Path(folder)
        meta_path, npz_path = folder / HEADS_JSON, folder / HEADS_NPZ
        if not meta_path.is_file() or not npz_path.is_file():
            raise UserError(f"{folder}: no attribute heads ({HEADS_JSON} + {HEADS_NPZ}); train them with `vitrine attributes train`")
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != HEADS_FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}")
            with np.load(npz_path) as arrays:
                heads = {
                    name: AttributeHead(
                        field=name, classes=list(spec["classes"]), weight=arrays[f"{name}.weight"],
                        bias=arrays[f"{name}.bias"], temperature=float(spec["temperature"]), info=dict(spec.get("info", {})),
                    )
                    for name, spec in meta["heads"].items()
                }  # fmt: skip
            return cls(view=meta["view"], embed_dim=int(meta["embed_dim"]), bundle_fingerprint=meta["bundle_fingerprint"], heads=heads)
        except (KeyError, ValueError, TypeError, OSError) as exc:
            raise UserError(f"{folder}: unreadable attribute heads ({exc})") from exc
