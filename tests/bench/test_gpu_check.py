"""bench/gpu_check.py: its comparisons, run CPU against CPU, and its answer on a machine without a GPU."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bench import gpu_check


def test_topk_agreement_allows_ties_at_the_kth_score_only():
    scores = np.array([[0.9, 0.8, 0.5, 0.5]], dtype=np.float32)
    ids = np.array([[1, 2, 3, 4]])
    assert gpu_check.topk_agreement(scores, ids, scores, ids) == 1.0
    assert gpu_check.topk_agreement(scores, ids, scores, np.array([[1, 2, 4, 7]])) == 1.0  # 3, 4, 7 tie at the 4th score
    assert gpu_check.topk_agreement(scores, ids, scores, np.array([[1, 9, 3, 4]])) == 0.0  # 2 is above the tie
    assert gpu_check.topk_agreement(scores, ids, scores + 0.01, ids) == 0.0  # scores differ


def test_faiss_check_of_the_cpu_against_itself_agrees():
    import faiss

    rng = np.random.default_rng(0)
    result = gpu_check.faiss_check(gpu_check.unit_rows(rng, 2000, 32), gpu_check.unit_rows(rng, 50, 32), faiss.clone_index)
    assert result["ok"] and result["top_k_agreement"] == 1.0 and result["max_score_diff"] == 0.0


@pytest.mark.torch  # the tiny bundle is exported with torch
def test_onnx_check_compares_providers_and_times_both(tiny_bundle):
    texts, images = gpu_check.sample_inputs(None, 8, 4, seed=0)
    result = gpu_check.onnx_check(tiny_bundle, "cpu", texts, images, repeats=1)
    assert result["ok"] and result["providers"] == ["CPUExecutionProvider"]
    assert result["text"]["max_abs_diff"] == 0.0 and result["image"]["n"] == 4 and result["image"]["device_per_s"] > 0


@pytest.mark.torch
def test_mixed_precision_step_matches_the_float32_step():
    import torch

    result = gpu_check.train_step_check("tiny-ap", "cpu", torch.bfloat16, batch=8)
    assert result["ok"] and result["loss_rel_diff"] < gpu_check.LOSS_RTOL and result["parameters_with_grad"] > 0
    assert result["grad_rel_diff"] < 0.2  # bf16 rounds the activations; the gradients stay close


def test_without_a_gpu_nothing_is_checked_and_it_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "gpu_present", lambda: {"torch": False, "faiss": False, "onnxruntime": False})
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert "no GPU here" in capsys.readouterr().out
    assert json.loads((tmp_path / "gpu_check.json").read_text())["ran"] is False


def test_missing_gpu_builds_are_skipped_with_the_reason(tmp_path, monkeypatch):
    # as on a GPU machine where only torch sees the GPU: faiss-cpu and CPU onnxruntime are reported, not failed
    monkeypatch.setattr(gpu_check, "gpu_present", lambda: {"torch": True, "faiss": False, "onnxruntime": False})
    monkeypatch.setattr(gpu_check, "cuda_train_check", lambda model, texts: {"skipped": "stubbed for the test"})
    assert gpu_check.main(["--out", str(tmp_path), "--vectors", "500", "--queries", "5", "--catalog", str(tmp_path / "none")]) == 0
    checks = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
    assert "faiss-gpu" in checks["faiss_gpu"]["skipped"] and "onnxruntime-gpu" in checks["onnxruntime_cuda"]["skipped"]
    assert "| faiss_gpu | skipped |" in (tmp_path / "gpu_check.md").read_text()
