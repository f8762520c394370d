"""vitrine.runtime on a toy bundle built here with onnx.helper and tokenizers (no trainer needed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from vitrine.errors import UserError
from vitrine.runtime import (
    BundleError,
    BundleManifest,
    PreprocessSettings,
    load_bundle,
    preprocess_image,
    read_manifest,
)
from vitrine.runtime.manifest import hash_bundle_files, write_manifest
from vitrine.runtime.session import default_threads

pytestmark = pytest.mark.torch  # needs the train extra (onnx; open_clip for the preprocessing oracle)

REPO = Path(__file__).resolve().parents[2]
DIM = 8
SIZE = 16
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "red", "blue", "summer", "dress", "shirt", "leather", "boots", "for", "men"]
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def toy_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok


def toy_text_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """Masked mean of token embeddings (pad id 0 ignored), L2-normalised."""
    table = rng.standard_normal((len(VOCAB), DIM)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tokens"]),
        helper.make_node("Equal", ["input_ids", "pad"], ["is_pad"]),
        helper.make_node("Not", ["is_pad"], ["keep"]),
        helper.make_node("Cast", ["keep"], ["keepf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["keepf", "last"], ["mask"]),
        helper.make_node("Mul", ["tokens", "mask"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "one"], ["summed"], keepdims=0),
        helper.make_node("ReduceL2", ["summed"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Div", ["summed", "norm"], ["embeddings"]),
    ]
    graph = helper.make_graph(
        nodes,
        "toy_text",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", DIM])],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array(0, dtype=np.int64), "pad"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "last"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def toy_image_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """Per-channel means -> linear -> L2-normalised."""
    weight = rng.standard_normal((3, DIM)).astype(np.float32)
    bias = rng.standard_normal(DIM).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["pixels"], ["means"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["means", "weight"], ["projected"]),
        helper.make_node("Add", ["projected", "bias"], ["shifted"]),
        helper.make_node("ReduceL2", ["shifted"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Div", ["shifted", "norm"], ["embeddings"]),
    ]
    graph = helper.make_graph(
        nodes,
        "toy_image",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", DIM])],
        [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def write_toy_bundle(directory: Path, *, max_length: int = 8, **extra: object) -> Path:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    onnx.save(toy_text_graph(rng), str(directory / "text_encoder.onnx"))
    onnx.save(toy_image_graph(rng), str(directory / "image_encoder.onnx"))
    (directory / "tokenizer").mkdir()
    toy_tokenizer().save(str(directory / "tokenizer" / "tokenizer.json"))
    manifest = BundleManifest(
        model={"name": "toy", "config": {"embed_dim": DIM}},
        embed_dim=DIM,
        image_size=SIZE,
        preprocess={"image_size": SIZE, "mean": MEAN, "std": STD},
        tokenizer={"max_length": max_length, "pad_token_id": 0, "pad_token": "[PAD]", "lowercase": True},
        text_encoder={
            "file": "text_encoder.onnx",
            "input_name": "input_ids",
            "input_dtype": "int64",
            "input_shape": ["batch", "sequence"],
            "output_name": "embeddings",
            "output_shape": ["batch", DIM],
        },
        image_encoder={
            "file": "image_encoder.onnx",
            "input_name": "pixels",
            "input_dtype": "float32",
            "input_shape": ["batch", 3, SIZE, SIZE],
            "output_name": "embeddings",
            "output_shape": ["batch", DIM],
        },
        opset=17,
        files=hash_bundle_files(directory),
        **extra,
    )
    write_manifest(directory, manifest)
    return directory


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return write_toy_bundle(tmp_path / "bundle", alpha=0.7, training={"rows": 3})


def random_image(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> Image.Image:
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def test_round_trip_shapes_norms_and_manifest(bundle_dir: Path) -> None:
    enc = load_bundle(bundle_dir, threads=1)
    texts = enc.encode_texts(["Red summer dress", "blue shirt", ""])
    assert texts.dtype == np.float32 and texts.shape == (3, DIM)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    images = enc.encode_images([random_image(np.random.default_rng(1), 20, 30)])
    assert images.dtype == np.float32 and images.shape == (1, DIM)
    assert enc.encode_texts([]).shape == (0, DIM) and enc.encode_images([]).shape == (0, DIM)
    assert enc.alphas.alpha == 0.7 and enc.embed_dim == DIM and enc.image_size == SIZE
    assert enc.manifest.training == {"rows": 3}  # caller extras survive
    assert len(enc.fingerprint) == 16 and enc.fingerprint in enc.describe()


def test_alpha_defaults_and_fingerprint_tracks_content(tmp_path: Path) -> None:
    a = load_bundle(write_toy_bundle(tmp_path / "a"))
    b = load_bundle(write_toy_bundle(tmp_path / "b"))
    c = load_bundle(write_toy_bundle(tmp_path / "c", max_length=6))
    assert a.alphas.alpha == 0.5
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_texts_match_one_by_one_and_padding_does_not_leak(bundle_dir: Path) -> None:
    enc = load_bundle(bundle_dir, text_batch_size=2)  # 5 texts -> sorted into chunks of 2
    texts = ["boots", "red leather boots for men", "red summer dress", "shirt", "RED   Summer dress"]
    batched = enc.encode_texts(texts)
    alone = np.concatenate([enc.encode_texts([t]) for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-6)
    np.testing.assert_allclose(batched[2], batched[4], atol=1e-6)  # lowercased + whitespace normalised
    assert not np.allclose(batched[0], batched[3])


def test_tokenizer_truncates_and_pads_to_batch_longest(bundle_dir: Path) -> None:
    enc = load_bundle(bundle_dir)
    ids = enc.text.tokenizer(["red", "red summer dress for men red blue shirt boots"])
    assert ids.dtype == np.int64 and ids.shape == (2, 8)  # truncated to max_length 8, incl. [CLS]/[SEP]
    assert ids[0].tolist() == [2, 4, 3, 0, 0, 0, 0, 0]
    assert ids[1, -1] == 3
    assert enc.text.tokenizer(["red", "blue"]).shape == (2, 3)  # no padding to max_length


def test_bad_inputs_are_user_errors(bundle_dir: Path) -> None:
    enc = load_bundle(bundle_dir)
    with pytest.raises(UserError, match="single string"):
        enc.encode_texts("red dress")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="expected str"):
        enc.encode_texts(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(UserError, match="PIL image"):
        enc.encode_images([np.zeros((4, 4, 3))])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "settings",
    [
        {"resize_mode": "shortest", "interpolation": "bicubic"},
        {"resize_mode": "shortest", "interpolation": "bilinear"},
        {"resize_mode": "longest", "interpolation": "bicubic", "fill_color": 0},
        {"resize_mode": "squash", "interpolation": "bicubic"},
    ],
)
def test_preprocessing_matches_open_clip_image_transform(settings: dict) -> None:
    import open_clip
    import torch

    size = 24
    reference = open_clip.image_transform(size, is_train=False, mean=MEAN, std=STD, **settings)
    ours = PreprocessSettings(image_size=size, mean=MEAN, std=STD, **settings)
    rng = np.random.default_rng(42)
    # portrait, landscape, upscaled, downscaled, odd sizes, exactly the target, square
    for width, height in [(60, 80), (81, 37), (13, 9), (301, 233), (24, 24), (24, 50), (50, 50)]:
        image = random_image(rng, width, height)
        expected = reference(image)
        assert isinstance(expected, torch.Tensor)
        got = preprocess_image(image, ours)
        assert got.dtype == np.float32 and got.shape == (3, size, size)
        assert np.abs(got - expected.numpy()).max() <= 1e-6, (width, height)


def test_preprocessing_converts_to_rgb_first() -> None:
    settings = PreprocessSettings(image_size=8, mean=MEAN, std=STD)
    grey = random_image(np.random.default_rng(3), 11, 15, mode="L")
    out = preprocess_image(grey, settings)
    expected = preprocess_image(grey.convert("RGB"), settings)
    np.testing.assert_array_equal(out, expected)
    rgba = random_image(np.random.default_rng(4), 11, 15, mode="RGBA")
    assert preprocess_image(rgba, settings).shape == (3, 8, 8)


def test_missing_and_invalid_bundles_are_clear(tmp_path: Path, bundle_dir: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path / "empty")
    manifest_path = bundle_dir / "manifest.json"
    raw = json.loads(manifest_path.read_text())

    manifest_path.write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(BundleError, match="format version 99"):
        load_bundle(bundle_dir)
    manifest_path.write_text(json.dumps({**raw, "format": "something-else"}))
    with pytest.raises(BundleError, match="not a Vitrine model bundle"):
        read_manifest(bundle_dir)
    manifest_path.write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(bundle_dir)
    manifest_path.write_text(json.dumps({**raw, "embed_dim": "wide"}))
    with pytest.raises(BundleError, match="embed_dim"):
        read_manifest(bundle_dir)
    manifest_path.write_text(json.dumps({**raw, "alpha": 1.5}))
    with pytest.raises(BundleError, match="alpha"):
        read_manifest(bundle_dir)

    manifest_path.write_text(json.dumps(raw))
    load_bundle(bundle_dir)  # intact again
    with open(bundle_dir / "image_encoder.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="image_encoder.onnx does not match"):
        load_bundle(bundle_dir)
    (bundle_dir / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(bundle_dir)


def test_unreadable_graph_is_a_user_error(bundle_dir: Path) -> None:
    (bundle_dir / "text_encoder.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(UserError, match="cannot load ONNX model"):
        load_bundle(bundle_dir, verify=False)


def test_threads_from_environment(monkeypatch: pytest.MonkeyPatch, bundle_dir: Path) -> None:
    monkeypatch.delenv("VITRINE_THREADS", raising=False)
    assert default_threads() == 2
    monkeypatch.setenv("VITRINE_THREADS", "1")
    assert default_threads() == 1
    enc = load_bundle(bundle_dir)
    assert enc.text.session.get_session_options().intra_op_num_threads == 1
    monkeypatch.setenv("VITRINE_THREADS", "many")
    with pytest.raises(UserError, match="VITRINE_THREADS"):
        load_bundle(bundle_dir)
