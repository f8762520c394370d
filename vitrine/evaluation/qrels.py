"""A team's own relevance judgments: TREC / BEIR files in, nDCG@10, recall@k and MRR out.

    qrels = read_qrels("qrels.txt")          # TREC `qid 0 docid rel`, or BEIR `query-id corpus-id score` TSV
    queries = read_queries("queries.jsonl")  # BEIR {"_id", "text"} lines, or `qid<TAB>text` TSV
    report = score_run(run, qrels)           # run: qid -> ranked doc ids (best first)

Metrics follow trec_eval / BEIR (pytrec_eval): P@10, graded gains (the judgment's value; 0 and negative
mean not relevant), nDCG@10 against the ideal ordering of every judged document, recall@k over
every relevant judged document (those missing from the index count too, so recall says what the
catalog misses), MRR = 1 / rank of the first relevant result (0 when none is retrieved). A query
with no relevant judgment is left out, as trec_eval does, and counted.

`search.qrels` runs the live search pipeline over the queries (`vitrine eval --qrels ... --queries ...`).
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitrine.errors import UserError

Qrels = dict[str, dict[str, int]]  # qid -> docid -> relevance
DEFAULT_RECALL_KS = (10, 100)
NDCG_K = 10
MAX_LINE_ERRORS = 5


def read_qrels(path: str | Path) -> Qrels:
    """TREC qrels (`qid iter docid rel`, whitespace-separated) or BEIR qrels TSV (`query-id corpus-id score`,
    header optional). A docid judged twice for one query keeps the last judgment, as trec_eval does."""
    path = Path(path)
    lines = _read_lines(path, "qrels")
    qrels: Qrels = {}
    errors = []
    for number, line in lines:
        parts = line.split("\t") if "\t" in line else line.split()
        parts = [p.strip() for p in parts]
        if number == lines[0][0] and len(parts) == 3 and not _is_int(parts[2]):
            continue  # BEIR header: query-id corpus-id score
        if len(parts) == 4:
            qid, _, docid, rel = parts
        elif len(parts) == 3:
            qid, docid, rel = parts
        else:
            errors.append(f"line {number}: expected `qid 0 docid rel` (TREC) or `qid<TAB>docid<TAB>rel` (BEIR), got {len(parts)} fields")
            continue
        if not _is_int(rel) or not qid or not docid:
            errors.append(f"line {number}: relevance must be an integer, got {rel[:20]!r}")
            continue
        qrels.setdefault(qid, {})[docid] = int(rel)
    _raise_line_errors(path, errors)
    if not qrels:
        raise UserError(f"{path}: no judgments")
    return qrels


def read_queries(path: str | Path) -> dict[str, str]:
    """BEIR queries.jsonl (`{"_id": ..., "text": ...}` a line) or TSV (`qid<TAB>text`, header `query-id`/`id` optional)."""
    path = Path(path)
    lines = _read_lines(path, "queries")
    queries: dict[str, str] = {}
    errors = []
    as_json = lines[0][1].lstrip().startswith("{")
    for number, line in lines:
        if as_json:
            try:
                row = json.loads(line)
                qid, text = str(row["_id"]), row["text"]
                if not isinstance(text, str):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                errors.append(f'line {number}: expected a JSON object with "_id" and "text" (BEIR queries.jsonl)')
                continue
        else:
            row = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE))
            if len(row) < 2:
                errors.append(f"line {number}: expected `qid<TAB>text`")
                continue
            qid, text = row[0].strip(), "\t".join(row[1:])
            if number == lines[0][0] and qid.lower() in ("query-id", "qid", "id", "_id"):
                continue
        if not text.strip():
            errors.append(f"line {number}: query {qid!r} has no text")
            continue
        if qid in queries:
            errors.append(f"line {number}: query id {qid!r} appears twice")
            continue
        queries[qid] = text
    _raise_line_errors(path, errors)
    if not queries:
        raise UserError(f"{path}: no queries")
    return queries


def _read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{what} file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {what} file {path}: {exc}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise UserError(f"{path}: the {what} file is empty")
    return lines


def _raise_line_errors(path: Path, errors: list[str]) -> None:
    if errors:
        more = f" (and {len(errors) - MAX_LINE_ERRORS} more)" if len(errors) > MAX_LINE_ERRORS else ""
        raise UserError(f"{path}: " + "; ".join(errors[:MAX_LINE_ERRORS]) + more)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- metrics


def dcg(gains: Sequence[float]) -> float:
    """Σ gain_i / log2(i + 1), positions from 1 (trec_eval's ndcg_cut)."""
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def ndcg_at(ranked: Sequence[str], judged: Mapping[str, int], k: int = NDCG_K) -> float:
    gains = [max(judged.get(doc, 0), 0) for doc in ranked[:k]]
    ideal = dcg(sorted((r for r in judged.values() if r > 0), reverse=True)[:k])
    return dcg(gains) / ideal if ideal > 0 else 0.0


def precision_at(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    """Relevant results in the top k, over k (a short list is not padded)."""
    return sum(judged.get(doc, 0) > 0 for doc in ranked[:k]) / k


def recall_at(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    relevant = {doc for doc, rel in judged.items() if rel > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def reciprocal_rank(ranked: Sequence[str], judged: Mapping[str, int]) -> float:
    for position, doc in enumerate(ranked, start=1):
        if judged.get(doc, 0) > 0:
            return 1.0 / position
    return 0.0


@dataclass
class RunScores:
    """Mean metrics of one run over the judged queries, and what was left out."""

    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "counts": self.counts, "per_query": self.per_query}


def score_run(run: Mapping[str, Sequence[str]], qrels: Qrels, *, recall_ks: Sequence[int] = DEFAULT_RECALL_KS) -> RunScores:
    """Mean nDCG@10, recall@k per k and MRR of `run` (qid -> ranked doc ids) over the queries of `qrels`
    that have a relevant judgment; a judged query missing from the run scores 0."""
    judged = {qid: docs for qid, docs in qrels.items() if any(rel > 0 for rel in docs.values())}
    if not judged:
        raise UserError("no query in the qrels has a relevant (positive) judgment")
    per_query: dict[str, dict[str, float]] = {}
    for qid, docs in judged.items():
        ranked = list(run.get(qid, ()))
        scores = {f"ndcg@{NDCG_K}": ndcg_at(ranked, docs), f"p@{NDCG_K}": precision_at(ranked, docs, NDCG_K)}
        scores.update({f"recall@{k}": recall_at(ranked, docs, k) for k in recall_ks})
        scores["mrr"] = reciprocal_rank(ranked, docs)
        per_query[qid] = scores
    names = list(next(iter(per_query.values())))
    metrics = {name: sum(q[name] for q in per_query.values()) / len(per_query) for name in names}
    counts = {
        "queries_scored": len(per_query),
        "queries_without_relevant_judgment": len(qrels) - len(judged),
        "judged_queries_not_run": sum(qid not in run for qid in judged),
    }
    return RunScores(metrics, per_query, counts)
