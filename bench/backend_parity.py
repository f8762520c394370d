"""Parity of the two vector engines behind SearchIndex: Faiss (ProductIndex) and Qdrant (QdrantIndex).

    python3 bench/backend_parity.py [--index runs/demo-apr/index] [--text 200] [--photo 200] [--filtered 100] [--out bench/out]

Opens the live version of an index with both engines (Qdrant embedded, loaded from the version's
files into a temporary folder unless --qdrant-path names one to reuse), embeds the queries once
with the index's bundle and asks both engines for the fused top-k of the same embeddings:

- text: half distinct catalog titles (the catalog's duplicate titles make tied scores), half short
  attribute queries ("women black handbags") made from random products;
- photo: catalog photos (random products), embedded by the bundle's image encoder;
- filtered: text and photo queries again, each with a real filter (gender, colours, an article type
  with a gender, a season list; some match tens of products, some thousands).

Reports the share of identical top-k lists (same ids in the same order), of equal id sets, the
largest score difference on identical lists, and search-stage latency of both engines (index.search
only: the query embedding is given; the engines take turns on each query). Target: >= 95 % identical.

Writes bench/out/backend_parity.json and bench/out/backend_parity.md.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import environment, latency_stats, markdown_table, pct, time_interleaved, write_json  # noqa: E402
from indexer.product_index import ProductIndex  # noqa: E402
from indexer.qdrant_index import QdrantEngine, QdrantIndex, collection_state, load_version  # noqa: E402
from vitrine.scoring import Hit  # noqa: E402

TARGET_IDENTICAL = 0.95
DEFAULT_INDEXES = ("runs/demo-apr/index", "runs/demo/index")
FILTERS: list[dict[str, Any]] = [
    {"gender": "Women"},
    {"gender": "Men"},
    {"baseColour": ["Black", "White"]},
    {"baseColour": "Red"},
    {"articleType": "Handbags", "gender": "Women"},
    {"articleType": "Watches"},
    {"season": ["Summer", "Fall"], "usage": "Casual"},
    {"masterCategory": "Footwear", "gender": "Men"},
    {"articleType": "Sunglasses", "baseColour": "Black"},
    {"subCategory": "Jewellery"},
]


def default_index() -> Path:
    for candidate in DEFAULT_INDEXES:
        if (REPO / candidate / "CURRENT").is_file():
            return REPO / candidate
    raise SystemExit(f"no index found at {' or '.join(DEFAULT_INDEXES)}: pass --index")


def text_queries(records: list, count: int, rng: random.Random) -> list[str]:
    """Half distinct titles, half "<gender> <colour> <article type>" phrases, all distinct."""
    titles = sorted({r.title for r in records})
    rng.shuffle(titles)
    phrases = sorted({" ".join(v for v in (r.attributes.get("gender", ""), r.attributes.get("baseColour", ""),
                                          r.attributes.get("articleType", "")) if v).lower() for r in records})  # fmt: skip
    rng.shuffle(phrases)
    half = count // 2
    return titles[:half] + phrases[: count - half]


def photo_ids(index: ProductIndex, count: int, rng: random.Random) -> list[str]:
    ids = index.ids()
    rng.shuffle(ids)
    return ids[:count]


def compare(expected: list[Hit], got: list[Hit]) -> dict[str, Any]:
    same = [h.id for h in expected] == [h.id for h in got]
    diff = max((abs(a.score - b.score) for a, b in zip(expected, got)), default=0.0) if same else None
    return {"identical": same, "same_set": {h.id for h in expected} == {h.id for h in got}, "max_score_diff": diff,
            "n": len(expected)}  # fmt: skip


def run_group(name: str, queries: list[tuple[np.ndarray, str, dict | None, str]], engines: dict[str, Any], k: int) -> dict[str, Any]:
    """Both engines on every query (taking turns), parity and latency."""
    results: dict[str, list[list[Hit]]] = {engine: [] for engine in engines}

    def searcher(engine: str):
        index = engines[engine]

        def call(item: tuple[np.ndarray, str, dict | None, str]) -> None:
            emb, kind, filters, _ = item
            results[engine].append(index.search(emb, k=k, kind=kind, filters=filters))

        return call

    times = time_interleaved({engine: searcher(engine) for engine in engines}, queries, warmup=0)
    rows = [compare(a, b) for a, b in zip(results["faiss"], results["qdrant"])]
    mismatches = [
        {"query": label, "kind": kind, "filters": filters, "faiss": [h.id for h in a], "qdrant": [h.id for h in b]}
        for (_, kind, filters, label), a, b, row in zip(queries, results["faiss"], results["qdrant"], rows)
        if not row["identical"]
    ]
    diffs = [row["max_score_diff"] for row in rows if row["max_score_diff"] is not None]
    return {
        "group": name,
        "queries": len(queries),
        "identical": sum(row["identical"] for row in rows),
        "identical_share": sum(row["identical"] for row in rows) / len(rows),
        "same_set": sum(row["same_set"] for row in rows),
        "empty_results": sum(row["n"] == 0 for row in rows),
        "max_score_diff": max(diffs, default=0.0),
        "latency_ms": {engine: latency_stats(times[engine]).as_dict() for engine in engines},
        "mismatches": mismatches[:20],
    }


def markdown(report: dict[str, Any]) -> str:
    headers = ["queries", "n", "identical top-10", "same set", "max score diff", "Faiss p50 ms", "Faiss p90 ms",
               "Qdrant p50 ms", "Qdrant p90 ms"]  # fmt: skip
    rows = []
    for group in report["groups"]:
        lat = group["latency_ms"]
        rows.append([group["group"], group["queries"], f"{group['identical']} ({pct(group['identical_share'])} %)", group["same_set"],
                     f"{group['max_score_diff']:.1e}", lat["faiss"]["p50_ms"], lat["faiss"]["p90_ms"],
                     lat["qdrant"]["p50_ms"], lat["qdrant"]["p90_ms"]])  # fmt: skip
    total = report["total"]
    rows.append(["all", total["queries"], f"{total['identical']} ({pct(total['identical_share'])} %)", total["same_set"], "", "", "", "", ""])
    index, qdrant, env = report["index"], report["qdrant"], report["environment"]
    if qdrant["collection_before"] == "complete":
        loaded = "collection reused (loaded by an earlier run into --qdrant-path)"
    else:
        loaded = f"collection loaded in {qdrant['load_s']:.1f} s"
    met = "met" if total["identical_share"] >= TARGET_IDENTICAL else "missed"
    lines = [
        "# Backend parity: Faiss vs Qdrant (embedded)\n",
        markdown_table(headers, rows),
        (f"- index: {index['path']} version {index['version']}, {index['products']:,} products, {index['faiss_type']} "
         f"Faiss index; Qdrant {qdrant['mode']} ({qdrant['client']}), {loaded}"),
        f"- target: >= {pct(TARGET_IDENTICAL)} % identical top-{report['k']}: {met}",
        f"- machine: {env['cpu_count']} CPUs, load average {env['load_average_1m']:.1f}, {env['time']}; {report['seconds']:.0f} s in all",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, help=f"index directory (default: the first of {', '.join(DEFAULT_INDEXES)})")
    parser.add_argument("--bundle", type=Path, help="bundle to embed queries (default: the one the index records)")
    parser.add_argument("--qdrant-path", type=Path, help="embedded Qdrant folder to load into or reuse (default: a temporary one)")
    parser.add_argument("--text", type=int, default=200, help="text queries (default 200)")
    parser.add_argument("--photo", type=int, default=200, help="photo queries (default 200)")
    parser.add_argument("--filtered", type=int, default=100, help="filtered queries, half text, half photo (default 100)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args(argv)

    from vitrine.runtime import load_bundle

    index_dir = args.index or default_index()
    rng = random.Random(args.seed)
    started = time.perf_counter()
    faiss = ProductIndex.open(index_dir, mmap=False)
    bundle = args.bundle or Path(faiss.bundle_path)
    encoder = load_bundle(bundle, threads=2)
    records = [r for r in faiss.get_many(faiss.ids()) if r is not None]
    texts = text_queries(records, args.text + args.filtered // 2, rng)
    photos = photo_ids(faiss, args.photo + args.filtered - args.filtered // 2, rng)
    print(f"embedding {len(texts)} text and {len(photos)} photo queries with {bundle} ...", flush=True)
    text_embs = encoder.encode_texts(texts)
    photo_embs = np.concatenate([encoder.encode_images([faiss.open_image(i) for i in photos[s : s + 32]])
                                 for s in range(0, len(photos), 32)])  # fmt: skip

    temp = tempfile.TemporaryDirectory(prefix="vitrine-qdrant-") if args.qdrant_path is None else None
    path = args.qdrant_path or Path(temp.name)
    engine = QdrantEngine.embedded(path)
    state = collection_state(engine, faiss.version_dir)  # "complete": a --qdrant-path loaded by an earlier run
    load_started = time.perf_counter()
    load_version(engine, faiss.version_dir)
    load_s = time.perf_counter() - load_started
    qdrant = QdrantIndex.open(index_dir, engine=engine, version=faiss.version, load=False)
    print(f"qdrant collection {qdrant.collection} ready in {load_s:.1f} s", flush=True)
    engines = {"faiss": faiss, "qdrant": qdrant}

    n_text, n_photo, n_ft = args.text, args.photo, args.filtered // 2
    text_items = [(text_embs[i], "text", None, texts[i]) for i in range(n_text)]
    photo_items = [(photo_embs[i], "image", None, f"photo of {photos[i]}") for i in range(n_photo)]
    filtered = [(text_embs[n_text + i], "text", FILTERS[i % len(FILTERS)], texts[n_text + i]) for i in range(n_ft)]
    filtered += [(photo_embs[n_photo + i], "image", FILTERS[(i + 3) % len(FILTERS)], f"photo of {photos[n_photo + i]}")
                 for i in range(args.filtered - n_ft)]  # fmt: skip
    groups = []
    for name, items in (("text", text_items), ("photo", photo_items), ("filtered", filtered)):
        if items:
            group = run_group(name, items, engines, args.k)
            groups.append(group)
            print(f"{name}: {group['identical']}/{group['queries']} identical, "
                  f"faiss p50 {group['latency_ms']['faiss']['p50_ms']:.2f} ms, "
                  f"qdrant p50 {group['latency_ms']['qdrant']['p50_ms']:.2f} ms", flush=True)  # fmt: skip
    total_queries = sum(g["queries"] for g in groups)
    total_identical = sum(g["identical"] for g in groups)
    report = {
        "index": {"path": str(index_dir), "version": faiss.version, "products": len(faiss), "faiss_type": faiss.index_type},
        "bundle": str(bundle),
        "qdrant": {"mode": "embedded (local mode)", "client": f"qdrant-client {importlib.metadata.version('qdrant-client')}",
                   "load_s": load_s, "collection_before": state, "collection": qdrant.collection},
        "k": args.k,
        "seed": args.seed,
        "groups": groups,
        "total": {"queries": total_queries, "identical": total_identical, "identical_share": total_identical / total_queries,
                  "same_set": sum(g["same_set"] for g in groups)},
        "target_identical_share": TARGET_IDENTICAL,
        "seconds": time.perf_counter() - started,
        "environment": environment(),
        "command": " ".join(["python3", "bench/backend_parity.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    qdrant.close()
    engine.close()
    faiss.close()
    if temp is not None:
        temp.cleanup()
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "backend_parity.json", report)
    (args.out / "backend_parity.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0 if report["total"]["identical_share"] >= TARGET_IDENTICAL else 1


if __name__ == "__main__":
    raise SystemExit(main())
