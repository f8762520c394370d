"""The training loop on a tiny catalog with the tiny config: runs in seconds."""
from __future__ import annotations

import json

import pytest
import torch

from tests.support.catalogs import make_training_catalog
from trainer.bundle import export_checkpoint
from trainer.factory import create_model, get_tokenizer
from trainer.train import TextEmbedder, TrainConfig, Trainer, train
from vitrine.runtime import load_bundle

pytestmark = pytest.mark.torch  # needs the train extra

@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return make_training_catalog(tmp_path_factory.mktemp("catalog"))


def tiny_config(catalog, out, **kw) -> TrainConfig:
    base = dict(catalog=str(catalog), out=str(out), model="tiny", pretrained="none", epochs=2, batch_size=8,
                text_unlocked_layers=-1, concept_min_count=2, cva_topk=8, cva_prototypes=2, val_queries=12,
                cache_dir=str(out / "cache"), progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_full_method_run_writes_checkpoints_and_summary(catalog, tmp_path):
    summary = train(tiny_config(catalog, tmp_path / "run", cva=True, prune=True))
    run = tmp_path / "run"
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()
    saved = json.loads((run / "summary.json").read_text())
    assert [r["epoch"] for r in saved["history"]] == [1, 2]
    for record in saved["history"]:
        assert record["loss_itc"] > 0 and record["loss_cva"] > 0 and record["loss_prune"] > 0
    assert 0.0 <= summary["alpha"]["alpha"] <= 1.0
    assert len(summary["alpha"]["sweep"]) == 11
    assert isinstance(summary["prune_at_inference"], bool)
    best = torch.load(run / "best.pt", weights_only=False)
    assert best["pruning"] is True and best["alpha"] == summary["alpha"]["alpha"]
    assert 0.0 <= best["val"]["sample_t2i_R@1"] <= 1.0

    # The bundle carries the α tuned on val, per query kind, to the torch-free side.
    bundle = export_checkpoint(run / "best.pt", tmp_path / "bundle", catalog=str(catalog))
    encoder = load_bundle(bundle)
    assert (encoder.alphas.alpha, encoder.alphas.alpha_t2p, encoder.alphas.alpha_i2p) == (
        summary["alpha"]["alpha"], summary["alpha"]["alpha_t2p"], summary["alpha"]["alpha_i2p"])
    assert encoder.manifest.pruning == {"trained": True, "at_inference": summary["prune_at_inference"]}


def test_training_moves_the_loss(catalog, tmp_path):
    summary = train(tiny_config(catalog, tmp_path / "run", epochs=4, lr=5e-3, text_lr=1e-3))
    losses = [r["loss_itc"] for r in summary["history"]]
    assert losses[-1] < losses[0]


def test_resume_continues_from_last_epoch(catalog, tmp_path):
    train(tiny_config(catalog, tmp_path / "run", epochs=1))
    trainer = Trainer(tiny_config(catalog, tmp_path / "run", epochs=2))
    trainer.maybe_resume()
    assert trainer.epoch == 1 and len(trainer.history) == 1
    summary = trainer.fit()
    assert [r["epoch"] for r in summary["history"]] == [1, 2]


def test_frozen_text_trunk_cache_matches_full_encoder():
    torch.manual_seed(0)
    model = create_model("tiny", "none").eval()
    tokenizer = get_tokenizer("tiny")
    texts = ["red cotton t-shirt", "men navy blue casual shoes for the summer", "red cotton t-shirt"]
    cached = TextEmbedder(model, tokenizer, torch.device("cpu"), frozen_trunk=True)
    direct = TextEmbedder(model, tokenizer, torch.device("cpu"))
    assert torch.allclose(cached(texts), direct(texts), atol=1e-6)
    assert len(cached._trunk) == 2  # duplicate texts are encoded once


def test_frozen_towers_train_only_heads(catalog, tmp_path):
    trainer = Trainer(tiny_config(catalog, tmp_path / "run", text_unlocked_layers=0, epochs=1))
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(".transformer." not in n and ".trunk." not in n for n in trainable)
    assert trainer.embed_texts.frozen_trunk


def test_unlocked_image_groups_train_from_pixels(catalog, tmp_path):
    trainer = Trainer(tiny_config(catalog, tmp_path / "run", image_unlocked_groups=1, epochs=1))
    assert trainer.features is None  # no feature cache: the image tower trains
    assert any(p.requires_grad for n, p in trainer.model.named_parameters() if ".trunk." in n)
    summary = trainer.fit()
    assert summary["history"][0]["loss_itc"] > 0
