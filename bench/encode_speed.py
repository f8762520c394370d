"""Encoder speed: the ONNX bundle (onnxruntime, no padding) vs the torch model, on 2 CPU threads.

    python3 bench/encode_speed.py --out bench/out [--bundle DIR] [--catalog DIR]

Text: one query at a time over real catalog titles, tokenisation included; torch padded
to the tokenizer's max length (how a fixed-shape export would run) and unpadded.
Image: encoder throughput on preprocessed pixels at batch 1 and 16, plus the bundle
end to end (numpy/Pillow preprocessing of real photos included).
Without --bundle an untrained fashion-lite is exported to a temporary directory first
(speed does not depend on the weights). Writes encode_speed.json and encode_speed.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import environment, latency_stats, throughput, time_interleaved, write_json, write_markdown_table  # noqa: E402

TEXT_P50_TARGET_MS = 5.0
TEXT_SPEEDUP_TARGET = 5.0
IMAGE_TARGET_PER_S = 100.0
DEFAULT_CATALOG = REPO.parent / "shared" / "data" / "fashion-products"


def sample_products(catalog: Path, n: int, seed: int = 0) -> list[tuple[str, Path]]:
    """(title, image path) of `n` products picked at random from a products.jsonl catalog."""
    path = catalog / "products.jsonl" if catalog.is_dir() else catalog
    if not path.is_file():
        sys.exit(f"encode_speed: no products.jsonl at {catalog} (pass --catalog or set VITRINE_DATA)")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            image = row.get("image") or (row.get("images") or [None])[0]
            if row.get("title") and image and (path.parent / image).is_file():
                rows.append((row["title"], path.parent / image))
    random.Random(seed).shuffle(rows)
    return rows[:n]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--bundle", type=Path, help="an exported bundle (default: export untrained fashion-lite)")
    parser.add_argument("--model", default="fashion-lite", help="model config to export / compare against")
    parser.add_argument("--catalog", type=Path, default=Path(os.environ.get("VITRINE_DATA", DEFAULT_CATALOG)))
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum run time of each throughput measurement")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from trainer.factory import create_model, get_tokenizer
    from vitrine.catalog.product import FileImage
    from vitrine.runtime import load_bundle, preprocess_images

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    products = sample_products(args.catalog, args.queries)
    titles = [title for title, _ in products]

    tmp = None
    bundle_dir = args.bundle
    model_name = args.model
    if bundle_dir is None:
        from trainer.export import export_bundle

        tmp = tempfile.TemporaryDirectory(prefix="vitrine-bench-")
        print(f"exporting untrained {model_name} ...", file=sys.stderr)
        model = create_model(model_name, pretrained="none")
        bundle_dir = export_bundle(model, get_tokenizer(model_name), Path(tmp.name) / "bundle", name=model_name)
    bundle = load_bundle(bundle_dir, threads=args.threads)
    if args.bundle is not None:
        model_name = bundle.model_name
        model = create_model(model_name, pretrained="none", pruning=bool(bundle.manifest.pruning is True))
    model.eval()
    tokenizer = get_tokenizer(model_name)

    # -- text: one query at a time -----------------------------------------------------------------
    def torch_query(padding: str):
        def run(text: str) -> object:
            with torch.inference_mode():
                return model.encode_text(tokenizer([text], padding=padding))
        return run

    timings = time_interleaved(
        {
            "onnx_unpadded": lambda t: bundle.encode_texts([t]),
            "torch_padded": torch_query("max_length"),
            "torch_unpadded": torch_query("longest"),
        },
        titles,
    )
    text = {name: latency_stats(times) for name, times in timings.items()}
    token_lengths = [len(r) for r in bundle.text.tokenizer.encode_rows(titles)]

    # -- images: encoder throughput and bundle end to end --------------------------------------------
    photos = [FileImage(p).open() for _, p in products[:16]]
    pixels = preprocess_images(photos, bundle.manifest.preprocess)
    pixels_t = torch.from_numpy(pixels)

    def torch_images(batch: np.ndarray):
        def run() -> object:
            with torch.inference_mode():
                return model.encode_image(batch)
        return run

    image = {}
    for batch in (1, 16):
        image[f"onnx_b{batch}"] = throughput(lambda b=batch: bundle.image.encode_pixels(pixels[:b]), batch, min_seconds=args.seconds)
        image[f"torch_b{batch}"] = throughput(torch_images(pixels_t[:batch]), batch, min_seconds=args.seconds)
    image["onnx_end_to_end_b16"] = throughput(lambda: bundle.encode_images(photos), 16, min_seconds=args.seconds)

    onnx_p50 = text["onnx_unpadded"].p50_ms
    speedup = text["torch_padded"].p50_ms / onnx_p50
    image16 = image["onnx_b16"]["items_per_s"]
    targets = {
        "text_p50_ms": {"target": f"<= {TEXT_P50_TARGET_MS:g} ms", "value": onnx_p50, "met": onnx_p50 <= TEXT_P50_TARGET_MS},
        "text_speedup_vs_torch_padded": {"target": f">= {TEXT_SPEEDUP_TARGET:g}x", "value": speedup, "met": speedup >= TEXT_SPEEDUP_TARGET},
        "image_per_s_b16": {"target": f">= {IMAGE_TARGET_PER_S:g} img/s", "value": image16, "met": image16 >= IMAGE_TARGET_PER_S},
    }
    result = {
        "model": model_name,
        "bundle": str(args.bundle) if args.bundle else "untrained export (temporary)",
        "fingerprint": bundle.fingerprint,
        "pruning": bundle.manifest.pruning,
        "threads": args.threads,
        "queries": len(titles),
        "token_length": {"mean": float(np.mean(token_lengths)), "max": int(max(token_lengths)), "max_length": bundle.manifest.tokenizer.max_length},
        "text_latency_ms": {k: v.as_dict() for k, v in text.items()},
        "image_throughput": image,
        "targets": targets,
        "environment": environment(),
        "seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "encode_speed.json", result)

    def verdict(key: str) -> str:
        return "met" if targets[key]["met"] else "missed"

    torch_b16 = image["torch_b16"]["items_per_s"]
    rows = [
        ["text query p50 (ms)", onnx_p50, text["torch_padded"].p50_ms, text["torch_unpadded"].p50_ms, f"<= {TEXT_P50_TARGET_MS:g} ms", verdict("text_p50_ms")],
        ["text query p99 (ms)", text["onnx_unpadded"].p99_ms, text["torch_padded"].p99_ms, text["torch_unpadded"].p99_ms, "", ""],
        ["text query min (ms), best case on a busy machine", text["onnx_unpadded"].min_ms, text["torch_padded"].min_ms, text["torch_unpadded"].min_ms, "", ""],
        ["text speedup vs torch padded (p50)", f"{speedup:.1f}x", "1.0x", f"{text['torch_padded'].p50_ms / text['torch_unpadded'].p50_ms:.1f}x", f">= {TEXT_SPEEDUP_TARGET:g}x", verdict("text_speedup_vs_torch_padded")],
        ["image img/s, batch 1", image["onnx_b1"]["items_per_s"], image["torch_b1"]["items_per_s"], "", "", ""],
        ["image img/s, batch 16", image16, torch_b16, "", f">= {IMAGE_TARGET_PER_S:g} img/s", verdict("image_per_s_b16")],
        ["image img/s, batch 16, with preprocessing", image["onnx_end_to_end_b16"]["items_per_s"], "", "", "", ""],
    ]
    write_markdown_table(
        args.out / "encode_speed.md",
        ["measure", "ONNX (bundle)", "torch padded", "torch unpadded", "target", "status"],
        rows,
        title=f"Encoder speed: {model_name}, {args.threads} CPU threads",
        notes=[
            f"{len(titles)} real catalog titles, one query at a time, tokenisation included; "
            f"mean {np.mean(token_lengths):.1f} tokens, torch padded to max_length {bundle.manifest.tokenizer.max_length}",
            "image rows time the encoder on preprocessed 224 px pixels, except the last (numpy/Pillow preprocessing included)",
            f"torch image throughput is the same model in eval mode (batch 16: {torch_b16:.1f} img/s)",
            f"machine: {result['environment']['processor']}, {result['environment']['cpu_count']} CPUs, "
            f"load average {load_before:.1f} before / {result['environment']['load_average_1m']:.1f} after; bundle {bundle.fingerprint}",
        ],
    )
    print((args.out / "encode_speed.md").read_text())
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
