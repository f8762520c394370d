"""The open_clip route end to end, on two random-init architectures registered the way open_clip
registers its own (trainer/model_configs/open_clip/): CLIP-style (open_clip ViT + CLIP text
transformer + BPE tokenizer) and SigLIP-style (timm ViT + HF tokenizer). Each trains (cached and
unlocked), exports with parity, loads without torch and serves."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from fastapi.testclient import TestClient

from search.service import Settings, create_app
from tests.support.catalogs import make_training_catalog
from tests.support.service import build_bundle_index
from trainer.bundle import export_checkpoint
from trainer.factory import create_model_and_transforms, get_tokenizer, register_open_clip_configs
from trainer.features import OnnxTrunk
from trainer.train import TrainConfig, seed_everything, train
from vitrine.runtime import load_bundle

pytestmark = pytest.mark.torch  # needs the train extra

REPO = Path(__file__).resolve().parents[2]
ARCHITECTURES = ("vitrine-tiny-clip", "vitrine-tiny-siglip")
TITLES = ["Nike Men Blue T20 Indian Cricket Jersey", "red   floral summer dress", "Reid & Taylor Men's Black Socks", ""]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return make_training_catalog(tmp_path_factory.mktemp("catalog"))


def config(catalog, out: Path, model: str, **kw) -> TrainConfig:
    base = dict(catalog=str(catalog), out=str(out), model=model, pretrained="none", epochs=1, batch_size=8,
                val_queries=12, cache_dir=str(out / "cache"), progress=False)
    return TrainConfig(**{**base, **kw})


def test_the_architectures_are_in_open_clips_registry():
    assert set(ARCHITECTURES) <= set(register_open_clip_configs())
    assert set(ARCHITECTURES) <= set(open_clip.list_models())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_the_onnx_trunk_exports_and_matches_torch(name):
    # The feature cache runs the image tower through ONNX; ViT attention used to fail its export
    # (`aten::_native_multi_head_attention`).
    model, _, _ = create_model_and_transforms(name, pretrained="none")
    model.eval()
    pixels = torch.randn(3, 3, model.image_size, model.image_size)
    with torch.no_grad():
        expected = model.image_trunk_features(pixels)
    assert torch.allclose(OnnxTrunk(model, model.image_size)(pixels), expected, atol=1e-4)


def test_the_clip_bpe_tokenizer_converts_to_a_fast_tokenizer_with_the_same_ids():
    tokenizer = get_tokenizer("vitrine-tiny-clip")
    assert tokenizer.hf is not None and tokenizer.padding == "max_length"
    reference = tokenizer(TITLES)
    for row, text in zip(reference, TITLES):
        ids = tokenizer.hf(text)["input_ids"]
        assert ids == [int(i) for i in row[: len(ids)]] and not row[len(ids):].any()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_train_cached_and_unlocked_export_load_without_torch_and_serve(name, catalog, tmp_path):
    cached = train(config(catalog, tmp_path / "cached", name))
    unlocked = train(config(catalog, tmp_path / "unlocked", name, image_unlocked_groups=1))
    assert cached["history"][0]["loss_itc"] > 0 and unlocked["history"][0]["loss_itc"] > 0
    # Unlocked: the image tower's last group trained; cached: the image tower is untouched.
    seed_everything(0)  # as the trainer does before building its model
    fresh = create_model_and_transforms(name, pretrained="none")[0].state_dict()
    visual = [k for k in fresh if k.startswith("clip.visual.")]
    for run, moved in (("unlocked", True), ("cached", False)):
        state = torch.load(tmp_path / run / "best.pt", weights_only=False)["state_dict"]
        assert any(not torch.equal(state[k], fresh[k]) for k in visual) is moved, run

    bundle_dir = export_checkpoint(tmp_path / "cached" / "best.pt", tmp_path / "bundle", catalog=str(catalog))
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["parity"]["text_max_abs_diff"] < 1e-4 and manifest["parity"]["image_max_abs_diff"] < 1e-4
    assert manifest["tokenizer"]["padding"] == "max_length"

    out = tmp_path / "vectors.npy"
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from vitrine.runtime import load_bundle\n"
        f"np.save({str(out)!r}, load_bundle({str(bundle_dir)!r}).encode_texts({TITLES[:3]!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(out), load_bundle(bundle_dir).encode_texts(TITLES[:3]))

    built = build_bundle_index(tmp_path / "index", bundle_dir, n=12)
    with TestClient(create_app(Settings(index=built.index_dir)), raise_server_exceptions=False) as client:
        response = client.post("/search/text", json={"query": "red tshirts", "k": 5})
        assert response.status_code == 200, response.text
        assert len(response.json()["results"]) == 5
