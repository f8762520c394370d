"""bench/rerank_arms.py: each seed's prior weight is picked on val, and a test row reads test's sweep at it."""
from __future__ import annotations

import json

from bench import rerank_arms


def _report(t2i: list[float], t2p: list[float], tia_swap: float) -> dict:
    return {
        "t2i_sample": {"dual_encoder": {"R@1": 0.4}, "cross_only": {"R@1": 0.3}},
        "t2p": {"dual_encoder": {"nDCG@10": 0.8}, "cross_only": {"nDCG@10": 0.7}},
        "tia": {"random": {"auc": 0.99, "dual_encoder_auc": 0.98},
                "attribute_swap": {"auc": tia_swap, "dual_encoder_auc": 0.8}},
        "prior_sweep": {"weights": [0.0, 15.0, 1e4], "t2i_R@1": t2i, "t2p_nDCG@10": t2p},
    }


def _seed(work, name, val, test, group_acc):
    run = work / name
    for split, rep in (("val", val), ("test", test)):
        (run / split).mkdir(parents=True)
        (run / split / "rerank.json").write_text(json.dumps(rep))
    (run / "summary.json").write_text(json.dumps({"first_group_acc": group_acc[0], "final_group_acc": group_acc[1]}))


def test_the_weight_is_picked_on_val_and_test_is_read_at_it(tmp_path):
    work, out = tmp_path / "arms", tmp_path / "out"
    # seed 0: val prefers w = 15; test would prefer w = 0 but must be read at 15
    _seed(work, "a-s0", _report([0.40, 0.50, 0.45], [0.80, 0.82, 0.81], 0.8),
          _report([0.60, 0.42, 0.41], [0.90, 0.80, 0.79], 0.82), (0.5, 0.6))
    # seed 1: val prefers the first stage's order (ties go to the larger weight)
    _seed(work, "a-s1", _report([0.40, 0.45, 0.45], [0.80, 0.80, 0.80], 0.8),
          _report([0.60, 0.42, 0.44], [0.90, 0.80, 0.78], 0.84), (0.5, 0.7))
    assert rerank_arms.main(["a", "--work", str(work), "--split", "test", "--out", str(out)]) == 0
    seeds = json.loads((out / "rerank_arms.json").read_text())["arms"]["a"]
    assert [seeds[s]["w"] for s in ("a-s0", "a-s1")] == [15.0, 1e4]
    assert [seeds[s]["t2i_at_w"] for s in ("a-s0", "a-s1")] == [0.42, 0.44]
    table = (out / "rerank_arms.md").read_text()
    assert "| a | 2 | 15 / 10000 | 43.0 ± 1.4 (40.0 ± 0.0) |" in table
    assert "0.830 ± 0.014" in table and "0.500 ± 0.000 → 0.650 ± 0.071" in table
