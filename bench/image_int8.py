"""The int8 image trunk against the float image graph: graph latency and index build speed, side by side.

    vitrine bundle quantize --bundle B --out B-int8 --graphs image --catalog C     # the copy to measure
    python3 bench/image_int8.py --float B --int8 B-int8 [--limit 4000] [--rounds 2] --out bench/out/image-int8

Graph latency: the image graph alone on preprocessed val photos, batch 1 (an image query) and batch 64 (the
index build's batch), the two graphs taking turns on each batch. Index build: `vitrine index --limit N` of
the catalog with each bundle, alternating, `--rounds` times each; products/s is the build's embedding rate
(decode, preprocessing and the graph). Quality is `vitrine eval` on each bundle (docs/RESULTS.md).
Writes image_int8.json and image_int8.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import environment, latency_stats, time_interleaved, write_json, write_markdown_table

DEFAULT_CATALOG = REPO.parent / "shared" / "data" / "fashion-products"
BUILD_TARGET = 100.0  # products/s (issue 12)


def graph_latency(bundles: dict[str, Path], catalog: Path, photos: int, threads: int) -> dict[str, dict]:
    import numpy as np

    from vitrine.catalog.registry import read_catalog
    from vitrine.runtime import read_manifest
    from vitrine.runtime.preprocess import preprocess_images
    from vitrine.runtime.session import make_session

    manifests = {name: read_manifest(path) for name, path in bundles.items()}
    first = next(iter(manifests.values()))
    products = read_catalog(catalog, split="val").products[:photos]
    pixels = preprocess_images([p.image.open() for p in products], first.preprocess)
    sessions = {name: make_session(bundles[name] / m.image_encoder.file, threads=threads) for name, m in manifests.items()}
    feed = first.image_encoder.input_name
    out = {}
    for batch in (1, 64):
        inputs = [np.ascontiguousarray(pixels[i : i + batch]) for i in range(0, len(pixels) - batch + 1, batch)]
        times = time_interleaved({n: (lambda x, s=s: s.run(None, {feed: x})) for n, s in sessions.items()}, inputs)
        for name, seconds in times.items():
            out.setdefault(name, {})[f"batch{batch}"] = {**latency_stats(seconds).as_dict(), "calls": len(seconds),
                                                         "images_per_s": batch / statistics.median(seconds)}  # fmt: skip
    return out


def build_speed(bundles: dict[str, Path], catalog: Path, limit: int, rounds: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {name: [] for name in bundles}
    work = Path(tempfile.mkdtemp(prefix="image-int8-"))
    try:
        for _ in range(rounds):
            for name, bundle in bundles.items():
                index = work / name
                shutil.rmtree(index, ignore_errors=True)
                cmd = [sys.executable, "-m", "vitrine.cli", "index", "--bundle", str(bundle), "--catalog", str(catalog),
                       "--limit", str(limit), "--out", str(index), "--json"]  # fmt: skip
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                op = json.loads(done.stdout)["operation"]
                runs[name].append({k: op[k] for k in ("products_per_s", "embed_seconds", "seconds", "embedded")})
                print(f"{name}: {op['products_per_s']} products/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--float", dest="float_bundle", type=Path, required=True)
    ap.add_argument("--int8", dest="int8_bundle", type=Path, required=True)
    ap.add_argument("--catalog", type=Path, default=Path(os.environ.get("VITRINE_DATA", DEFAULT_CATALOG)))
    ap.add_argument("--limit", type=int, default=4000, help="products per index build")
    ap.add_argument("--rounds", type=int, default=2, help="builds per bundle, alternating")
    ap.add_argument("--photos", type=int, default=256, help="val photos for the graph latency")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "image-int8")
    args = ap.parse_args()

    bundles = {"float": args.float_bundle, "int8 trunk": args.int8_bundle}
    latency = graph_latency(bundles, args.catalog, args.photos, args.threads)
    builds = build_speed(bundles, args.catalog, args.limit, args.rounds)
    rate = {name: statistics.mean(r["products_per_s"] for r in runs) for name, runs in builds.items()}
    result = {"environment": environment(), "args": {k: str(v) for k, v in vars(args).items()},
              "graph_latency": latency, "index_build": builds, "build_products_per_s": rate,
              "build_speedup": rate["int8 trunk"] / rate["float"], "build_target": BUILD_TARGET}  # fmt: skip
    write_json(args.out / "image_int8.json", result)
    rows = []
    for name in bundles:
        b1, b64 = latency[name]["batch1"], latency[name]["batch64"]
        rows.append([name, f"{b1['p50_ms']:.2f}", f"{b64['p50_ms'] / 64:.2f}", f"{rate[name]:.1f}",
                     " / ".join(f"{r['products_per_s']:.1f}" for r in builds[name]),
                     "met" if rate[name] >= BUILD_TARGET else "missed"])  # fmt: skip
    write_markdown_table(args.out / "image_int8.md",
                         ["image graph", "batch 1 p50 ms", "batch 64 p50 ms / image", "build products/s (mean)",
                          "per round", f">= {BUILD_TARGET:.0f}"], rows,
                         title="int8 image trunk against the float graph (side by side)",
                         notes=[(f"build speed-up {result['build_speedup']:.2f}x; {args.limit} products a build, "
                                 f"{args.rounds} rounds; {args.threads} threads")])  # fmt: skip
    print((args.out / "image_int8.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
