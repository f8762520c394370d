"""`vitrine bundle quantize`: an int8 copy of the text graph that loads, verifies and records what it lost."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vitrine.cli import main
from vitrine.errors import UserError
from vitrine.runtime import load_bundle, read_manifest
from vitrine.runtime.manifest import sha256_file
from vitrine.runtime.quantize import compare_embeddings, quantize_bundle

pytestmark = pytest.mark.torch  # the tiny bundle is exported by the trainer

TEXTS = ["red summer dress", "black leather boots for men", "navy blue jeans", "white sports shoes"]


def test_compare_embeddings_reports_the_worst_row() -> None:
    ref = np.eye(3, dtype=np.float32)
    new = ref.copy()
    new[1] = [0.0, 0.6, 0.8]
    cos, diff = compare_embeddings(ref, new)
    assert cos == pytest.approx(0.6) and diff == pytest.approx(0.8)
    with pytest.raises(AssertionError):
        compare_embeddings(ref, new[:2])


def test_int8_copy_loads_verifies_and_records_its_error(tiny_bundle: Path, tmp_path: Path) -> None:
    before = {p.name: sha256_file(p) for p in tiny_bundle.iterdir() if p.is_file()}
    out = tmp_path / "int8"
    records = quantize_bundle(tiny_bundle, out, check_texts=TEXTS, min_cosine=0.5)

    manifest = read_manifest(out)
    assert manifest.quantization == records and set(records) == {"text"}
    assert records["text"]["checks"] == len(TEXTS) and 0.5 <= records["text"]["min_cosine"] <= 1.0
    # The source bundle is the reference and stays as it was; the image graph is copied unchanged.
    assert {p.name: sha256_file(p) for p in tiny_bundle.iterdir() if p.is_file()} == before
    assert sha256_file(out / manifest.image_encoder.file) == before[manifest.image_encoder.file]
    assert sha256_file(out / manifest.text_encoder.file) != before[manifest.text_encoder.file]

    float_enc, int8_enc = load_bundle(tiny_bundle), load_bundle(out)  # verify=True: hashes match
    ref, new = float_enc.encode_texts(TEXTS), int8_enc.encode_texts(TEXTS)
    assert new.dtype == np.float32 and np.allclose(np.linalg.norm(new, axis=1), 1.0, atol=1e-4)
    assert compare_embeddings(ref, new)[0] == pytest.approx(records["text"]["min_cosine"], abs=1e-5)
    assert out.stat().st_mode & 0o755 == 0o755 and not list(tmp_path.glob(".int8.*"))


def test_refusals_leave_nothing_behind(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="must differ"):
        quantize_bundle(tiny_bundle, tiny_bundle)
    with pytest.raises(UserError, match="graphs must be"):
        quantize_bundle(tiny_bundle, tmp_path / "x", graphs=("audio",))
    # Nothing matches a float graph to cosine 1.0 after int8 rounding: refused, and no copy is left.
    with pytest.raises(UserError, match="too far from the float one"):
        quantize_bundle(tiny_bundle, tmp_path / "strict", check_texts=TEXTS, min_cosine=1.0)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")  # a folder with someone's files is never replaced
    with pytest.raises(UserError, match="not a model bundle"):
        quantize_bundle(tiny_bundle, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    quantize_bundle(tiny_bundle, tmp_path / "b", check_texts=TEXTS, min_cosine=0.5)
    with pytest.raises(UserError, match="already holds a bundle"):
        quantize_bundle(tiny_bundle, tmp_path / "b", check_texts=TEXTS, min_cosine=0.5)
    quantize_bundle(tiny_bundle, tmp_path / "b", check_texts=TEXTS, min_cosine=0.5, overwrite=True)
    with pytest.raises(UserError, match="already int8"):
        quantize_bundle(tmp_path / "b", tmp_path / "c", check_texts=TEXTS, min_cosine=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "notes"]


def test_command(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "int8"
    assert main(["bundle", "quantize", "--bundle", str(tiny_bundle), "--out", str(out), "--min-cosine", "0.5", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["quantization"] == read_manifest(out).quantization
    with pytest.raises(SystemExit) as exit_info:
        main(["bundle", "quantize", "--bundle", str(tiny_bundle), "--out", str(out), "--graphs", "text,audio"])
    assert exit_info.value.code == 2 and "text,audio" in capsys.readouterr().err
    assert main(["bundle", "quantize", "--bundle", str(tiny_bundle), "--out", str(out), "--min-cosine", "0.5"]) != 0
    assert "already holds a bundle" in capsys.readouterr().err


def test_the_image_graph_can_be_quantized_too(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "img8"
    records = quantize_bundle(tiny_bundle, out, graphs=("image",), min_cosine=0.0)
    manifest = read_manifest(out)
    assert set(records) == {"image"} and records["image"]["checks"] >= 1
    assert sha256_file(out / manifest.text_encoder.file) == sha256_file(tiny_bundle / manifest.text_encoder.file)
    from PIL import Image

    photo = Image.new("RGB", (40, 30), (200, 30, 30))
    assert load_bundle(out).encode_images([photo]).shape == (1, manifest.embed_dim)


def _photos(n: int, size: int = 40) -> list:
    from PIL import Image

    rng = np.random.default_rng(1)
    # Smooth colour fields with a little texture: closer to product photos than uniform noise.
    base = rng.integers(0, 256, (n, 1, 1, 3))
    texture = rng.integers(-20, 21, (n, size, size, 3))
    pixels = np.clip(base + texture, 0, 255).astype(np.uint8)
    return [Image.fromarray(p) for p in pixels]


def test_trunk_nodes_stop_at_the_last_conv_and_leave_the_fine_layers_float() -> None:
    import onnx
    from onnx import helper

    from vitrine.runtime.quantize import trunk_nodes

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="stem"),  # stride 2: 32 -> 16
        helper.make_node("Clip", ["c1"], ["a1"], name="act1"),
        helper.make_node("Conv", ["a1", "w2"], ["c2"], name="down"),  # stride 8: 4 x 4
        helper.make_node("Clip", ["c2"], ["a2"], name="act2"),
        helper.make_node("Conv", ["a2", "w3"], ["c3"], name="last"),
        helper.make_node("Clip", ["c3"], ["a3"], name="act3"),
        helper.make_node("ReduceMean", ["a3"], ["pooled"], name="pool"),
        helper.make_node("Gemm", ["pooled", "w4"], ["y"], name="head"),
        helper.make_node("Relu", ["a2"], ["side"], name="side_branch"),  # reads the trunk, feeds nothing in it
    ]
    shape = {"c1": 16, "a1": 16, "c2": 4, "a2": 4, "c3": 4, "a3": 4, "side": 4}
    value_info = [helper.make_tensor_value_info(k, onnx.TensorProto.FLOAT, ["n", 8, v, v]) for k, v in shape.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])], value_info=value_info)  # fmt: skip
    assert trunk_nodes(graph) == ["down", "act2", "last", "act3"]
    assert trunk_nodes(graph, min_stride=1) == ["stem", "act1", "down", "act2", "last", "act3"]
    assert trunk_nodes(helper.make_graph(nodes[-2:-1], "h", [], [])) == []  # no Conv: nothing to quantize


def test_the_image_graph_is_quantized_statically_when_photos_calibrate_it(tiny_bundle: Path, tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "img8-static"
    calibration, checks = _photos(24), _photos(6)
    records = quantize_bundle(tiny_bundle, out, graphs=("image",), check_images=checks,
                              calibration_images=calibration, min_image_cosine=0.0)  # fmt: skip
    record = records["image"]
    assert record["method"].startswith("onnxruntime static QDQ") and record["calibration_images"] == 24
    assert record["checks"] == 6 and record["min_cosine"] <= record["mean_cosine"] <= 1.0
    manifest = read_manifest(out)
    graph = onnx.load(str(out / manifest.image_encoder.file)).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    # The trunk is int8; what follows it (pooling, projection, normalisation) stays float.
    quantized_inputs = {i for n in graph.node if n.op_type == "DequantizeLinear" for i in n.output}
    assert not any(set(n.input) & quantized_inputs for n in graph.node if n.op_type in ("Gemm", "MatMul"))
    embeddings = load_bundle(out).encode_images(checks)
    assert embeddings.shape == (6, manifest.embed_dim) and np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-4)
    # The image floor is its own: a strict one refuses, and leaves nothing behind.
    with pytest.raises(UserError, match="int8 image graph is too far"):
        quantize_bundle(tiny_bundle, tmp_path / "strict", graphs=("image",), check_images=checks,
                        calibration_images=calibration, min_cosine=0.0, min_image_cosine=1.0)  # fmt: skip
    assert not (tmp_path / "strict").exists()


def test_command_calibrates_the_image_graph_on_catalog_photos(tiny_bundle: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    catalog = tmp_path / "catalog"
    (catalog / "images").mkdir(parents=True)
    lines = []
    for i, photo in enumerate(_photos(12)):
        photo.save(catalog / "images" / f"{i}.jpg")
        split = "train" if i < 8 else "val"
        lines.append(json.dumps({"id": str(i), "split": split, "title": f"product {i}", "image": f"images/{i}.jpg"}))
    (catalog / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    lines.append(json.dumps({"id": "b", "split": "train", "title": "broken", "image": "images/broken.jpg"}))
    (catalog / "products.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "img8"
    assert main(["bundle", "quantize", "--bundle", str(tiny_bundle), "--out", str(out), "--graphs", "image",
                 "--catalog", str(catalog), "--min-image-cosine", "0", "--json"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    record = json.loads(printed)["quantization"]["image"]  # calibration progress does not pollute the JSON
    assert record["calibration_images"] == 8 and record["checks"] == 4  # the broken photo is passed over


def test_without_the_onnx_package_the_refusal_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from vitrine.runtime import quantize

    monkeypatch.setitem(sys.modules, "onnx", None)  # what a serving-only install looks like
    with pytest.raises(UserError, match="pip install onnx"):
        quantize.quantize_graph_int8(Path("in.onnx"), Path("out.onnx"))
