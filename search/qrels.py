"""`vitrine eval --qrels FILE --queries FILE --index DIR`: the live search pipeline on a team's own judgments.

The search layer adds these options to the foundation's `vitrine eval` (only this layer can run the
pipeline: encoder, index, lexical index, fusion, reranker), from its command registration
(`search.service.cli.register`, which runs after `eval` registered). Each query runs through
`SearchEngine.search_text`, the code an HTTP request runs, in every mode asked for; the judged
metrics are `vitrine.evaluation.qrels`'s (nDCG@10, P@10, recall@k, MRR).

    vitrine eval --qrels qrels.txt --queries queries.jsonl --index indexes/fashion \\
        --modes vector,lexical,hybrid,hybrid+rerank --out runs/judged
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitrine.cliargs import positive_int
from vitrine.errors import UserError

log = logging.getLogger(__name__)

BASE_MODES = ("vector", "lexical", "hybrid")
RERANK_SUFFIX = "+rerank"
DEFAULT_DEPTH = 100
MAX_DEPTH = 1000

EPILOG = """\
judged queries (from the search layer):
  vitrine eval --qrels FILE --queries FILE --index DIR [--bundle DIR] [--modes LIST] [--depth N] --out DIR
  runs each query through the live search pipeline (the code behind POST /search/text) in each
  mode: vector, lexical, hybrid, and MODE+rerank (the bundle's cross-encoder on the first-stage top N).
  --qrels: TREC `qid 0 docid rel` or BEIR `query-id<TAB>corpus-id<TAB>score`; --queries: BEIR
  queries.jsonl ({"_id", "text"}) or `qid<TAB>text`. Writes metrics.json, metrics.md and a TREC
  run file per mode (run.MODE.trec) to --out: nDCG@10, P@10, recall@10 and @depth, MRR."""


def parse_modes(value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    allowed = [*BASE_MODES, *(m + RERANK_SUFFIX for m in BASE_MODES)]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)} (got {value!r})")
    return names


def extend_eval(subparsers: argparse._SubParsersAction) -> None:
    """Add the judged-query options to `vitrine eval` (registered by the foundation) and route to them."""
    parser = subparsers.choices.get("eval")
    if parser is None:
        return
    group = parser.add_argument_group("judged queries: the live search pipeline (search layer)")
    group.add_argument("--qrels", type=Path, metavar="FILE", help="relevance judgments: TREC `qid 0 docid rel` or BEIR TSV")
    group.add_argument("--index", type=Path, metavar="DIR", help="index to search (with --qrels; --bundle defaults to its own)")
    group.add_argument("--modes", type=parse_modes, default=None, metavar="LIST",
                       help="with --qrels: of vector,lexical,hybrid and MODE+rerank (default: vector,lexical,hybrid, "
                            "and vector+rerank,hybrid+rerank when the bundle has a reranker)")  # fmt: skip
    group.add_argument("--depth", type=positive_int, default=DEFAULT_DEPTH, metavar="N",
                       help=f"with --qrels: results per query (recall@N; default {DEFAULT_DEPTH}, at most {MAX_DEPTH})")  # fmt: skip
    parser.epilog = f"{parser.epilog}\n\n{EPILOG}" if parser.epilog else EPILOG
    foundation = parser.get_default("func")

    def main(args: argparse.Namespace) -> int:
        if args.qrels is None:
            if args.index is not None or args.modes is not None:
                raise UserError("--index and --modes score judged queries: give --qrels FILE --queries FILE too")
            return foundation(args)
        return main_qrels(args)

    parser.set_defaults(func=main)


@dataclass
class Pipeline:
    """The service's SearchEngine over an index, opened in process (no HTTP)."""

    engine: Any  # search.service.engine.SearchEngine

    @classmethod
    def open(cls, index: Path, bundle: Path | None = None, *, backend: str = "faiss") -> Pipeline:
        from search.service.app import open_encoder, open_index
        from search.service.engine import SearchEngine, open_reranker
        from search.service.metrics import ServiceMetrics
        from search.service.settings import Settings

        settings = Settings(index=index, bundle=bundle, backend=backend, redis_url=None)
        opened = open_index(settings)
        try:
            encoder = open_encoder(settings, opened)
            reranker = open_reranker(settings, opened, encoder)
        except BaseException:
            opened.close()
            raise
        return cls(SearchEngine(settings, opened, encoder, ServiceMetrics(), reranker, owns_index=True))

    @property
    def has_reranker(self) -> bool:
        return self.engine.reranker is not None

    def default_modes(self) -> tuple[str, ...]:
        return (*BASE_MODES, *(("vector" + RERANK_SUFFIX, "hybrid" + RERANK_SUFFIX) if self.has_reranker else ()))

    def search(self, text: str, mode: str, k: int, *, fusion: str | None = None,
               filters: Mapping[str, Any] | None = None) -> list[str]:  # fmt: skip
        """Ranked product ids for one query, as POST /search/text answers it."""
        base, rerank = (mode[: -len(RERANK_SUFFIX)], True) if mode.endswith(RERANK_SUFFIX) else (mode, False)
        if rerank and not self.has_reranker:
            raise UserError(f"mode {mode}: the bundle has no reranker")
        top_n = self.engine.default_rerank_top_n if rerank else None
        outcome = self.engine.search_text(text, k=k, alpha=None, filters=dict(filters) if filters else None,
                                          rerank_top_n=top_n, mode=base, fusion=fusion)  # fmt: skip
        return [hit.id for hit in outcome.hits]

    def run(self, queries: Mapping[str, str], mode: str, k: int, **options: Any) -> dict[str, list[str]]:
        return {qid: self.search(text, mode, k, **options) for qid, text in queries.items()}

    def close(self) -> None:
        self.engine.close()


def main_qrels(args: argparse.Namespace) -> int:
    from vitrine.evaluation.qrels import read_qrels, read_queries, score_run

    if args.index is None:
        raise UserError("--qrels needs --index DIR, the index to search")
    if not isinstance(args.queries, Path):
        raise UserError("--qrels needs --queries FILE (BEIR queries.jsonl or qid<TAB>text)")
    if args.encoder is not None:
        raise UserError("--qrels runs the search pipeline, whose encoder is the index's bundle: use --bundle, not --encoder")
    if args.depth > MAX_DEPTH:
        raise UserError(f"--depth must be at most {MAX_DEPTH}")
    qrels = read_qrels(args.qrels)
    queries = read_queries(args.queries)
    relevant = [qid for qid, docs in qrels.items() if any(rel > 0 for rel in docs.values())]  # the others are not scored
    judged = {qid: queries[qid] for qid in relevant if qid in queries}
    missing = sorted(set(relevant) - set(queries))
    if not judged:
        raise UserError(f"none of the {len(relevant)} queries with a relevant judgment in {args.qrels} is in {args.queries}")
    if missing:
        log.warning("%d judged queries have no text in %s (scored 0): %s", len(missing), args.queries, ", ".join(missing[:5]))
    pipeline = Pipeline.open(args.index, args.bundle)
    try:
        modes = args.modes or pipeline.default_modes()
        recall_ks = sorted({10, args.depth})
        index_ids = set(pipeline.engine.index.ids())
        report: dict[str, Any] = {
            "config": {"qrels": str(args.qrels), "queries": str(args.queries), "index": str(args.index),
                       "version": pipeline.engine.version, "depth": args.depth, "modes": list(modes)},
            "counts": {"queries_in_file": len(queries), "judged_queries": len(qrels), "judged_queries_without_text": len(missing),
                       "judged_documents_not_in_index": sum(doc not in index_ids for docs in qrels.values() for doc in docs)},
            "modes": {},
        }  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        for mode in modes:
            started = time.perf_counter()
            run = pipeline.run(judged, mode, args.depth)
            seconds = time.perf_counter() - started
            scores = score_run(run, qrels, recall_ks=recall_ks)
            report["modes"][mode] = {**scores.to_dict(), "ms_per_query": round(1000 * seconds / len(judged), 2)}
            write_trec_run(args.out / f"run.{mode}.trec", run, mode)
    finally:
        pipeline.close()
    (args.out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = render_table(report)
    (args.out / "metrics.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"wrote {args.out / 'metrics.json'}, {args.out / 'metrics.md'} and a run file per mode")
    return 0


def write_trec_run(path: Path, run: Mapping[str, Sequence[str]], tag: str) -> None:
    """TREC run format: `qid Q0 docid rank score tag`, score falling with rank (trec_eval re-sorts by it)."""
    with open(path, "w", encoding="utf-8") as fh:
        for qid, docs in run.items():
            fh.writelines(f"{qid} Q0 {doc} {rank} {len(docs) - rank + 1} {tag}\n" for rank, doc in enumerate(docs, start=1))


def render_table(report: Mapping[str, Any]) -> str:
    modes = report["modes"]
    names = list(next(iter(modes.values()))["metrics"])
    lines = [
        "| mode | " + " | ".join(names) + " | ms/query |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for mode, entry in modes.items():
        lines.append(f"| {mode} | " + " | ".join(f"{entry['metrics'][n]:.4f}" for n in names) + f" | {entry['ms_per_query']} |")
    scored = next(iter(modes.values()))["counts"]["queries_scored"]
    lines.append(f"\n{scored} judged queries scored; {report['counts']}")
    return "\n".join(lines)
