"""Long runs of the default training recipe on a lent GPU machine, under a deadline (issue 11).

The CPU budget (30 minutes a run) caps the default at 15 epochs with one augmented view; on a GPU the same
recipe runs 30 epochs with more views in minutes. This script runs `vitrine train`'s own code path (same
flags, same defaults; bf16 autocast on CUDA) for each row in order while the deadline allows, then keeps
the best rows' trained tensors in files small enough to travel (`trainer.checkpoint_delta`), so they are
exported and evaluated on the CPU at home.

    python3 bench/gpu_sweep.py --catalog DATA --runs /tmp/runs --out OUT --deadline-s 420 \\
        --rows e30 e30-v3 e20-v3 --keep 2
    # at home: python3 -m trainer.checkpoint_delta restore OUT/<row>.delta-*.pt runs/gpu/<row>/best.pt
"""
from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, pct, write_json, write_markdown_table  # noqa: E402

# Rows: flags on top of `vitrine train`'s defaults (fashion-lite-apu's recipe_cfg); each row pins epochs, views and seed.
ROWS = {
    f"e{e}" + (f"-v{v}" if v > 1 else "") + (f"-s{s}" if s else ""): ["--epochs", str(e), "--image-views", str(v), "--seed", str(s)]
    for e in (10, 20, 30, 40)
    for v in (1, 3)
    for s in (0, 1, 2)
}  # fmt: skip


HEADERS = ["row", "device", "best epoch", "val sample T2I R@1", "val sample I2T R@1", "val full T2I R@10",
           "val T2P nDCG@10", "val I2P R@1", "train s", "wall s"]  # fmt: skip


def row_cells(name: str, r: dict) -> list:
    """One markdown row from a run's summary.json (T2P and I2P at the α val picked for each)."""
    if "val" not in r:
        return [name, r.get("skipped") or r.get("error"), *[""] * (len(HEADERS) - 2)]
    v, alpha = r["val"], r.get("alpha", {})
    at = {round(a["alpha"], 3): a for a in alpha.get("sweep", [])}
    t2p = at.get(round(alpha.get("alpha_t2p", -1), 3), {}).get("t2p_nDCG@10")
    i2p = at.get(round(alpha.get("alpha_i2p", -1), 3), {}).get("i2p_R@1")
    scored = [h for h in r.get("history", []) if "val" in h]
    best = max(scored, key=lambda h: h["val"]["score"])["epoch"] if scored else ""
    return [name, r.get("device", ""), best, pct(v["sample_t2i_R@1"]), pct(v["sample_i2t_R@1"]), pct(v["full_t2i_R@10"]),
            pct(t2p) if t2p is not None else "", pct(i2p) if i2p is not None else "",
            f"{r.get('train_seconds', 0):.0f}", r.get("wall_s", "")]  # fmt: skip


def train_args(name: str, flags: list[str], catalog: str, runs: Path, cache: Path) -> argparse.Namespace:
    """A row's arguments, parsed by `vitrine train`'s own parser (a bad flag exits here, before any row runs)."""
    from trainer.cli import register

    parser = argparse.ArgumentParser(prog="vitrine")
    register(parser.add_subparsers(dest="command"))
    argv = ["train", "--catalog", catalog, "--out", str(runs / name), "--cache-dir", str(cache), "--no-progress", *flags]
    args = parser.parse_args(argv)
    args.argv = argv
    return args


def train_row(name: str, args: argparse.Namespace, runs: Path) -> dict:
    """One `vitrine train` run in this process."""
    print("$ vitrine", shlex.join(args.argv), flush=True)
    started = time.perf_counter()
    args.func(args)
    summary = json.loads((runs / name / "summary.json").read_text())
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--runs", type=Path, required=True, help="run directories (large; stay on the machine)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="feature caches (default: RUNS/cache)")
    ap.add_argument("--out", type=Path, required=True, help="what comes home: sweep.json/.md and the kept deltas")
    ap.add_argument("--rows", nargs="+", required=True, choices=sorted(ROWS), metavar="ROW")
    ap.add_argument("--deadline-s", type=float, default=420.0, help="start no row after this many seconds")
    ap.add_argument("--keep", type=int, default=2, help="rows whose trained tensors come home (best val score first)")
    ap.add_argument("--max-mb", type=float, default=15.0, help="size cap of one delta file")
    ap.add_argument("--extra", default="", help="flags added to every row (tests: a tiny model)")
    args = ap.parse_args(argv)
    import torch

    from trainer.checkpoint_delta import write_delta

    started = time.perf_counter()
    cache = args.cache_dir or args.runs / "cache"
    parsed = {name: train_args(name, ROWS[name] + shlex.split(args.extra), args.catalog, args.runs, cache) for name in args.rows}
    results: dict[str, dict] = {}
    for name in args.rows:
        spent = time.perf_counter() - started
        longest = max((r.get("wall_s", 0.0) for r in results.values() if "error" not in r), default=0.0)
        if results and spent + longest > args.deadline_s:
            results[name] = {"skipped": f"deadline: {spent:.0f} s spent, the longest row took {longest:.0f} s"}
            continue
        try:
            results[name] = train_row(name, parsed[name], args.runs)
        except Exception as exc:  # a failed row is reported; the next still runs
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        write_json(args.out / "sweep.json", {"rows": results, "environment": environment()})
    done = [n for n, r in results.items() if "val" in r]
    kept = sorted(done, key=lambda n: -results[n]["val"]["score"])[: args.keep]
    for name in kept:
        paths = write_delta(args.runs / name / "best.pt", args.out, max_bytes=int(args.max_mb * (1 << 20)), stem=name)
        results[name]["delta"] = [p.name for p in paths]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    write_json(args.out / "sweep.json", {"rows": results, "kept": kept, "gpu": gpu, "environment": environment()})
    rows = [row_cells(name, r) for name, r in results.items()]
    write_markdown_table(args.out / "sweep.md", HEADERS, rows, title="Default recipe on a GPU (val)", notes=[f"kept: {kept}"])
    return 0 if done else 1


if __name__ == "__main__":
    raise SystemExit(main())
