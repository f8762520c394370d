"""bench/gpu_sweep.py on a tiny catalog and model: rows run in order, the deadline stops new rows, and the best
rows' trained tensors come back as deltas that restore the run's checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_sweep
from tests.support.catalogs import make_training_catalog
from trainer.checkpoint_delta import restore

pytestmark = pytest.mark.torch


def test_sweep_runs_rows_until_the_deadline_and_keeps_the_best_rows_deltas(tmp_path):
    catalog = make_training_catalog(tmp_path / "catalog")
    extra = "--model tiny-ap --pretrained none --batch-size 8 --val-every 1 --epochs 1"
    argv = ["--catalog", str(catalog), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
            "--rows", "e10", "e10-s1", "e10-s2", "--deadline-s", "0", "--keep", "1", "--extra", extra]  # fmt: skip
    assert gpu_sweep.main(argv) == 0
    sweep = json.loads((tmp_path / "out" / "sweep.json").read_text())
    rows = sweep["rows"]
    assert "val" in rows["e10"] and rows["e10"]["config"]["epochs"] == 1  # --extra wins over the row's flags
    assert "deadline" in rows["e10-s1"]["skipped"] and "deadline" in rows["e10-s2"]["skipped"]
    assert sweep["kept"] == ["e10"]
    parts = [tmp_path / "out" / name for name in rows["e10"]["delta"]]
    full = torch.load(tmp_path / "runs" / "e10" / "best.pt", weights_only=False)["state_dict"]
    back = torch.load(restore(parts, tmp_path / "back.pt"), weights_only=False)["state_dict"]
    assert all(torch.equal(back[k], v) for k, v in full.items())
    table = (tmp_path / "out" / "sweep.md").read_text()
    assert "| e10 |" in table and "deadline" in table
