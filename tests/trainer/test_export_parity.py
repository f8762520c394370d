"""trainer.export: ONNX bundles that match the torch model, through the torch-free runtime."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.export import ExportError, export_bundle
from trainer.factory import create_model, get_tokenizer
from vitrine.runtime import load_bundle
from vitrine.runtime.session import make_session

pytestmark = pytest.mark.torch  # needs the train extra

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-4
TEXTS = [
    "dress",
    "Red summer dress",
    "men's black leather ankle boots with a side zip",
    "Nike Men Blue T20 Indian Cricket Jersey",
    "shirt",
    "women's floral print cotton kurta with three-quarter sleeves " * 6,  # longer than max_length
]
# Pruning thresholds high enough that the random tiny tower really drops tokens. The configs'
# temperature (1e-4) makes a gate a near step function: a token whose importance lands within
# ~1e-3 of its threshold gets a mask that float rounding moves by ~1e-3, in torch as in ONNX.
# A softer temperature keeps these tests about the export, not about that conditioning.
PRUNE_THRESHOLD = 0.08
PRUNE_TEMPERATURE = 1e-2


def tiny_model(pruning: bool):
    torch.manual_seed(0)
    model = create_model("tiny", pretrained="none").eval()
    if pruning:
        with torch.no_grad():
            for gate in model.pruning_gates:
                gate.threshold.fill_(PRUNE_THRESHOLD)
                gate.temperature = PRUNE_TEMPERATURE
        model.set_pruning(True)
    return model


def images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(60, 80), (32, 32), (90, 41), (23, 50)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]


@torch.no_grad()
def torch_texts(model, tokenizer, texts: list[str]) -> np.ndarray:
    return model.encode_text(tokenizer(texts, padding="longest")).numpy()


@torch.no_grad()
def torch_images(model, pils: list[Image.Image]) -> np.ndarray:
    from trainer.export import preprocess_settings, reference_transform

    transform = reference_transform(preprocess_settings(model))
    return model.encode_image(torch.stack([transform(im) for im in pils])).numpy()


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("tiny")


@pytest.fixture(scope="module", params=[False, True], ids=["pruning-off", "pruning-on"])
def exported(request, tmp_path_factory, tokenizer):
    model = tiny_model(request.param)
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    manifest = {"alpha": 0.3, "training": {"data_fingerprint": "abc123"}, "val_metrics": {"recall@10": 0.5}}
    path = export_bundle(model, tokenizer, out, manifest=manifest, check_texts=TEXTS, check_images=images(), name="tiny")
    return model, path


def test_bundle_layout_and_manifest(exported, tokenizer) -> None:
    model, path = exported
    assert sorted(p.name for p in path.iterdir()) == ["image_encoder.onnx", "manifest.json", "text_encoder.onnx", "tokenizer"]
    assert (path / "tokenizer" / "tokenizer.json").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "vitrine-model-bundle" and manifest["format_version"] == 1
    assert manifest["model"]["name"] == "tiny" and manifest["model"]["config"]["embed_dim"] == model.embed_dim
    assert manifest["embed_dim"] == model.embed_dim and manifest["image_size"] == model.image_size
    pre = manifest["preprocess"]
    assert pre["resize_mode"] == "shortest" and pre["interpolation"] == "bicubic" and pre["crop"] == "center"
    assert pre["mean"] == model.config["preprocess_cfg"]["mean"]
    assert manifest["tokenizer"]["max_length"] == tokenizer.max_length
    assert manifest["tokenizer"]["pad_token_id"] == tokenizer.pad_token_id
    assert manifest["text_encoder"]["input_name"] == "input_ids"
    assert manifest["text_encoder"]["input_shape"] == ["batch", "sequence"]
    assert manifest["image_encoder"]["input_name"] == "pixels"
    assert manifest["alpha"] == 0.3 and manifest["training"]["data_fingerprint"] == "abc123"
    assert manifest["pruning"] is model.pruning_enabled
    parity = manifest["parity"]
    assert parity["texts"] == len(TEXTS) and parity["images"] == 4
    assert 0 <= parity["text_max_abs_diff"] <= TOL and 0 <= parity["image_max_abs_diff"] <= TOL
    assert parity["token_lengths"][1] == tokenizer.max_length  # the long text was truncated, not dropped


def test_text_graph_takes_any_sequence_length(exported) -> None:
    model, path = exported
    session = make_session(path / "text_encoder.onnx", threads=1)
    rng = np.random.default_rng(1)
    for batch, length in [(1, 5), (3, 23), (2, 5), (1, 23)]:
        ids = rng.integers(1000, 2000, size=(batch, length), dtype=np.int64)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        (onnx_out,) = session.run(["embeddings"], {"input_ids": ids})
        with torch.no_grad():
            expected = model.encode_text(torch.from_numpy(ids)).numpy()
        assert onnx_out.shape == (batch, model.embed_dim)
        assert np.abs(onnx_out - expected).max() <= TOL, (batch, length)


def test_onnx_matches_torch_on_texts_and_images(exported, tokenizer) -> None:
    model, path = exported
    bundle = load_bundle(path, threads=1)
    assert np.abs(bundle.encode_texts(TEXTS) - torch_texts(model, tokenizer, TEXTS)).max() <= TOL
    pils = images(seed=5)
    assert np.abs(bundle.encode_images(pils) - torch_images(model, pils)).max() <= TOL


def test_pruning_is_in_the_exported_graph(exported, tokenizer) -> None:
    model, path = exported
    unpruned = tiny_model(pruning=False)
    bundle = load_bundle(path, threads=1)
    gap = np.abs(bundle.encode_texts(TEXTS) - torch_texts(unpruned, tokenizer, TEXTS)).max()
    if model.pruning_enabled:
        assert gap > 1e-3  # the gates change the embeddings, and the graph carries them
    else:
        assert gap <= TOL


def test_batch_composition_and_padding_do_not_leak(exported, tokenizer) -> None:
    model, path = exported
    bundle = load_bundle(path, threads=1, text_batch_size=2)  # > 2 texts: sorted into chunks of 2
    alone = np.concatenate([bundle.encode_texts([t]) for t in TEXTS])
    reference = np.concatenate([torch_texts(model, tokenizer, [t]) for t in TEXTS])
    assert np.abs(alone - reference).max() <= TOL
    for order in (list(range(len(TEXTS))), list(reversed(range(len(TEXTS)))), [0, 2], [4, 5, 0]):
        batched = bundle.encode_texts([TEXTS[i] for i in order])
        assert np.abs(batched - alone[order]).max() <= 1e-5, order
    whole = load_bundle(path, threads=1, text_batch_size=64).encode_texts(TEXTS)  # one chunk, padded to 32
    assert np.abs(whole - alone).max() <= 1e-5
    ids = bundle.text.tokenizer(TEXTS)
    assert np.array_equal(ids, tokenizer(TEXTS, padding="longest").numpy())


def test_bundle_runs_with_torch_blocked(exported, tmp_path: Path) -> None:
    model, path = exported
    out = tmp_path / "vectors.npy"
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, json\n"
        "from vitrine.runtime import load_bundle\n"
        f"texts = json.loads({json.dumps(json.dumps(TEXTS))})\n"
        f"np.save({str(out)!r}, load_bundle({str(path)!r}).encode_texts(texts))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert np.abs(np.load(out) - load_bundle(path).encode_texts(TEXTS)).max() == 0


def test_failed_export_leaves_nothing(tmp_path: Path, tokenizer) -> None:
    model = tiny_model(False)
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match="differs from the torch model"):
        export_bundle(model, tokenizer, out, tolerance=-1.0, check_texts=TEXTS[:2], check_images=images()[:1])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ExportError, match="cannot be overridden"):
        export_bundle(model, tokenizer, out, manifest={"embed_dim": 3})
    assert list(tmp_path.iterdir()) == []


def test_existing_directories(tmp_path: Path, tokenizer) -> None:
    model = tiny_model(False)
    kwargs = dict(check_texts=TEXTS[:2], check_images=images()[:1], optimize=False)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a model bundle"):
        export_bundle(model, tokenizer, other, **kwargs)
    assert (other / "keep.txt").read_text() == "mine"
    out = export_bundle(model, tokenizer, tmp_path / "bundle", manifest={"alpha": 0.2}, **kwargs)
    with pytest.raises(ExportError, match="overwrite=True"):
        export_bundle(model, tokenizer, out, **kwargs)
    export_bundle(model, tokenizer, out, manifest={"alpha": 0.9}, overwrite=True, **kwargs)
    assert load_bundle(out).alphas.alpha == 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "notes"]


@pytest.mark.integration
def test_fashion_lite_parity_on_real_catalog(fashion_products: Path, tmp_path: Path) -> None:
    rows = []
    with open(fashion_products / "products.jsonl", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row.get("split") == "val" and (fashion_products / row["image"]).is_file():
                rows.append(row)
            if len(rows) == 16:
                break
    titles = [r["title"] for r in rows]
    photos = [Image.open(fashion_products / r["image"]).convert("RGB") for r in rows]
    model = create_model("fashion-lite").eval()
    tokenizer = get_tokenizer("fashion-lite")
    path = export_bundle(model, tokenizer, tmp_path / "fashion-lite", check_texts=titles, check_images=photos)
    bundle = load_bundle(path)
    assert bundle.embed_dim == 256 and bundle.image_size == 224
    assert np.abs(bundle.encode_texts(titles) - torch_texts(model, tokenizer, titles)).max() <= TOL
    assert np.abs(bundle.encode_images(photos) - torch_images(model, photos)).max() <= TOL
    parity = bundle.manifest.parity
    assert parity.texts == 16 and parity.text_max_abs_diff <= TOL and parity.image_max_abs_diff <= TOL
    # efficientnet_lite0's block output: 320 channels on a 7x7 grid at 224 px
    assert bundle.patch_spec is not None and bundle.patch_spec.grid == (7, 7) and bundle.patch_spec.dim == 320
    assert parity.patches_max_abs_diff <= TOL * max(1.0, parity.patches_max_abs)
