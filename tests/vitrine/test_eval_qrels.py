"""Judged queries: TREC / BEIR files, and nDCG@10, P@10, recall@k and MRR against sklearn and by hand."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from vitrine.errors import UserError
from vitrine.evaluation.qrels import ndcg_at, precision_at, read_qrels, read_queries, recall_at, reciprocal_rank, score_run


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_trec_and_beir_qrels_read_alike(tmp_path):
    trec = write(tmp_path / "qrels.txt", "q1 0 d1 2\nq1 0 d2 0\n\nq2 0 d3 1\nq1 0 d1 1\n")
    beir = write(tmp_path / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\nq2\td3\t1\n")
    expected = {"q1": {"d1": 1, "d2": 0}, "q2": {"d3": 1}}  # a second judgment replaces the first, as in trec_eval
    assert read_qrels(trec) == expected == read_qrels(beir)


def test_beir_jsonl_and_tsv_queries_read_alike(tmp_path):
    jsonl = write(tmp_path / "queries.jsonl", '{"_id": "q1", "text": "puma sports shoes"}\n{"_id": 2, "text": "lee cooper", "metadata": {}}\n')
    tsv = write(tmp_path / "queries.tsv", "query-id\ttext\nq1\tpuma sports shoes\n2\tlee cooper\n")
    assert read_queries(jsonl) == {"q1": "puma sports shoes", "2": "lee cooper"} == read_queries(tsv)


@pytest.mark.parametrize(
    ("reader", "text", "message"),
    [
        (read_qrels, "q1 0 d1\nq1 d1\n", "line 2: expected"),
        (read_qrels, "q1 0 d1 high\n", "line 1: relevance must be an integer"),
        (read_qrels, "\n\n", "empty"),
        (read_queries, '{"_id": "q1"}\n', 'line 1: expected a JSON object with "_id" and "text"'),
        (read_queries, '{"_id": "q1", "text": "a"}\n{"_id": "q1", "text": "b"}\n', "appears twice"),
        (read_queries, "q1\n", "line 1: expected `qid<TAB>text`"),
        (read_queries, "q1\t  \n", "has no text"),
    ],
)
def test_bad_files_name_the_line(tmp_path, reader, text, message):
    with pytest.raises(UserError, match=message):
        reader(write(tmp_path / "f", text))
    with pytest.raises(UserError, match="not found"):
        reader(tmp_path / "missing")


def test_metrics_by_hand():
    judged = {"a": 2, "b": 1, "c": 0, "z": 1}  # z is never retrieved
    ranked = ["c", "a", "x", "b"]
    assert reciprocal_rank(ranked, judged) == 0.5 and reciprocal_rank(["x"], judged) == 0.0
    assert recall_at(ranked, judged, 2) == pytest.approx(1 / 3) and recall_at(ranked, judged, 10) == pytest.approx(2 / 3)
    assert precision_at(ranked, judged, 10) == pytest.approx(0.2)
    dcg = 2 / np.log2(3) + 1 / np.log2(5)
    ideal = 2 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(4)
    assert ndcg_at(ranked, judged) == pytest.approx(dcg / ideal)


def test_ndcg_matches_sklearn_on_random_graded_runs():
    rng = np.random.default_rng(0)
    for _ in range(20):
        docs = [f"d{i}" for i in range(30)]
        judged = {d: int(r) for d, r in zip(docs, rng.integers(0, 4, 30)) if rng.random() < 0.6}
        if not any(r > 0 for r in judged.values()):
            continue
        ranked = list(rng.permutation(docs)[: int(rng.integers(1, 25))])
        # sklearn: every document, the retrieved ones scored by rank, the rest below them (never in a top 10 they miss)
        scores = np.array([len(ranked) - ranked.index(d) if d in ranked else -1.0 - i for i, d in enumerate(docs)])
        gains = np.array([max(judged.get(d, 0), 0) for d in docs])
        if len(ranked) >= 10:
            assert ndcg_at(ranked, judged) == pytest.approx(ndcg_score([gains], [scores], k=10))


def test_score_run_means_over_queries_with_a_relevant_judgment():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1, "c": 1}, "q3": {"d": 0}, "q4": {"e": 1}}
    run = {"q1": ["a", "x"], "q2": ["x", "c"], "q3": ["d"]}  # q4 never ran: it scores 0
    scores = score_run(run, qrels, recall_ks=(1, 10))
    assert scores.counts == {"queries_scored": 3, "queries_without_relevant_judgment": 1, "judged_queries_not_run": 1}
    assert scores.metrics["mrr"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert scores.metrics["recall@1"] == pytest.approx((1 + 0 + 0) / 3)
    assert scores.metrics["recall@10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert scores.per_query["q4"] == {"ndcg@10": 0.0, "p@10": 0.0, "recall@1": 0.0, "recall@10": 0.0, "mrr": 0.0}
    with pytest.raises(UserError, match="no query"):
        score_run(run, {"q3": {"d": 0}})
