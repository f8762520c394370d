"""The table of reranker arms run by `bench/rerank_arm.sh`: one row per arm, mean ± std over its seeds.

    python3 bench/rerank_arms.py both400 both4000bf [--work runs/r12/arms] [--split test] [--out bench/out/r12-arms]

Each seed's prior weight w is the one its val sweep picks (`best_prior_weight`); with `--split test` the
row reads the test sweep at that w, so test never chooses anything. Writes `rerank_arms.json` and `.md`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mean_std, write_json, write_markdown_table  # noqa: E402

from vitrine.evaluation.rerank import best_prior_weight  # noqa: E402

FIXED_W = 15.0  # the weight every arm is also read at, so arms compare where the learned term acts


def at_weight(sweep: dict, key: str, w: float) -> float:
    return float(sweep[key][sweep["weights"].index(w)])


def seed_row(run: Path, split: str) -> dict[str, float]:
    val = json.loads((run / "val" / "rerank.json").read_text())
    rep = val if split == "val" else json.loads((run / split / "rerank.json").read_text())
    sweep = rep["prior_sweep"]
    w = best_prior_weight(val["prior_sweep"])
    row = {
        "w": w,
        "t2i_at_w": at_weight(sweep, "t2i_R@1", w),
        "t2p_at_w": at_weight(sweep, "t2p_nDCG@10", w),
        "t2i_fixed": at_weight(sweep, "t2i_R@1", FIXED_W),
        "t2p_fixed": at_weight(sweep, "t2p_nDCG@10", FIXED_W),
        "t2i_cross": rep["t2i_sample"]["cross_only"]["R@1"],
        "t2p_cross": rep["t2p"]["cross_only"]["nDCG@10"],
        "t2i_dual": rep["t2i_sample"]["dual_encoder"]["R@1"],
        "t2p_dual": rep["t2p"]["dual_encoder"]["nDCG@10"],
        "tia_random": rep["tia"]["random"]["auc"],
        "tia_swap": rep["tia"]["attribute_swap"]["auc"],
        "tia_random_dual": rep["tia"]["random"]["dual_encoder_auc"],
        "tia_swap_dual": rep["tia"]["attribute_swap"]["dual_encoder_auc"],
    }
    summary = run / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        for key in ("first_group_acc", "final_group_acc"):
            if key in s:
                row[key] = float(s[key])
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arms", nargs="+", help="arm names; each arm's seeds are WORK/NAME-s*")
    ap.add_argument("--work", default="runs/r12/arms")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--out", default="bench/out/r12-arms")
    args = ap.parse_args(argv)

    rows, report = [], {"split": args.split, "fixed_w": FIXED_W, "arms": {}}
    for arm in args.arms:
        runs = [r for r in sorted(Path(args.work).glob(f"{arm}-s*")) if all((r / split / "rerank.json").is_file() for split in ("val", args.split))]
        if not runs:
            raise SystemExit(f"no evaluated seeds of {arm!r} under {args.work}")
        seeds = [seed_row(r, args.split) for r in runs]
        report["arms"][arm] = {r.name: s for r, s in zip(runs, seeds)}
        col = {k: [s[k] for s in seeds if k in s] for k in seeds[0]}
        percent = lambda k: mean_std([100 * v for v in col[k]], 1)  # noqa: E731
        rows.append([
            arm, str(len(seeds)), " / ".join(f"{w:g}" for w in col["w"]),
            f"{percent('t2i_at_w')} ({percent('t2i_dual')})", f"{percent('t2p_at_w')} ({percent('t2p_dual')})",
            f"{percent('t2i_fixed')} / {percent('t2p_fixed')}", f"{percent('t2i_cross')} / {percent('t2p_cross')}",
            f"{mean_std(col['tia_random'], 3)} / {mean_std(col['tia_swap'], 3)} ({mean_std(col['tia_random_dual'], 3)} / {mean_std(col['tia_swap_dual'], 3)})",
            f"{mean_std(col['first_group_acc'], 3)} → {mean_std(col['final_group_acc'], 3)}" if col.get("final_group_acc") else "-",
        ])
    headers = ["arm", "seeds", "w picked on val", "T2I R@1 at w (dual)", "T2P nDCG@10 at w (dual)",
               f"T2I / T2P at w = {FIXED_W:g}", "cross-only T2I / T2P", "TIA AUC random / swap (dual)",
               "group acc first → last 10 %"]
    out = Path(args.out)
    write_json(out / "rerank_arms.json", report)
    write_markdown_table(out / "rerank_arms.md", headers, rows, title=f"Reranker arms ({args.split})")
    print((out / "rerank_arms.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
