"""From a training checkpoint to a model bundle: rebuild the model, then export it."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from trainer.export import export_bundle
from trainer.factory import create_model_and_transforms, get_tokenizer
from vitrine.catalog import read_catalog

log = logging.getLogger(__name__)

PARITY_SAMPLES = 16


def load_checkpoint_model(path: Path, *, device: str = "cpu"):
    """(model, preprocess_val, tokenizer, checkpoint) with the checkpoint's weights loaded."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model, _, preprocess_val = create_model_and_transforms(
        ckpt["model_name"], ckpt.get("pretrained"), pruning=ckpt.get("pruning", False),
        device=device, **ckpt.get("model_overrides", {}),
    )
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, preprocess_val, get_tokenizer(ckpt["model_name"]), ckpt


def export_checkpoint(
    path: Path, out: Path, *, catalog: str | None = None, prune_at_inference: bool | None = None
) -> Path:
    model, _, tokenizer, ckpt = load_checkpoint_model(path)
    pruning = ckpt.get("pruning", False)
    if pruning:
        keep = ckpt.get("prune_at_inference", True) if prune_at_inference is None else prune_at_inference
        model.set_pruning(keep)
    check_texts, check_images = None, None
    if catalog:
        products = read_catalog(catalog).by_split("val")[:PARITY_SAMPLES]
        check_texts = [p.title for p in products]
        check_images = [p.image.open() for p in products]
    manifest = {
        "training": {
            "checkpoint": str(path),
            "data_fingerprint": ckpt.get("data_fingerprint"),
            "epoch": ckpt.get("epoch"),
            "config": ckpt.get("config"),
        },
        "val_metrics": ckpt.get("val"),
        **alphas_of(path, ckpt),
        "pruning": {"trained": pruning, "at_inference": bool(pruning and model_pruning_enabled(model))},
    }
    return export_bundle(model, tokenizer, out, manifest=manifest, check_texts=check_texts, check_images=check_images,
                         name=ckpt["model_name"])


def alphas_of(path: Path, ckpt: dict) -> dict:
    """The tuned α (joint, text queries, photo queries); older checkpoints keep them in summary.json."""
    found = {k: ckpt[k] for k in ("alpha", "alpha_t2p", "alpha_i2p") if ckpt.get(k) is not None}
    summary = path.parent / "summary.json"
    if len(found) < 3 and summary.is_file():
        tuned = json.loads(summary.read_text()).get("alpha", {})
        found = {k: tuned[k] for k in ("alpha", "alpha_t2p", "alpha_i2p") if k in tuned} | found
    return found


def model_pruning_enabled(model) -> bool:
    return bool(getattr(model, "pruning_enabled", False))
