"""Data-parallel training of the cached-token recipe on the CPU: gradient parity and step time, 1 vs 2 processes.

    python3 bench/ddp.py --work /tmp/vitrine-ddp --out bench/out

On a synthetic training catalog (tests.support.catalogs, --products products, tiny-ap, random init):

1. parity: one step's gradients of a global batch (--batch rows) in one process, against the same
   step on two gloo processes (each its half, losses gathered, gradients averaged by DDP): the
   largest absolute difference over every trainable parameter, next to the difference a plain
   average of the two halves' separate gradients (no gathering) would make;
2. speed: --steps training steps (forward, backward, optimizer) of the same global batches in one
   process (--threads: 1, 2) and in two processes (1 thread each): wall and CPU seconds per step.

Writes bench/out/ddp.json and ddp.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import environment, markdown_table, write_json  # noqa: E402
from tests.support.catalogs import make_training_catalog  # noqa: E402
from trainer.distributed import Distributed  # noqa: E402
from trainer.recipe import TokenRecipeTrainer  # noqa: E402
from trainer.train import TrainConfig  # noqa: E402


def config(work: Path, run: str, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(catalog=str(work / "catalog"), out=str(work / run), model="tiny-ap", pretrained="none",
                       batch_size=args.batch, attr_weight=0.5, text_unlocked_layers=1, image_views=2, val_queries=12,
                       cache_dir=str(work / "cache"), progress=False)  # fmt: skip


def gradients(trainer: TokenRecipeTrainer, rows: np.ndarray) -> dict[str, torch.Tensor]:
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer._train_mode()
    trainer._draw_augmentation()
    trainer.batch_losses(trainer.batches.shard(rows))["total"].backward()
    modules = {"model": trainer.model, "image_attr": trainer.image_attributes, "text_attr": trainer.text_attributes}
    return {f"{m}.{n}": p.grad.detach().clone() for m, module in modules.items()
            for n, p in module.named_parameters() if p.requires_grad}  # fmt: skip


def timed_steps(trainer: TokenRecipeTrainer, steps: int) -> dict[str, float]:
    """Wall and CPU (this process, all its threads) seconds per step over `steps` training steps, after one
    warm-up step: the recipe's own loop body. CPU time is the steadier figure on a shared machine."""
    trainer._train_mode()
    trainer._draw_augmentation()
    batches = [trainer.batches.shard(b) for b in trainer.batches.sampler.epoch(0)]
    done, started, cpu = -1, 0.0, 0.0
    while done < steps:
        for rows in batches:
            if done == 0:
                trainer.dist.barrier()
                started, cpu = time.perf_counter(), time.process_time()
            losses = trainer.batch_losses(rows)
            trainer.optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            trainer.optimizer.step()
            done += 1
            if done == steps:
                break
    cpu = time.process_time() - cpu
    trainer.dist.barrier()
    return {"wall": (time.perf_counter() - started) / steps, "cpu": cpu / steps}


def worker(rank: int, world: int, port: int, work: str, args: argparse.Namespace, rows: np.ndarray, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    trainer = TokenRecipeTrainer(config(Path(work), f"ddp{world}", args), Distributed(rank, world, rank))
    try:
        grads = gradients(trainer, rows)
        per_step = timed_steps(trainer, args.steps)
        torch.save({"grads": grads, "per_step": per_step}, Path(work) / f"world{world}-rank{rank}.pt")
    finally:
        trainer.dist.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_abs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vitrine-ddp"))
    parser.add_argument("--out", type=Path, default=REPO / "bench/out")
    parser.add_argument("--products", type=int, default=240)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts of the one-process runs")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    make_training_catalog(args.work / "catalog", n=args.products)

    results: dict = {"environment": environment(), "products": args.products, "batch": args.batch, "steps": args.steps}
    torch.set_num_threads(1)
    single = TokenRecipeTrainer(config(args.work, "single", args))  # fills the cache
    rows = next(iter(single.batches.sampler.epoch(0)))
    full = gradients(single, rows)
    halves = [gradients(single, part) for part in np.split(rows, 2)]  # each half alone: DDP without gathering
    naive = {k: (halves[0][k] + halves[1][k]) / 2 for k in full}
    largest = max(float(g.abs().max()) for g in full.values())
    speed = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        speed[f"1 process, {threads} thread(s)"] = timed_steps(TokenRecipeTrainer(config(args.work, "single", args)), args.steps)
    mp.spawn(worker, args=(2, free_port(), str(args.work), args, rows, 1), nprocs=2)
    ranks = [torch.load(args.work / f"world2-rank{r}.pt", weights_only=False) for r in range(2)]
    speed["2 processes (gloo), 1 thread each"] = {"wall": max(r["per_step"]["wall"] for r in ranks),
                                                  "cpu": max(r["per_step"]["cpu"] for r in ranks)}  # the slower process
    results["parity"] = {"max_abs_diff_ddp": max(max_abs(r["grads"], full) for r in ranks),
                         "max_abs_diff_between_ranks": max_abs(ranks[0]["grads"], ranks[1]["grads"]),
                         "max_abs_diff_without_gather": max_abs(naive, full),
                         "largest_gradient": largest, "parameters": len(full)}  # fmt: skip
    results["seconds_per_step"] = speed

    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "ddp.json", results)
    p = results["parity"]
    table = markdown_table(["gradients of one step vs one process, full batch", "max abs diff"], [
        ["2 processes, gathered losses + DDP average (either rank)", f"{p['max_abs_diff_ddp']:.1e}"],
        ["rank 0 vs rank 1", f"{p['max_abs_diff_between_ranks']:.1e}"],
        ["mean of the two halves' own gradients (no gathering)", f"{p['max_abs_diff_without_gather']:.1e}"],
        ["(largest gradient entry)", f"{p['largest_gradient']:.1e}"],
    ])  # fmt: skip
    base = speed[f"1 process, {args.threads[0]} thread(s)"]
    table += "\n\n" + markdown_table(
        ["run", "wall s/step", "CPU s/step (per process)", f"wall vs 1 process, {args.threads[0]} thread"],
        [[k, f"{v['wall']:.4f}", f"{v['cpu']:.4f}", f"{base['wall'] / v['wall']:.2f}x"] for k, v in speed.items()],
    )  # fmt: skip
    (args.out / "ddp.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
