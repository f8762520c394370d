"""The quality tables of the cached-token recipe, from scratch (issue 11): mean ± std over seeds.

Every (row, seed) trains on `train` and keeps its best epoch on `val`. The ablation table compares
rows on `val` (the metrics of that best epoch: choices are made on val). Rows in --test-rows are also
exported to a bundle and scored on `test` with `vitrine eval` (sample, full, KAGL, T2P, I2P): that
is the reported quality. Stages already done (summary.json, the bundle's manifest, metrics.json) are
skipped, so the script can be stopped and re-run; the frozen towers' token states are cached once in
--cache-dir and shared by every row.

    python3 bench/quality.py --rows itc,mp,attr,hard --test-rows mp --seeds 0,1,2   # bench/out/quality.{json,md}
    make quality
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, mean_std, pct, run_logged, write_json, write_markdown_table  # noqa: E402

MODEL = ["--model", "fashion-lite-ap"]
APR = ["--model", "fashion-lite-apr"]
ROWS = {
    "itc": ("attention heads, plain InfoNCE", [*MODEL, "--no-multi-positive"]),
    "mp": ("attention heads, multi-positive InfoNCE", MODEL),
    "attr": ("mp + attribute heads (0.1)", [*MODEL, "--attr-weight", "0.1"]),
    "hard": ("mp + same-type hard negatives (25 %)", [*MODEL, "--hard-negatives", "0.25"]),
    "attr+hard": ("mp + attribute heads + hard negatives", [*MODEL, "--attr-weight", "0.1", "--hard-negatives", "0.25"]),
    "views": ("mp + 2 augmented views per training photo", [*MODEL, "--image-views", "3"]),
    "res": ("mp + a linear path from the mean-pooled tokens (fashion-lite-apr)", ["--model", "fashion-lite-apr"]),
    # Unlocking (issue 11, item 3): what trains above the cache boundary, on top of `res`.
    # = fashion-lite-apc, the default (same config; spelled as flags so the rows share the apr caches)
    "convsum": ("res, image residual from the pooled conv head (frozen; fashion-lite-apc)", [*APR, "--image-summary", "conv_head"]),
    "convhead": ("convsum + the conv head trained (image group 1)", [*APR, "--image-summary", "conv_head", "--image-unlocked-groups", "1"]),
    "stage": ("res + the last block stage trained (image group 2)", [*APR, "--image-unlocked-groups", "2"]),
    "text2": ("res + the top 2 MiniLM layers trained", [*APR, "--text-unlocked-layers", "2"]),
    "textall": ("res + all 6 MiniLM layers trained", [*APR, "--text-unlocked-layers", "-1"]),
    "textall-bf16": ("textall under bf16 autocast (this CPU's AMX; the fp32 run takes ~25 min of training)",
                     [*APR, "--text-unlocked-layers", "-1", "--amp", "bf16"]),
    "unlock": ("res + conv head, last block stage and top 2 MiniLM layers trained",
               [*APR, "--image-summary", "conv_head", "--image-unlocked-groups", "2", "--text-unlocked-layers", "2"]),
}
# Tower learning rates (the lever left open by `unlock`, whose best epoch was always the last): the unlocked
# towers at 3x and 10x the default image / text lr (1e-4 / 3e-5).
UNLOCK = ["--image-summary", "conv_head", "--image-unlocked-groups", "2", "--text-unlocked-layers", "2"]
for _x, (_ilr, _tlr) in {"3": ("3e-4", "1e-4"), "10": ("1e-3", "3e-4")}.items():
    ROWS[f"unlock-lr{_x}"] = (f"unlock, tower lr x{_x} (image {_ilr}, text {_tlr})",
                              [*APR, *UNLOCK, "--image-lr", _ilr, "--text-lr", _tlr])
    ROWS[f"unlock-img{_x}"] = (f"unlock, image tower lr x{_x} ({_ilr}), text tower lr 3e-5",
                               [*APR, *UNLOCK, "--image-lr", _ilr])
# Shopper queries spelled from each training product's attributes, scored against the batch's matching products
# (trainer.shopper_queries), on top of unlock-lr10 (the fashion-lite-apu default), weight w.
for _w in ("0.1", "0.3", "1"):
    ROWS[f"lr10-q{_w}"] = (f"unlock-lr10 + shopper-query loss, weight {_w}",
                           [*APR, *UNLOCK, "--image-lr", "1e-3", "--text-lr", "3e-4", "--query-weight", _w])
# Augmented views (issue 11, item 1): v - 1 cached re-shoots (crop, flip, colour, JPEG) of each training photo on top
# of lr10-q0.1 (the default); each epoch reads every photo in one of its v views.
for _v in ("2", "3"):
    ROWS[f"lr10-q0.1-v{_v}"] = (f"lr10-q0.1 + {int(_v) - 1} augmented view(s) per training photo",
                                [*APR, *UNLOCK, "--image-lr", "1e-3", "--text-lr", "3e-4", "--query-weight", "0.1",
                                 "--image-views", _v])
# Longer runs (the GPU sweep's rows, bench/gpu_sweep.py; on this CPU each takes over an hour): 30 epochs, alone and
# with the 3-view row's augmentation.
ROWS["lr10-q0.1-e30"] = ("lr10-q0.1, 30 epochs", [*ROWS["lr10-q0.1"][1], "--epochs", "30"])
ROWS["lr10-q0.1-v3-e30"] = ("lr10-q0.1-v3, 30 epochs", [*ROWS["lr10-q0.1-v3"][1], "--epochs", "30"])
# The default as `vitrine train` runs it with no flags (fashion-lite-apu's recipe_cfg: 15 epochs, one augmented view,
# bf16 autocast where the CPU runs it natively); its caches are its own, so seed 0 times a run from scratch.
ROWS["apu"] = ("the default, no flags (fashion-lite-apu: lr10-q0.1 + 1 augmented view, 15 epochs, bf16)", [])
# The same loss for the demo's quick model (fashion-lite-apr, towers frozen: only the heads learn from it).
ROWS["apr-q0.1"] = ("res (the demo's quick model) + shopper-query loss, weight 0.1", [*APR, "--query-weight", "0.1"])
# FashionKLIP CVA (item 4): weight w and warm-up epochs on top of `res`; w = 1 without warm-up is the paper's
# ½(L_ITC + L_CVA) up to a constant factor, which AdamW's step normalisation removes.
for _w in ("0.1", "0.3", "1"):
    for _warm in ("0", "2"):
        ROWS[f"cva-w{_w}-warm{_warm}"] = (f"res + CVA, weight {_w}, {_warm} warm-up epochs",
                                           [*APR, "--cva", "--cva-weight", _w, "--cva-warmup", _warm])
# MML-TP (item 5): gates on the 2 trained MiniLM layers of `text2`; τ starts at a quantile q of each layer's
# token importance, temperature T (1e-4 is the config's, a near-step gate).
for _q in ("0.1", "0.3"):
    for _t in ("1e-2", "1e-3", "1e-4"):
        ROWS[f"prune-q{_q}-t{_t}"] = (f"text2 + MML-TP, τ at quantile {_q}, T {_t}",
                                       [*APR, "--text-unlocked-layers", "2", "--prune", "--prune-quantile", _q,
                                        "--prune-temperature", _t])
VAL_HEADLINE = {
    "val sample T2I R@1": "sample_t2i_R@1",
    "val sample I2T R@1": "sample_i2t_R@1",
    "val full T2I R@10": "full_t2i_R@10",
    "val full I2T R@10": "full_i2t_R@10",
}
HEADLINE = {
    "sample T2I R@1": ("retrieval", "sample", "t2i", "R@1"),
    "sample I2T R@1": ("retrieval", "sample", "i2t", "R@1"),
    "full T2I R@10": ("retrieval", "full", "t2i", "R@10"),
    "T2P nDCG@10": ("product_search", "t2p", "nDCG@10"),
    "KAGL MRR@10": ("kagl", "MRR@10"),
    "KAGL R@1": ("kagl", "R@1"),
    "I2P R@1": ("product_search", "i2p", "R@1"),
}


def metric(metrics: dict, path: tuple[str, ...]) -> float:
    value = metrics
    for key in path:
        value = value[key]
    return pct(value)


def write_tables(args: argparse.Namespace, raw: dict, val_table: list[dict], test_table: list[dict]) -> None:
    meta = {"date": date.today().isoformat(), "epochs": args.epochs or "recipe default", "seeds": args.seeds,
            "catalog": args.catalog}  # fmt: skip
    write_json(Path(args.out) / "quality.json", {"meta": meta, "environment": environment(), "rows": raw})
    notes = [f"{k}: {v}" for k, v in meta.items()]
    headers = list(val_table[0])
    write_markdown_table(Path(args.out) / "quality-val.md", headers, [[r[h] for h in headers] for r in val_table],
                         title="Cached-token recipe: ablation on val (best epoch, mean ± std over seeds)", notes=notes)
    if test_table:
        headers = list(test_table[0])
        write_markdown_table(Path(args.out) / "quality-test.md", headers, [[r[h] for h in headers] for r in test_table],
                             title="Cached-token recipe on test (mean ± std over seeds)", notes=notes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", default="../shared/data/fashion-products")
    ap.add_argument("--rows", default="itc,mp,attr,hard")
    ap.add_argument("--test-rows", default="mp", help="rows also exported and scored on test")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None, help="default: the recipe's (30)")
    ap.add_argument("--runs", default="runs/quality")
    ap.add_argument("--bundles", default="bundles/quality")
    ap.add_argument("--cache-dir", default="runs/cache")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()

    vitrine = [sys.executable, "-m", "vitrine.cli"]
    seeds = [int(s) for s in args.seeds.split(",")]
    test_rows = set(args.test_rows.split(",")) if args.test_rows else set()
    val_table, test_table, raw = [], [], {}
    for row in args.rows.split(","):
        name, flags = ROWS[row]
        val: dict[str, list[float]] = {k: [] for k in [*VAL_HEADLINE, "val T2P nDCG@10", "val I2P R@1"]}
        test: dict[str, list[float]] = {k: [] for k in HEADLINE}
        seconds: list[float] = []
        for seed in seeds:
            run_dir, bundle = Path(args.runs) / row / f"seed{seed}", Path(args.bundles) / row / f"seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            log = run_dir / "quality.log"
            epochs = ["--epochs", str(args.epochs)] if args.epochs else []
            if not (run_dir / "summary.json").is_file():
                run_logged(vitrine + ["train", "--catalog", args.catalog, "--out", str(run_dir), "--seed", str(seed),
                                      "--cache-dir", args.cache_dir, "--no-progress", *epochs, *flags], log)  # fmt: skip
            summary = json.loads((run_dir / "summary.json").read_text())
            for key, name_in_val in VAL_HEADLINE.items():
                val[key].append(pct(summary["val"][name_in_val]))
            # Product search on val at the α tuned per query kind (the best point of the α sweep).
            val["val T2P nDCG@10"].append(pct(max(r["t2p_nDCG@10"] for r in summary["alpha"]["sweep"])))
            val["val I2P R@1"].append(pct(max(r["i2p_R@1"] for r in summary["alpha"]["sweep"])))
            seconds.append(sum(summary.get("stage_seconds", {}).values()) or summary["train_seconds"])
            if row not in test_rows:
                continue
            if not (bundle / "manifest.json").is_file():
                run_logged(vitrine + ["export", "--checkpoint", str(run_dir / "best.pt"), "--out", str(bundle),
                                      "--catalog", args.catalog], log)  # fmt: skip
            eval_dir = run_dir / "eval-test"
            if not (eval_dir / "metrics.json").is_file():
                run_logged(vitrine + ["eval", "--catalog", args.catalog, "--split", "test", "--bundle", str(bundle),
                                      "--seed", "0", "--out", str(eval_dir)], log)  # fmt: skip
            metrics = json.loads((eval_dir / "metrics.json").read_text())
            for key, path in HEADLINE.items():
                test[key].append(metric(metrics, path))
        raw[row] = {"name": name, "flags": flags, "seeds": seeds, "val": val, "test": test if row in test_rows else None,
                    "run_seconds": seconds}  # fmt: skip
        val_table.append({"row": row, "method": name, **{k: mean_std(v) for k, v in val.items()},
                          "run s (mean)": round(statistics.mean(seconds)), "seeds": len(seeds)})  # fmt: skip
        if row in test_rows:
            test_table.append({"row": row, "method": name, **{k: mean_std(v) for k, v in test.items()}, "seeds": len(seeds)})
        write_tables(args, raw, val_table, test_table)  # after every row: a stopped run keeps what it measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
