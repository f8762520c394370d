"""What one query costs, part by part, in this process: the levers of issue 14 part 5 side by side.

    python3 bench/query_cost.py --index indexes/fashion [--bundle B] [--int8-bundle B8] [--queries 200] [--out bench/out]

Every variant runs on the same queries, interleaved query by query (A, B, A, B...), so a busy
machine slows all of them alike. Each cell is the median over the queries of the wall time and of
the calling thread's CPU time (`time.thread_time`; it hardly depends on what else the machine runs).

- search: the two-index path (Faiss top-100 from the title and the image index, union, exact fill-in;
  forced with fetch_k=100) against the fused scan (one pass over blended vectors, then the fill-in), and
  the fill-in alone;
- text encoder: tokenising one query; the graph for one query; per query when 4, 8 or 16 queries share a
  call (micro-batching); onnxruntime session options (intra-op threads, graph optimisation level);
- serialisation of a 10-result response: FastAPI's response_model path (validate + dump_json, as the routes
  did before), jsonable_encoder + json.dumps (a route without a response model), pydantic's model_dump_json
  (the service's now), orjson of model_dump (ORJSONResponse).

Writes bench/out/query_cost.json and bench/out/query_cost.md.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import environment, markdown_table, write_json  # noqa: E402


def measure(variants: dict[str, Callable[[int], Any]], n: int) -> dict[str, dict[str, float]]:
    """Median wall and thread-CPU ms of each variant over calls 0..n-1, interleaved call by call."""
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for name, fn in variants.items():  # warm-up: lazy matrices, allocators, caches
        fn(0)
    for i in range(n):
        for name, fn in variants.items():
            w, c = time.perf_counter(), time.thread_time()
            fn(i)
            cpu[name].append((time.thread_time() - c) * 1000.0)
            wall[name].append((time.perf_counter() - w) * 1000.0)
    return {name: {"wall_ms": round(float(np.median(wall[name])), 4), "cpu_ms": round(float(np.median(cpu[name])), 4)} for name in variants}


def search_costs(index: Any, queries: np.ndarray, n: int) -> dict[str, dict[str, float]]:
    from indexer.fused_scan import FusedScan, exact_top_k

    alpha = index.alphas.for_kind("text")
    unions = [index._candidates(q, 100) for q in queries]  # what the two-index path fills in
    text, image = np.array(index._text), np.array(index._image)
    float32 = FusedScan(index._text, index._image, {alpha}, codec="float32")
    exact = sum(float32.search(q, index._ids, 10, 100, alpha) == index.search(q, k=10, kind="text") for q in queries)
    print(f"int8 and float32 fused scans: identical top-10 hits for {exact}/{len(queries)} queries", flush=True)
    return measure({
        "two Faiss scans + union + fill-in (fetch_k=100)": lambda i: index.search(queries[i], k=10, kind="text", fetch_k=100),
        "fused scan + fill-in (the service's path; int8 scan)": lambda i: index.search(queries[i], k=10, kind="text"),
        "fused scan + fill-in, float32 scan": lambda i: float32.search(queries[i], index._ids, 10, 100, alpha),
        "fused scan alone (int8)": lambda i: index._fused.top_rows(queries[i], 100, alpha),
        "fused scan alone (float32)": lambda i: float32.top_rows(queries[i], 100, alpha),
        "fill-in alone (union of ~150 rows)": lambda i: exact_top_k(index._text, index._image, index._ids, unions[i], queries[i], 10, alpha),
        "fill-in alone, vectors copied to RAM (not mapped)": lambda i: exact_top_k(text, image, index._ids, unions[i], queries[i], 10, alpha),
    }, n)  # fmt: skip


def encoder_costs(
    bundle_path: Path, texts: list[str], n: int, int8_path: Path | None = None
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    import onnxruntime as ort

    from vitrine.runtime import load_bundle
    from vitrine.runtime.session import make_session

    bundle = load_bundle(bundle_path, threads=1)
    tok = bundle.text.tokenizer
    lone = np.stack([bundle.encode_texts([t])[0] for t in texts[:64]])
    batched = bundle.encode_texts(texts[:64])
    facts = {"batched_vs_lone_max_abs_diff": float(np.abs(lone - batched).max()),
             "tokens_mean": float(np.mean([len(r) for r in tok.encode_rows(texts)]))}  # fmt: skip
    sessions = {
        "1 thread, ORT_ENABLE_ALL (the service's)": bundle.text.session,
        "2 threads, ORT_ENABLE_ALL": make_session(bundle_path / bundle.manifest.text_encoder.file, threads=2),
        "1 thread, ORT_ENABLE_BASIC": make_session(bundle_path / bundle.manifest.text_encoder.file, threads=1,
                                                   optimization=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),  # fmt: skip
    }
    int8 = None
    if int8_path is not None:  # `vitrine bundle quantize`: the same tokenizer, an int8 text graph
        int8 = load_bundle(int8_path, threads=1)
        sessions["int8 graph (vitrine bundle quantize), 1 thread, ORT_ENABLE_ALL"] = int8.text.session
        sessions["int8 graph, 2 threads, ORT_ENABLE_ALL"] = make_session(int8_path / int8.manifest.text_encoder.file, threads=2)
        from vitrine.runtime.quantize import compare_embeddings

        facts["int8_vs_float_min_cosine"] = compare_embeddings(batched, int8.encode_texts(texts[:64]))[0]
    ids = [tok.pad(tok.encode_rows([t])) for t in texts]
    name_in, name_out = bundle.text.input_name, bundle.text.output_name
    variants: dict[str, Callable[[int], Any]] = {"tokenise one query": lambda i: tok.pad(tok.encode_rows([texts[i]]))}
    for label, session in sessions.items():
        variants[f"graph, 1 query, {label}"] = lambda i, s=session: s.run([name_out], {name_in: ids[i]})
    costs = measure(variants, n)
    for size in (4, 8, 16):  # per query when `size` queries share one call (tokenising included)
        calls = max(4, n // size)
        cost = measure({f"batch {size}": lambda i, b=size: bundle.encode_texts(texts[(i * b) % len(texts):][:b])}, calls)
        costs[f"encode per query, {size} queries a call"] = {k: round(v / size, 4) for k, v in cost[f"batch {size}"].items()}
    lone_calls: dict[str, Callable[[int], Any]] = {"encode per query, 1 query a call": lambda i: bundle.encode_texts([texts[i]])}
    if int8 is not None:
        lone_calls["encode per query, 1 query a call, int8"] = lambda i: int8.encode_texts([texts[i]])
    costs.update(measure(lone_calls, n))
    return costs, facts


def serialise_costs(index: Any, queries: np.ndarray, n: int) -> dict[str, dict[str, float]]:
    import orjson
    from fastapi.encoders import jsonable_encoder
    from pydantic import TypeAdapter

    from search.service.engine import SearchOutcome
    from search.service.routers.search import to_response
    from search.service.schemas import SearchResponse

    outcomes = []
    for q in queries[:n]:
        hits = index.search(q, k=10, kind="text")
        outcomes.append(SearchOutcome(hits=hits, records=index.get_many([h.id for h in hits]), alpha=0.9,
                                      timings_ms={"total": 1.0}, cache="miss"))  # fmt: skip
    adapter = TypeAdapter(SearchResponse)

    def fastapi_response_model(i: int) -> bytes:  # what a route with response_model does with the returned model
        model = adapter.validate_python(to_response("text", outcomes[i], 10))
        return adapter.dump_json(model, exclude_unset=True)

    return measure({
        "response_model route (before): validate + dump_json, after a threadpool hop not timed here": fastapi_response_model,
        "no response model: jsonable_encoder + json.dumps": lambda i: json.dumps(jsonable_encoder(to_response("text", outcomes[i], 10))).encode(),
        "pydantic model_dump_json (the service's)": lambda i: to_response("text", outcomes[i], 10).model_dump_json(exclude_unset=True),
        "orjson.dumps(model_dump())": lambda i: orjson.dumps(to_response("text", outcomes[i], 10).model_dump(exclude_unset=True)),
    }, len(outcomes))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, help="default: the bundle the index was built with")
    parser.add_argument("--int8-bundle", type=Path, help="also time this int8 copy's text graph (vitrine bundle quantize)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args(argv)
    from indexer import ProductIndex
    from vitrine.runtime import load_bundle

    machine = environment()
    index = ProductIndex.open(args.index)
    bundle = args.bundle or Path(index.bundle_path)
    titles = sorted({r.title for r in index.get_many(index.ids()) if r is not None})
    random.Random(args.seed).shuffle(titles)
    texts = titles[: max(args.queries, 64)]
    queries = load_bundle(bundle, threads=1).encode_texts(texts)
    n = args.queries
    sections: dict[str, Any] = {}
    sections["search"] = search_costs(index, queries, n)
    print(json.dumps(sections["search"], indent=1), flush=True)
    sections["text encoder"], facts = encoder_costs(bundle, texts, n, args.int8_bundle)
    print(json.dumps(sections["text encoder"], indent=1), flush=True)
    sections["serialisation"] = serialise_costs(index, queries, min(n, 100))
    print(json.dumps(sections["serialisation"], indent=1), flush=True)
    report = {"environment": {**machine, "index": str(args.index), "products": len(index), "bundle": str(bundle),
                              "queries": n, **facts}, "costs": sections}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "query_cost.json", report)
    env = report["environment"]
    parts = [
        "# Per-query cost, part by part\n",
        f"{env['products']:,} products, {n} title queries ({env['tokens_mean']:.1f} tokens on average); {env['cpu_count']} CPUs, "
        f"load average {env['load_average_1m']:.1f} at the start. Medians; variants interleaved query by query. "
        f"Batched vs lone text embeddings: max |diff| {env['batched_vs_lone_max_abs_diff']:.1e}.\n",
    ]
    for title, costs in sections.items():
        parts.append(f"## {title}\n")
        parts.append(markdown_table(["variant", "wall ms", "CPU ms"], [[k, v["wall_ms"], v["cpu_ms"]] for k, v in costs.items()], digits=3))
    (args.out / "query_cost.md").write_text("\n".join(parts), encoding="utf-8")
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
