"""Unlocking in the cached-token recipe: the towers are cut at a cache boundary, the parts above it train."""
from __future__ import annotations

import json

import pytest
import torch

from tests.support.catalogs import make_training_catalog
from trainer.bundle import export_checkpoint
from trainer.factory import create_model, get_tokenizer
from trainer.train import TrainConfig, seed_everything, train
from vitrine.runtime import load_bundle

pytestmark = pytest.mark.torch

CONV_HEAD = {"heads_cfg": {"image_summary": "conv_head"}}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return make_training_catalog(tmp_path_factory.mktemp("catalog"))


@pytest.mark.parametrize("overrides", [{}, CONV_HEAD])
def test_any_cache_boundary_computes_the_same_embeddings(overrides):
    model = create_model("tiny-ap", pretrained="none", **overrides).eval()
    ids = get_tokenizer("tiny-ap")(["red floral summer dress", "men black formal shoes with laces"])
    pixels = torch.randn(2, 3, model.image_size, model.image_size)
    with torch.no_grad():
        text, image = model.encode_text(ids), model.encode_image(pixels)
        stages, layers = len(model.image_block_stages), len(model.text_layers)
        for image_stages, text_layers in [(1, 1), (stages - 1, layers), (2, 0)]:
            model.set_cache_boundary(image_stages=image_stages, text_layers=text_layers)
            cached_image = model.image_trunk_features(pixels)
            states, mask = model.text_token_states(ids)
            assert torch.allclose(model.encode_image_features(cached_image), image, atol=1e-5)
            assert torch.allclose(model.encode_text_tokens(states, mask), text, atol=1e-5)
            assert torch.allclose(model.encode_text(ids), text, atol=1e-5)
    with pytest.raises(ValueError, match="image_stages"):
        model.set_cache_boundary(image_stages=stages)
    with pytest.raises(ValueError, match="text_layers"):
        model.set_cache_boundary(text_layers=layers + 1)
    with pytest.raises(ValueError, match="attention heads"):
        create_model("tiny", pretrained="none").set_cache_boundary(text_layers=1)


def test_conv_head_summary_feeds_the_image_residual():
    model = create_model("tiny-ap", pretrained="none", heads_cfg={"image_summary": "conv_head", "residual": True})
    trunk = model.clip.visual.trunk
    assert model.image_head.skip.in_features == trunk.num_features != model.image_patch_dim
    with pytest.raises(ValueError, match="image_summary"):
        create_model("tiny-ap", pretrained="none", heads_cfg={"image_summary": "pixels"})


def test_unlocked_recipe_trains_only_what_is_above_the_boundary_and_exports(catalog, tmp_path):
    run = tmp_path / "run"
    config = TrainConfig(catalog=str(catalog), out=str(run), model="tiny-ap", pretrained="none", epochs=2,
                         batch_size=8, val_queries=12, val_every=1, lr=3e-3, image_lr=1e-2, text_lr=1e-2,
                         cache_dir=str(run / "cache"), progress=False, image_unlocked_groups=2, text_unlocked_layers=1,
                         model_overrides={"heads_cfg": {"image_summary": "conv_head", "residual": True}})  # fmt: skip
    train(config)
    trained = torch.load(run / "best.pt", weights_only=False)["state_dict"]
    seed_everything(0)
    model = create_model("tiny-ap", pretrained="none", **config.model_overrides)
    fresh = model.state_dict()
    stages, layers = len(model.image_block_stages), len(model.text_layers)

    def moved(prefix: str) -> bool:
        return any(not torch.equal(trained[k], fresh[k]) for k in fresh if k.startswith(prefix))

    assert moved(f"clip.visual.trunk.blocks.{stages - 1}.") and moved("clip.visual.trunk.conv_head.")
    assert moved(f"clip.text.transformer.encoder.layer.{layers - 1}.")
    assert not moved("clip.visual.trunk.blocks.0.") and not moved("clip.visual.trunk.conv_stem.")
    assert not moved("clip.text.transformer.encoder.layer.0.") and not moved("clip.text.transformer.embeddings.")
    # BatchNorm statistics stay those of the pretrained tower (unlocked parts run in eval mode).
    stats = [k for k in fresh if k.startswith(f"clip.visual.trunk.blocks.{stages - 1}.") and "running_mean" in k]
    assert stats and all(torch.equal(trained[k], fresh[k]) for k in stats)
    # The image cache holds the block map below the last stage, not the top one.
    assert len(list((run / "cache").glob("image-features-*.npz"))) == 2
    bundle = load_bundle(export_checkpoint(run / "best.pt", tmp_path / "bundle", catalog=str(catalog)))
    assert bundle.manifest.parity.image_max_abs_diff < 1e-4 and bundle.manifest.parity.text_max_abs_diff < 1e-4
    assert json.loads((run / "summary.json").read_text())["unlocked"] == {"image_stages": 1, "conv_head": True,
                                                                        "text_layers": 1}


def test_default_config_reads_the_pooled_conv_head_in_the_image_residual():
    from trainer.cli import DEFAULT_MODEL

    model = create_model(DEFAULT_MODEL, pretrained="none")
    assert model.image_summary == "conv_head" and model.image_head.skip.in_features == 1280
    assert model.text_head.skip.in_features == 384  # MiniLM's mean token, as in fashion-lite-apr


def test_default_config_unlocks_the_last_stage_and_top_two_text_layers_unless_flags_say_otherwise():
    from trainer.cli import DEFAULT_MODEL, resolve_query_weight, resolve_recipe_options, resolve_tower_lrs, resolve_unlocking
    from trainer.factory import recipe_defaults

    assert recipe_defaults(DEFAULT_MODEL) == {"image_unlocked_groups": 2, "text_unlocked_layers": 2, "image_lr": 1e-3,
                                              "text_lr": 3e-4, "query_weight": 0.1, "epochs": 15, "image_views": 2,
                                              "amp": "auto"}  # fmt: skip
    # Epochs, cached views and autocast: the config's (15 epochs, one augmented view, bf16 where native), flags win;
    # other models keep the recipe's fallbacks (10 epochs with attention heads, 1 view, bf16 on CUDA only).
    assert resolve_recipe_options(DEFAULT_MODEL, None, None, None) == (15, 2, "auto")
    assert resolve_recipe_options(DEFAULT_MODEL, 3, 1, "off") == (3, 1, "off")
    assert resolve_recipe_options("fashion-lite-apr", None, None, None) == (10, 1, "cuda")
    assert resolve_recipe_options("fashion-lite", None, None, None) == (5, 1, "cuda")
    # The shopper-query loss: on at the config's weight (chosen on val), off elsewhere, a flag wins.
    assert resolve_query_weight(DEFAULT_MODEL, None) == 0.1 and resolve_query_weight(DEFAULT_MODEL, 0.0) == 0.0
    assert resolve_query_weight("fashion-lite-apr", None) == 0.0
    # Tower learning rates: the config's (10x the built-in ones, chosen on val), unless a flag says otherwise.
    assert resolve_tower_lrs(DEFAULT_MODEL, None, None) == (3e-4, 1e-3)
    assert resolve_tower_lrs(DEFAULT_MODEL, 5e-5, None) == (5e-5, 1e-3)
    assert resolve_tower_lrs("fashion-lite-apr", None, None) == (3e-5, 1e-4)
    assert resolve_unlocking(DEFAULT_MODEL, None, None) == (2, 2)
    assert resolve_unlocking(DEFAULT_MODEL, 0, None) == (0, 2)  # a flag on the command line wins
    assert resolve_unlocking(DEFAULT_MODEL, None, 0) == (2, 0)
    assert resolve_unlocking("fashion-lite-apr", None, None) == (0, 0)  # configs without recipe_cfg stay frozen
    assert resolve_unlocking("ViT-B-32", None, 1) == (0, 1)  # open_clip names have no Vitrine config
    # The model itself is fashion-lite-apc's: the recipe_cfg key never reaches the open_clip constructor.
    model = create_model(DEFAULT_MODEL, pretrained="none")
    assert model.image_summary == "conv_head" and model.image_head.skip.in_features == 1280
