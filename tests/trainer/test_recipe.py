"""The cached-token recipe (attention heads over cached token states) on a tiny catalog with `tiny-ap`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.support.catalogs import make_training_catalog
from trainer.batches import CatalogBatchSampler
from trainer.bundle import export_checkpoint
from trainer.factory import create_model, get_tokenizer, has_token_heads
from trainer.heads import AttentionPoolHead
from trainer.loss import ClipLoss, multi_positive_info_nce
from trainer.train import TrainConfig, seed_everything, train
from vitrine.runtime import load_bundle

pytestmark = pytest.mark.torch  # needs the train extra


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return make_training_catalog(tmp_path_factory.mktemp("catalog"))


def config(catalog, out, **kw) -> TrainConfig:
    base = dict(catalog=str(catalog), out=str(out), model="tiny-ap", pretrained="none", epochs=4, batch_size=8,
                val_queries=12, val_every=2, lr=3e-3, cache_dir=str(out / "cache"), progress=False)
    base.update(kw)
    return TrainConfig(**base)


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def test_multi_positive_loss_equals_clip_loss_when_titles_differ():
    torch.manual_seed(0)
    image, text, scale = unit(torch.randn(6, 8)), unit(torch.randn(6, 8)), torch.tensor(10.0)
    distinct = multi_positive_info_nce(image, text, torch.arange(6), scale)
    assert torch.allclose(distinct, ClipLoss()(image, text, scale), atol=1e-6)
    # Two products with one title: matching either caption is right, so the loss can only drop.
    same = multi_positive_info_nce(image, text, torch.tensor([0, 0, 1, 2, 3, 4]), scale)
    assert same < distinct


def test_attention_head_ignores_padding_and_keeps_batch_rows_independent():
    torch.manual_seed(0)
    head = AttentionPoolHead(16, 8, num_heads=4, mlp_hidden=32).eval()
    tokens, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    padded = tokens.clone()
    padded[0, 3:] = 99.0  # garbage under the mask
    out = head(padded, mask)
    assert torch.allclose(out[0], head(tokens[:1, :3], mask[:1, :3])[0], atol=1e-5)
    assert torch.allclose(out[1], head(tokens[1:], mask[1:])[0], atol=1e-5)


def test_hard_negative_batches_group_article_types():
    types = ["tshirt"] * 40 + ["watch"] * 40 + ["bag"] * 40
    sampler = CatalogBatchSampler(types, 32, hard_fraction=0.5, group_size=8, seed=1)
    batches = list(sampler.epoch(0))
    assert len(batches) == len(sampler) == 3 and all(len(set(b)) == len(b) for b in batches)
    plain = list(CatalogBatchSampler(types, 32, seed=1).epoch(0))
    assert sorted(np.concatenate(plain)) == sorted(set(np.concatenate(plain)))  # a permutation's slices
    assert [list(b) for b in sampler.epoch(0)] == [list(b) for b in batches]  # seeded


def test_token_head_model_exports_with_parity(tmp_path):
    model = create_model("tiny-ap", pretrained="none").eval()
    bundle = load_bundle(__import__("trainer.export", fromlist=["export_bundle"]).export_bundle(
        model, get_tokenizer("tiny-ap"), tmp_path / "bundle"))
    texts = ["red dress", "men black formal shoes with laces"]
    with torch.no_grad():
        expected = model.encode_text(get_tokenizer("tiny-ap")(texts)).numpy()
    assert np.abs(bundle.encode_texts(texts) - expected).max() < 1e-4
    assert bundle.manifest.patches is not None and bundle.manifest.parity.image_max_abs_diff < 1e-4


def test_recipe_trains_heads_only_and_exports_a_bundle(catalog, tmp_path):
    assert has_token_heads("tiny-ap") and not has_token_heads("tiny")
    run = tmp_path / "run"
    summary = train(config(catalog, run, attr_weight=0.5, hard_negatives=0.5, image_views=2))
    saved = json.loads((run / "summary.json").read_text())
    assert saved["recipe"] == "cached-token" and [r["epoch"] for r in saved["history"]] == [1, 2, 3, 4]
    assert [r["epoch"] for r in saved["history"] if "val" in r] == [2, 4]
    assert all(r["loss_attr"] > 0 for r in saved["history"]) and saved["attribute_classes"]["baseColour"] > 1
    assert {"cache_images", "cache_texts", "train", "tune_alpha"} <= set(saved["stage_seconds"])
    # train, val and one augmented view of the training photos, each cached once
    assert len(list((run / "cache").glob("image-features-*.npz"))) == 3
    assert saved["history"][-1]["loss_itc"] < saved["history"][0]["loss_itc"]
    # Frozen towers: their weights are the untrained model's, only the heads moved.
    trained = torch.load(run / "best.pt", weights_only=False)["state_dict"]
    seed_everything(0)  # as the trainer does before building its model
    fresh = create_model("tiny-ap", pretrained="none").state_dict()
    tower = [k for k in fresh if k.startswith("clip.text.transformer.") or k.startswith("clip.visual.trunk.")]
    assert tower and all(torch.equal(trained[k], fresh[k]) for k in tower)
    assert any(not torch.equal(trained[k], fresh[k]) for k in fresh if k.startswith("image_head."))
    bundle = load_bundle(export_checkpoint(run / "best.pt", tmp_path / "bundle", catalog=str(catalog)))
    assert bundle.alphas.alpha_t2p == summary["alpha"]["alpha_t2p"]


def test_recipe_resumes_from_its_last_epoch(catalog, tmp_path):
    run = tmp_path / "run"
    train(config(catalog, run, epochs=2))
    summary = train(config(catalog, run, epochs=3))
    assert [r["epoch"] for r in summary["history"]] == [1, 2, 3]


def test_residual_head_adds_a_linear_path_from_the_masked_token_mean():
    torch.manual_seed(0)
    head = AttentionPoolHead(16, 8, num_heads=4, mlp_hidden=32, residual=True).eval()
    tokens, mask = torch.randn(1, 5, 16), torch.tensor([[1, 1, 1, 0, 0]])
    plain = AttentionPoolHead(16, 8, num_heads=4, mlp_hidden=32)
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("skip.")})
    expected = plain.eval()(tokens, mask) + head.skip(tokens[:, :3].mean(dim=1))
    assert torch.allclose(head(tokens, mask), expected, atol=1e-6)
    assert create_model("fashion-lite-apr", pretrained="none").text_head.skip is not None


def test_amp_modes_choose_bf16_by_device():
    from trainer.recipe import autocast_dtype, cpu_has_native_bf16
    from vitrine.errors import UserError

    assert autocast_dtype("cuda", torch.device("cpu")) is None
    assert autocast_dtype("cuda", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    # a CPU gets bf16 under "auto" only where oneDNN runs it natively (emulated bf16 is slower than float32)
    assert autocast_dtype("auto", torch.device("cpu")) is (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert autocast_dtype("off", torch.device("cuda")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(UserError):
        autocast_dtype("fp8", torch.device("cpu"))


def test_recipe_trains_under_bf16_autocast(catalog, tmp_path, monkeypatch):
    from trainer.recipe import TokenForward

    seen: list[torch.dtype] = []
    forward = TokenForward.forward
    monkeypatch.setattr(TokenForward, "forward", lambda self, *a: [seen.append(o.dtype) or o for o in forward(self, *a)])
    summary = train(config(catalog, tmp_path / "run", epochs=2, amp="bf16"))
    assert seen and seen[0] == torch.bfloat16  # the heads ran under autocast
    losses = [r["loss_itc"] for r in summary["history"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_a_checkpoint_delta_carries_only_trained_tensors_and_restores_the_checkpoint(catalog, tmp_path):
    from trainer.checkpoint_delta import restore, write_delta

    run = tmp_path / "run"
    train(config(catalog, run, epochs=1, text_unlocked_layers=1))
    full = torch.load(run / "best.pt", weights_only=False)
    parts = write_delta(run / "best.pt", tmp_path / "delta", max_bytes=64 << 10)
    assert len(parts) > 1  # split to fit the size cap
    deltas = [torch.load(p, weights_only=False)["tensors"] for p in parts]
    carried = {k for d in deltas for k in d}
    assert any(k.startswith("image_head.") for k in carried) and not any(k.startswith("clip.visual.trunk.") for k in carried)
    assert sum(p.stat().st_size for p in parts) < (run / "best.pt").stat().st_size
    back = torch.load(restore(list(reversed(parts)), tmp_path / "restored.pt"), weights_only=False)
    assert set(back["state_dict"]) == set(full["state_dict"])
    assert all(torch.equal(back["state_dict"][k], v) for k, v in full["state_dict"].items())
    assert back["val"] == full["val"] and "optimizer" not in back
    with pytest.raises(ValueError):
        restore(parts[1:], tmp_path / "partial.pt")
