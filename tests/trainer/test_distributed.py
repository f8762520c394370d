"""Data-parallel training of the cached-token recipe: 2 processes, gloo backend, on the CPU.

One step's gradients on two half batches, averaged by DistributedDataParallel with the losses gathered
across processes, equal the one-process gradients of the whole batch; and `torchrun -m vitrine.cli train`
with 2 processes trains, resumes and leaves a checkpoint that exports to a bundle that loads.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.support.catalogs import make_training_catalog
from trainer.batches import CatalogBatchSampler, ShardedBatchSampler
from trainer.bundle import export_checkpoint
from trainer.distributed import Distributed
from trainer.recipe import TokenRecipeTrainer
from trainer.train import TrainConfig, train
from vitrine.errors import UserError
from vitrine.runtime import load_bundle

pytestmark = pytest.mark.torch  # needs the train extra

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return make_training_catalog(tmp_path_factory.mktemp("catalog"))


def config(catalog, out: Path, **kw) -> TrainConfig:
    # attribute heads, shopper queries, an unlocked text layer with MML-TP gates, two cached views: every gathered part
    base = dict(catalog=str(catalog), out=str(out), model="tiny-ap", pretrained="none", epochs=2, batch_size=16,
                val_queries=12, val_every=1, lr=3e-3, attr_weight=0.5, query_weight=0.5, text_unlocked_layers=1, prune=True,
                image_views=2, cache_dir=str(out.parent / "cache"), progress=False)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_gradients(trainer: TokenRecipeTrainer, rows: np.ndarray) -> dict[str, tuple[float, dict[str, torch.Tensor]]]:
    """Per contrastive loss (the multi-positive InfoNCE; open_clip's ClipLoss with local_loss and gather_with_grad),
    this process's loss and the trainable parameters' gradients after one backward on its shard of `rows`."""
    trainer._train_mode()
    trainer._draw_augmentation()
    modules = {"model": trainer.model, "image_attr": trainer.image_attributes, "text_attr": trainer.text_attributes}
    out = {}
    for name, multi_positive in (("multi_positive", True), ("clip_loss", False)):
        trainer.config.multi_positive = multi_positive
        for module in modules.values():
            module.zero_grad(set_to_none=True)
        losses = trainer.batch_losses(trainer.batches.shard(rows))
        losses["total"].backward()
        grads = {f"{m}.{n}": p.grad.detach().clone() for m, module in modules.items()
                 for n, p in module.named_parameters() if p.requires_grad}  # fmt: skip
        out[name] = float(losses["total"].detach()), grads
    return out


def gradient_worker(rank: int, port: int, catalog: str, out: str, rows: np.ndarray, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = TokenRecipeTrainer(config(catalog, Path(out)), Distributed(rank, WORLD, rank))
    try:
        torch.save(step_gradients(trainer, rows), Path(results) / f"rank{rank}.pt")
    finally:
        trainer.dist.shutdown()


def test_sharded_batches_split_the_single_process_batch():
    types = ["tshirt"] * 30 + ["watch"] * 30 + ["bag"] * 30
    sampler = CatalogBatchSampler(types, 24, hard_fraction=0.5, group_size=6, seed=3)
    shards = [ShardedBatchSampler(sampler, rank, 3) for rank in range(3)]
    for shard in shards:
        shard.set_epoch(2)
    for whole, *parts in zip(sampler.epoch(2), *shards):
        assert len({len(p) for p in parts}) == 1 and len(parts[0]) >= 2  # equal shards
        assert np.array_equal(np.concatenate(parts), whole[: len(parts[0]) * 3])  # the global batch, in order
    with pytest.raises(ValueError, match="fewer than 2 rows"):
        ShardedBatchSampler(CatalogBatchSampler(types, 4), 0, 3)


def test_what_does_not_gather_refuses_to_run_in_several_processes(catalog, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="--cva runs in one process"):
        TokenRecipeTrainer(config(catalog, tmp_path / "cva", cva=True), Distributed(0, WORLD, 0))
    with pytest.raises(UserError, match="global batch"):
        TokenRecipeTrainer(config(catalog, tmp_path / "small", batch_size=3), Distributed(0, WORLD, 0))
    monkeypatch.setenv("WORLD_SIZE", str(WORLD))  # as torchrun sets it
    with pytest.raises(UserError, match="trains in one process"):
        train(config(catalog, tmp_path / "pooled", model="tiny"))


def test_two_process_step_gradients_equal_the_full_batch_gradients(catalog, tmp_path):
    single = TokenRecipeTrainer(config(catalog, tmp_path / "single"))  # fills the shared cache first
    # A batch where identical titles (multi-positive pairs) sit on both sides of the split.
    title_ids = single.title_ids.numpy()
    rows = np.argsort(title_ids, kind="stable")[:16].reshape(-1, 2).T.reshape(-1)
    halves = title_ids[rows[:8]], title_ids[rows[8:]]
    assert set(halves[0]) & set(halves[1]), "the batch must pair titles across the two processes"
    expected = step_gradients(single, rows)
    assert expected["multi_positive"][0] != expected["clip_loss"][0]  # identical titles are positives in one of them

    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(gradient_worker, args=(free_port(), str(catalog), str(tmp_path / "ddp"), rows, str(results)), nprocs=WORLD)
    ranks = [torch.load(results / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    for loss_name, (loss, full) in expected.items():
        assert np.mean([r[loss_name][0] for r in ranks]) == pytest.approx(loss, rel=1e-5)  # the mean of local losses
        scale = max(float(g.abs().max()) for g in full.values())
        for rank in ranks:
            grads = rank[loss_name][1]
            assert grads.keys() == full.keys()
            worst = max(float((grads[k] - full[k]).abs().max()) for k in full)
            assert worst <= 1e-5 * max(1.0, scale), f"{loss_name}: max abs gradient difference {worst:.2e} (largest {scale:.2e})"
        # The local losses differ (each scores its own rows): the averaging, not the inputs, made the gradients equal.
        assert ranks[0][loss_name][0] != ranks[1][loss_name][0]


def torchrun(catalog: Path, out: Path, epochs: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               "-m", "vitrine.cli", "train", "--catalog", str(catalog), "--out", str(out), "--model", "tiny-ap",
               "--pretrained", "none", "--epochs", str(epochs), "--batch-size", "8", "--val-every", "1",
               "--attr-weight", "0.5", "--cache-dir", str(out.parent / "cache"), "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torchrun_two_processes_train_resume_and_export_a_bundle(catalog, tmp_path):
    run = tmp_path / "run"
    torchrun(catalog, run, epochs=1)
    first = json.loads((run / "summary.json").read_text())
    done = torchrun(catalog, run, epochs=2)  # resumes from last.pt on both processes
    assert done.stdout.count('"val"') == 1  # rank 0 alone reports
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == WORLD and [r["epoch"] for r in summary["history"]] == [1, 2]
    assert summary["history"][0] == first["history"][0]  # epoch 1 kept from the first run, not retrained
    assert all("val" in r and r["loss_attr"] > 0 for r in summary["history"])
    bundle = load_bundle(export_checkpoint(run / "best.pt", tmp_path / "bundle", catalog=str(catalog)))
    vectors = bundle.encode_texts(["red cotton t-shirt", "black leather handbag"])
    assert vectors.shape == (2, bundle.embed_dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
