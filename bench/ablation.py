"""Dual-encoder ablation of issue 3: rows (a)-(e) at the same seed and budget.

Each row trains on `train` (selected on `val`), exports a bundle, and is scored on `test`
with the evaluation harness. Stages already done (best.pt, bundle manifest, metrics.json)
are skipped, so the script can be stopped and re-run.

    python3 bench/ablation.py --catalog ../shared/data/fashion-products --rows a,b,c,d,e --epochs 3
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, pct, write_json, write_markdown_table  # noqa: E402
from common import run_logged as run  # noqa: E402

# The last 2 of MiniLM's 6 layers: full-tower backprop cost ~11 min/epoch on the shared 2-core box.
TEXT_TUNING = ["--model", "fashion-lite", "--text-unlocked-layers", "2", "--text-lr", "5e-5"]
ROWS = {
    "a": ("frozen towers, projections only", ["--model", "fashion-lite", "--text-unlocked-layers", "0"]),
    "b": ("+ text tower fine-tuned (ITC)", TEXT_TUNING),
    "c": ("+ CVA (FashionKLIP)", [*TEXT_TUNING, "--cva"]),
    "d": ("+ MML-TP token pruning", [*TEXT_TUNING, "--prune"]),
    "e": ("+ CVA + MML-TP", [*TEXT_TUNING, "--cva", "--prune"]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", default="../shared/data/fashion-products")
    ap.add_argument("--rows", default="a,b,c,d,e")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="runs/ablation")
    ap.add_argument("--bundles", default="bundles/ablation")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--train-only", action="store_true", help="skip export and test evaluation")
    args = ap.parse_args()

    vitrine = [sys.executable, "-m", "vitrine.cli"]
    table = []
    for row in args.rows.split(","):
        name, flags = ROWS[row]
        run_dir, bundle = Path(args.runs) / row, Path(args.bundles) / row
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "ablation.log"
        if not (run_dir / "summary.json").is_file():
            run(vitrine + ["train", "--catalog", args.catalog, "--out", str(run_dir), "--epochs", str(args.epochs),
                           "--seed", str(args.seed), "--no-progress", *flags], log)
        if args.train_only:
            continue
        if not (bundle / "manifest.json").is_file():
            run(vitrine + ["export", "--checkpoint", str(run_dir / "best.pt"), "--out", str(bundle),
                           "--catalog", args.catalog], log)
        eval_dir = run_dir / "eval-test"
        if not (eval_dir / "metrics.json").is_file():
            run(vitrine + ["eval", "--catalog", args.catalog, "--split", "test", "--bundle", str(bundle),
                           "--seed", str(args.seed), "--out", str(eval_dir)], log)
        summary = json.loads((run_dir / "summary.json").read_text())
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        table.append(row_of(row, name, summary, metrics))
    if table:
        meta = {"date": date.today().isoformat(), "epochs": args.epochs, "seed": args.seed, "catalog": args.catalog}
        write_json(Path(args.out) / "ablation.json", {"meta": meta, "environment": environment(), "rows": table})
        headers = list(table[0])
        write_markdown_table(Path(args.out) / "ablation.md", headers, [[r[h] for h in headers] for r in table],
                             title="Dual-encoder ablation on test", notes=[f"{k}: {v}" for k, v in meta.items()])
    return 0


def row_of(row: str, name: str, summary: dict, metrics: dict) -> dict:
    sample, full = metrics["retrieval"]["sample"], metrics["retrieval"]["full"]
    t2p, i2p = metrics["product_search"]["t2p"], metrics["product_search"]["i2p"]
    return {
        "row": row, "method": name,
        "sample T2I R@1": pct(sample["t2i"]["R@1"]), "sample I2T R@1": pct(sample["i2t"]["R@1"]),
        "sample T2I R@10": pct(sample["t2i"]["R@10"]), "sample I2T R@10": pct(sample["i2t"]["R@10"]),
        "full T2I R@1": pct(full["t2i"]["R@1"]), "full T2I R@10": pct(full["t2i"]["R@10"]),
        "full I2T R@1": pct(full["i2t"]["R@1"]), "full I2T R@10": pct(full["i2t"]["R@10"]),
        "T2P nDCG@10": pct(t2p["nDCG@10"]), "T2P P@10": pct(t2p["P@10"]),
        "I2P R@1": pct(i2p["R@1"]), "I2P R@10": pct(i2p["R@10"]),
        "α T2P / I2P": f'{t2p["alpha"]:g} / {i2p["alpha"]:g}', "prune at inference": summary.get("prune_at_inference", "-"),
        "train s": round(summary["train_seconds"]), "device": summary["device"],
    }


if __name__ == "__main__":
    sys.exit(main())
