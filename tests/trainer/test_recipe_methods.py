"""FashionKLIP CVA and MML-TP in the cached-token recipe (tiny-ap on a tiny catalog), and their helpers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.support.catalogs import make_training_catalog
from trainer.bundle import export_checkpoint
from trainer.pruning import PruningGate, calibrate_thresholds, pruned_token_report
from trainer.train import TrainConfig, train
from vitrine.errors import UserError
from vitrine.runtime import load_bundle

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return make_training_catalog(tmp_path_factory.mktemp("catalog"))


def config(catalog, out, **kw) -> TrainConfig:
    base = dict(catalog=str(catalog), out=str(out), model="tiny-ap", pretrained="none", epochs=3, batch_size=8,
                val_queries=12, val_every=1, lr=3e-3, text_lr=1e-3, warmup_steps=1, cache_dir=str(out / "cache"),
                progress=False)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_calibration_puts_each_threshold_at_its_quantile():
    gate = PruningGate(0.01, temperature=1e-4).eval()
    gate.enabled = True
    probs = torch.softmax(torch.randn(4, 2, 6, 6), dim=-1)
    real = torch.ones(4, 6, dtype=torch.long)
    real[0, 4:] = 0
    taus = calibrate_thresholds([gate], lambda: gate(torch.randn(4, 6, 3), probs), real, 0.25)
    importance = probs[:, :, :, 0].mean(dim=1)
    candidates = real.bool()
    candidates[:, 0] = False
    assert taus[0] == pytest.approx(float(torch.quantile(importance[candidates], 0.25)))
    _, mask = gate(torch.randn(4, 6, 3), probs)
    share = float((mask[candidates] == 0).float().mean())
    assert 0.15 <= share <= 0.3  # about the quantile's share is pruned (ties and steps aside)
    with pytest.raises(ValueError, match="quantile"):
        calibrate_thresholds([gate], lambda: None, real, 1.0)


def test_pruned_token_report_counts_layers_and_words():
    ids = torch.tensor([[101, 7, 8, 9, 0], [101, 7, 9, 0, 0]])
    real = (ids != 0).long()
    first = torch.tensor([[1.0, 0, 1, 1, 1], [1, 0, 1, 1, 1]])  # prunes token 7 everywhere
    second = torch.tensor([[1.0, 1, 0, 1, 1], [1, 1, 1, 1, 1]])  # and token 8 once
    report = pruned_token_report(ids, real, [first, second], str, min_count=1)
    assert report["tokens"] == 5
    assert [round(x["pruned_share"], 2) for x in report["layers"]] == [0.4, 0.2]
    assert [round(x["pruned_so_far"], 2) for x in report["layers"]] == [0.4, 0.6]
    assert [(w["token"], w["share"]) for w in report["most_pruned"][:2]] == [("7", 1.0), ("8", 1.0)]
    assert report["most_pruned"][-1] == {"token": "9", "pruned": 0, "seen": 2, "share": 0.0}


def test_recipe_with_cva_refreshes_prototypes_after_its_warm_up(catalog, tmp_path):
    summary = train(config(catalog, tmp_path / "run", cva=True, cva_weight=0.5, cva_warmup=1, cva_topk=8,
                           cva_prototypes=2, concept_min_count=2))  # fmt: skip
    history = summary["history"]
    assert "loss_cva" not in history[0] and all(r["loss_cva"] > 0 for r in history[1:])
    assert summary["concepts"]["concepts"] > 0 and summary["concepts"]["products_with_visual_concepts"] > 0


def test_recipe_prunes_in_unlocked_layers_reports_and_exports(catalog, tmp_path):
    with pytest.raises(UserError, match="text-unlocked-layers"):
        train(config(catalog, tmp_path / "frozen", prune=True))
    run = tmp_path / "run"
    summary = train(config(catalog, run, prune=True, text_unlocked_layers=1, prune_quantile=0.3,
                           prune_temperature=0.01, prune_weight=1.0))  # fmt: skip
    pruning = summary["pruning"]
    assert pruning["temperature"] == 0.01 and len(pruning["thresholds"]) == 1 == len(pruning["layers"])
    assert pruning["layers"][0]["layer"] == 2  # bert-tiny has 2 layers; the top one trains
    assert 0 < pruning["layers"][0]["pruned_share"] <= 1 and isinstance(pruning["most_pruned"], list)
    assert all(r["loss_prune"] > 0 for r in summary["history"])
    assert pruning["thresholds"][0] > pruning["thresholds_init"][0]  # τ is learned: L_prune pushes it up
    ckpt = torch.load(run / "best.pt", weights_only=False)
    assert ckpt["pruning"] is True and ckpt["prune_at_inference"] == pruning["at_inference"]
    below = ckpt["state_dict"]["pruning_gates.0.threshold"]
    assert float(below) == -1.0  # the cached layer's gate never closes
    bundle = load_bundle(export_checkpoint(run / "best.pt", tmp_path / "bundle", catalog=str(catalog)))
    assert bundle.manifest.parity.text_max_abs_diff < 1e-3
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["pruning"] == {"trained": True, "at_inference": pruning["at_inference"]}
    assert np.isfinite(bundle.encode_texts(["red dress"])).all()
