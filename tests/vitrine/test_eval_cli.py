"""`vitrine eval` end to end: options, errors, outputs, and a smoke run on the shared catalog."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.encoders import ColourHashEncoder
from vitrine.errors import UserError
from vitrine.evaluation.cli import register
from vitrine.evaluation.encoder import EncoderError
from vitrine.scoring import Alphas

ENCODER = "tests.support.encoders:ColourHashEncoder"
OUTPUTS = ("metrics.json", "metrics.md", "recall_at_k.png")
COLOURS = {"Red": (200, 30, 30), "Blue": (40, 90, 200), "Green": (40, 140, 60), "Black": (20, 20, 20)}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="vitrine")
    register(root.add_subparsers(dest="command", required=True))
    return root


def run_eval(*argv: str) -> int:
    args = parser().parse_args(["eval", *map(str, argv)])
    return args.func(args)


def make_catalog(root: Path, n: int = 16) -> Path:
    """A products.jsonl in the shared catalog's schema, with small Pillow JPEGs."""
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        article = ("Tshirts", "Shirts")[i % 2]
        gender = ("Men", "Women")[(i // 2) % 2]
        Image.new("RGB", (24, 32), COLOURS[colour]).save(root / "images" / f"{i}.jpg", quality=90)
        lines.append(json.dumps({
            "id": str(i), "split": "test", "gender": gender, "subCategory": "Topwear", "articleType": article,
            "baseColour": colour, "usage": "Casual", "title": f"Brand {gender} {colour} {article} {i // 8}",
            "image": f"images/{i}.jpg",
        }))  # fmt: skip
    (root / "products.jsonl").write_text("\n".join(lines) + "\n")
    return root


def fake_encoders(monkeypatch, **attrs) -> str:
    module = types.ModuleType("fake_encoders")
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, "fake_encoders", module)
    return "fake_encoders"


def load_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def walk_numbers(tree, path=""):
    """(path, value) for every number under the retrieval and product_search sections."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from walk_numbers(v, f"{path}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from walk_numbers(v, f"{path}/{i}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_help_documents_the_protocols():
    text = parser()._subparsers._group_actions[0].choices["eval"].format_help()
    phrases = ["sample", "full", "relevance by text", "Ties count against", "Score_t2p", "Score_i2p"]
    phrases += ["topped up", "min(10, relevant products)", "--bundle", "--encoder", "--limit"]
    for phrase in phrases:
        assert phrase in text, phrase


def test_eval_writes_all_outputs_on_a_small_catalog(tmp_path, capsys):
    catalog = make_catalog(tmp_path / "catalog")
    out = tmp_path / "out"
    assert (
        run_eval("--catalog", catalog, "--encoder", ENCODER, "--out", out, "--candidates", "5", "--seed", "3")
        == 0
    )
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0
    report = load_metrics(out)
    assert report["config"]["split"] == "test" and report["config"]["seed"] == 3
    assert report["counts"]["products"] == 16 and report["counts"]["distinct_texts"] == 8  # titles repeat
    assert set(report["retrieval"]) == {"sample", "full"} and set(report["product_search"]) == {"t2p", "i2p"}
    assert report["retrieval"]["sample"]["t2i"]["candidates_per_query"] == 6
    assert "| sample | T2I" in (out / "metrics.md").read_text()
    assert Image.open(out / "recall_at_k.png").format == "PNG"
    assert "R@10" in capsys.readouterr().out


def test_protocol_subset_alpha_and_limit(tmp_path):
    catalog = make_catalog(tmp_path / "catalog")
    out = tmp_path / "out"
    run_eval(
        "--catalog",
        catalog,
        "--encoder",
        ENCODER,
        "--out",
        out,
        "--protocols",
        "full,i2p",
        "--alpha",
        "0.2",
        "--limit",
        "10",
    )
    report = load_metrics(out)
    assert list(report["retrieval"]) == ["full"] and list(report["product_search"]) == ["i2p"]
    assert report["config"]["alpha"] == {"t2p": 0.2, "i2p": 0.2} and report["product_search"]["i2p"]["alpha"] == 0.2
    assert report["counts"]["products"] == 10


def test_encoder_alpha_attribute_is_used_unless_overridden(tmp_path, monkeypatch):
    class Tuned(ColourHashEncoder):
        alphas = Alphas(0.7)

    module = fake_encoders(monkeypatch, Tuned=Tuned)
    catalog = make_catalog(tmp_path / "catalog")
    run_eval(
        "--catalog", catalog, "--encoder", f"{module}:Tuned", "--out", tmp_path / "a", "--protocols", "t2p"
    )
    assert load_metrics(tmp_path / "a")["product_search"]["t2p"]["alpha"] == 0.7
    run_eval(
        "--catalog",
        catalog,
        "--encoder",
        f"{module}:Tuned",
        "--out",
        tmp_path / "b",
        "--protocols",
        "t2p",
        "--alpha",
        "0",
    )
    assert load_metrics(tmp_path / "b")["product_search"]["t2p"]["alpha"] == 0.0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon", "MODULE:ATTR"),
        ("no_such_module_xyz:Encoder", "cannot import"),
        ("tests.support.encoders:Missing", "no attribute"),
        ("tests.support.encoders:COLOURS", "lacks encode_texts"),
    ],
)
def test_bad_encoder_specs_are_clear_errors(tmp_path, spec, message):
    catalog = make_catalog(tmp_path / "catalog")
    with pytest.raises(EncoderError, match=message):
        run_eval("--catalog", catalog, "--encoder", spec, "--out", tmp_path / "out")


def test_missing_bundle_is_a_clear_error(tmp_path):
    catalog = make_catalog(tmp_path / "catalog")
    with pytest.raises(EncoderError, match="not found"):
        run_eval("--catalog", catalog, "--bundle", tmp_path / "missing", "--out", tmp_path / "out")


def test_malformed_encoder_output_is_caught_at_the_boundary(tmp_path, monkeypatch):
    class Unnormalised(ColourHashEncoder):
        def encode_texts(self, texts):
            return super().encode_texts(texts) * 2

    class WrongDtype(ColourHashEncoder):
        def encode_images(self, images):
            return super().encode_images(images).astype(np.float64)

    class WrongCount(ColourHashEncoder):
        def encode_texts(self, texts):
            return super().encode_texts(texts)[:-1]

    module = fake_encoders(
        monkeypatch, Unnormalised=Unnormalised, WrongDtype=WrongDtype, WrongCount=WrongCount
    )
    catalog = make_catalog(tmp_path / "catalog")
    for name, message in (
        ("Unnormalised", "not L2-normalised"),
        ("WrongDtype", "float32"),
        ("WrongCount", "shape"),
    ):
        with pytest.raises(EncoderError, match=message):
            run_eval("--catalog", catalog, "--encoder", f"{module}:{name}", "--out", tmp_path / "out")


def test_bad_inputs_are_user_errors(tmp_path):
    catalog = make_catalog(tmp_path / "catalog")
    with pytest.raises(UserError, match="no products in split 'train'"):
        run_eval("--catalog", catalog, "--encoder", ENCODER, "--split", "train", "--out", tmp_path / "out")
    with pytest.raises(UserError, match="have no description"):
        run_eval(
            "--catalog",
            catalog,
            "--encoder",
            ENCODER,
            "--text-field",
            "description",
            "--out",
            tmp_path / "out",
        )
    with pytest.raises(UserError, match="at least 2 products"):
        run_eval("--catalog", catalog, "--encoder", ENCODER, "--limit", "1", "--out", tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="output folder"):
        run_eval(
            "--catalog", catalog, "--encoder", ENCODER, "--out", tmp_path / "file", "--protocols", "full"
        )


@pytest.mark.parametrize(
    "argv", [["--protocols", "sample,bogus"], ["--alpha", "1.5"], ["--queries", "0"], ["--batch-size", "x"]]
)
def test_bad_options_are_rejected_by_the_parser(tmp_path, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(
            ["eval", "--catalog", str(tmp_path), "--encoder", ENCODER, "--out", str(tmp_path), *argv]
        )
    assert exc.value.code == 2
    assert "vitrine eval: error" in capsys.readouterr().err


def test_smoke_on_300_shared_products_is_reproducible_and_beats_chance(fashion_products, tmp_path):
    base = [
        "--catalog",
        fashion_products,
        "--split",
        "train",
        "--limit",
        "300",
        "--encoder",
        ENCODER,
        "--seed",
        "0",
    ]
    run_eval(*base, "--out", tmp_path / "a")
    run_eval(*base, "--out", tmp_path / "b")
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).stat().st_size > 0
    a, b = load_metrics(tmp_path / "a"), load_metrics(tmp_path / "b")
    a.pop("timings_s"), b.pop("timings_s")
    assert a == b  # same seed, same metrics

    assert a["counts"]["products"] == 300
    rates = [
        (p, v)
        for section in ("retrieval", "product_search")
        for p, v in walk_numbers(a[section])
        if "R@" in p or "P@" in p or "nDCG" in p
    ]
    assert rates and all(0.0 <= v <= 1.0 for _, v in rates)
    sample, full, i2p = a["retrieval"]["sample"], a["retrieval"]["full"], a["product_search"]["i2p"]
    assert sample["t2i"]["queries"] == 300 and sample["t2i"]["candidates_per_query"] == 101
    assert sample["t2i"]["topped_up_queries"] > 0  # 300 products spread over ~20 article types
    # Chance levels: 10 of 101 candidates; about 10 of 300 products.
    assert sample["t2i"]["R@10"] > 1.5 * 10 / 101
    assert full["t2i"]["R@10"] > 1.5 * 10 / 300
    assert i2p["R@10"] > 3 * 10 / 300
    assert a["product_search"]["t2p"]["queries"] > 50


def test_encoder_modules_import_from_the_working_directory(tmp_path, monkeypatch):
    """The `vitrine` console script does not put the working directory on sys.path; --encoder does."""
    from vitrine.evaluation.encoder import load_encoder

    (tmp_path / "my_local_encoder.py").write_text("from tests.support.encoders import ColourHashEncoder as Local\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))] + [str(Path(__file__).parents[2])]
    )
    monkeypatch.delitem(sys.modules, "my_local_encoder", raising=False)
    encoder = load_encoder("my_local_encoder:Local")
    assert encoder.encode_texts(["red shirt"]).shape == (1, ColourHashEncoder.dim)


def test_per_task_alphas_are_used_for_t2p_and_i2p(tmp_path, monkeypatch):
    class TunedPerTask(ColourHashEncoder):
        alphas = Alphas(0.5, 0.9, 0.1)

    module = fake_encoders(monkeypatch, TunedPerTask=TunedPerTask)
    catalog = make_catalog(tmp_path / "catalog")
    run_eval("--catalog", catalog, "--encoder", f"{module}:TunedPerTask", "--out", tmp_path / "a",
             "--protocols", "t2p,i2p", "--limit", "10")
    report = load_metrics(tmp_path / "a")
    assert report["product_search"]["t2p"]["alpha"] == 0.9 and report["product_search"]["i2p"]["alpha"] == 0.1
    assert report["config"]["alpha"] == {"t2p": 0.9, "i2p": 0.1}


def test_kagl_protocol_on_the_split_and_on_a_gallery_catalog(tmp_path, monkeypatch):
    module = fake_encoders(monkeypatch, Plain=ColourHashEncoder)
    catalog = make_catalog(tmp_path / "catalog")
    run_eval("--catalog", catalog, "--encoder", f"{module}:Plain", "--out", tmp_path / "a", "--protocols", "kagl")
    report = load_metrics(tmp_path / "a")
    kagl = report["kagl"]
    assert kagl["gallery_source"] == "split" and kagl["queries"] >= 1 and 0.0 <= kagl["MRR@10"] <= 1.0
    assert kagl["R@1"] <= kagl["R@10"] and "KAGL protocol" in (tmp_path / "a" / "metrics.md").read_text()
    run_eval("--catalog", catalog, "--encoder", f"{module}:Plain", "--out", tmp_path / "b", "--protocols", "kagl",
             "--gallery-catalog", catalog)
    other = load_metrics(tmp_path / "b")
    assert other["kagl"]["gallery_source"] == "gallery catalog" and other["kagl"]["gallery"] >= kagl["gallery"]
    assert other["config"]["gallery_catalog"] == str(catalog)


def test_cli_protocol_names_match_the_harness():
    from vitrine.evaluation import cli, evaluator

    assert cli.PROTOCOLS == evaluator.PROTOCOLS
