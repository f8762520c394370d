"""Hybrid search (issue 15): vector vs lexical (BM25) vs hybrid on three query sets; fusion picked on val.

Each split's products are indexed on their own (as the T2P protocol ranks the split's products), with
the bundle, and searched through the service's own `SearchEngine` (`search.qrels.Pipeline`, the code
behind POST /search/text). Query sets, composed from each split's catalog:

- t2p: the T2P shopper queries of `vitrine eval` ("women red handbags"; relevant = every product with
  all named attributes), `vitrine.evaluation.queries`, same seed.
- brand: brand + article type ("puma sports shoes"; relevant = that brand and that article type).
  Myntra titles read "<Brand> <Gender> ...", so a product's brand is the words of its title before the
  first gender word (Men, Women, Boys, Girls, Unisex, Kids), lower-cased; titles without one (5 %) get no
  brand and are never relevant. Brands are exact: "lee" is not "lee cooper", "adidas" not "adidas originals".
  `brand` takes the (brand, type) pairs with at least 3 products in the split (a query with one relevant
  product caps P@10 at 0.1, so it says little about P@10); `brand10` takes every pair with at least 10
  (its P@10 ceiling is 100); `brand_all` samples every pair, for comparison.
  Each set's P@10 ceiling (mean min(10, relevant) / 10) is reported beside it.
- title: a product's exact title; relevant = every product of the split with that title.
- paraphrase (a diagnostic, not one of the three): T2P queries whose article type is swapped for a word
  shoppers use and the catalog's types do not (`PARAPHRASES`: tees, sneakers, purses, shades, ...);
  relevant as in t2p. It shows what BM25 misses when the words differ; the three sets above are all
  made of catalog words, which favours BM25.

Metrics per mode: nDCG@10 (binary gains), P@10, R@1 (the first result is relevant; = P@1). Hybrid fuses
the vector and the BM25 top 100 (`vitrine.fusion.hybrid_depth`). On val every fusion in the grid
(method x BM25 weight) is scored offline from those two lists, exactly as the engine fuses them, and the
best mean nDCG@10 over t2p, brand, title and paraphrase is picked (`pick_fusion`); on test the engine's
hybrid mode (its defaults, set from that pick) runs, and is checked equal to the offline fusion.
The test split's brand queries are also written as TREC qrels + BEIR queries for `vitrine eval --qrels`.

    python3 bench/hybrid.py --bundle runs/demo/bundle --data $VITRINE_DATA   # bench/out/hybrid/
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import environment, write_json

from vitrine.evaluation.qrels import ndcg_at, precision_at
from vitrine.fusion import DEFAULT_FUSION, DEFAULT_LEXICAL_WEIGHT, FUSION_METHODS, fuse_lists, hybrid_depth

GENDER_WORDS = {"men", "women", "boys", "girls", "unisex", "kids"}
MAX_BRAND_WORDS = 4
K = 10
WEIGHTS = (0.3, 0.5, 0.7, 0.85)  # BM25 weight; the vector list gets 1 - w
SETS = ("t2p", "brand", "title")  # the three the issue names
PICK_SETS = ("t2p", "brand", "title", "paraphrase")  # the fusion is picked on their mean nDCG@10 on val
ALL_SETS = ("t2p", "brand", "brand10", "brand_all", "title", "paraphrase")
MIN_BRAND_PRODUCTS = 3
FULL_BRAND_PRODUCTS = K  # brand10: pairs with at least 10 products, where P@10 can reach 100
PARAPHRASES = {
    "tshirts": "tees", "casual shoes": "sneakers", "sports shoes": "trainers", "watches": "wristwatch",
    "handbags": "purses", "sunglasses": "shades", "flip flops": "slippers", "briefs": "underwear",
    "trousers": "pants", "sweaters": "jumpers", "backpacks": "rucksacks", "perfume and body mist": "fragrance",
    "track pants": "joggers", "flats": "ballerinas", "heels": "stilettos", "caps": "hats", "dresses": "frocks",
    "jeans": "denims", "formal shoes": "oxfords",
}  # fmt: skip


def brand_of(title: str) -> str | None:
    """The title's words before its first gender word (see the module docstring), lower-cased."""
    words = title.split()
    for i, word in enumerate(words[: MAX_BRAND_WORDS + 1]):
        if word.lower() in GENDER_WORDS:
            return " ".join(words[:i]).lower() or None
    return None


def article_of(product: Any) -> str:
    return (product.attribute("articleType") or product.subcategory).strip()


def query_sets(products: Sequence[Any], n: int, seed: int) -> dict[str, list[tuple[str, set[str]]]]:
    """Set name -> [(query text, relevant product ids)]."""
    from vitrine.evaluation.queries import compose_shopper_queries, relevance_matrix

    ids = np.array([p.id for p in products])
    shopper = compose_shopper_queries(products, n, seed=seed)
    relevant = relevance_matrix(shopper, products)
    t2p = [(q.text, set(ids[relevant[i]].tolist())) for i, q in enumerate(shopper)]

    by_pair: dict[tuple[str, str], set[str]] = {}
    for p in products:
        brand, article = brand_of(p.title), article_of(p)
        if brand and article:
            by_pair.setdefault((brand, article.lower()), set()).add(p.id)
    rng = np.random.default_rng([seed, 15])
    brand_sets = {}
    for name, least in (("brand", MIN_BRAND_PRODUCTS), ("brand_all", 1)):
        pairs = sorted(pair for pair, found in by_pair.items() if len(found) >= least)
        picked = sorted(rng.choice(len(pairs), size=min(n, len(pairs)), replace=False))
        brand_sets[name] = [(f"{pairs[i][0]} {pairs[i][1]}", by_pair[pairs[i]]) for i in picked]
    # Every pair with at least 10 products (no sampling, so the sets above keep their draws).
    brand_sets["brand10"] = [(f"{b} {a}", found) for (b, a), found in sorted(by_pair.items()) if len(found) >= FULL_BRAND_PRODUCTS]

    by_title: dict[str, set[str]] = {}
    for p in products:
        by_title.setdefault(p.title.strip(), set()).add(p.id)
    titles = sorted(by_title)
    picked = sorted(rng.choice(len(titles), size=min(n, len(titles)), replace=False))
    title = [(titles[i], by_title[titles[i]]) for i in picked]
    pool = [q for q in compose_shopper_queries(products, 100_000, seed=seed) if dict(q.filters).get("articleType") in PARAPHRASES]
    pool = [pool[i] for i in sorted(rng.choice(len(pool), size=min(n, len(pool)), replace=False))]
    relevant = relevance_matrix(pool, products)
    paraphrase = []
    for i, q in enumerate(pool):
        article = dict(q.filters)["articleType"]
        paraphrase.append((q.text.replace(article, PARAPHRASES[article]), set(ids[relevant[i]].tolist())))
    return {"t2p": t2p, **brand_sets, "title": title, "paraphrase": paraphrase}


def metrics(runs: Sequence[Sequence[str]], queries: Sequence[tuple[str, set[str]]]) -> dict[str, float]:
    ndcg, p10, capped, r1 = [], [], [], []
    for ranked, (_, relevant) in zip(runs, queries):
        judged = dict.fromkeys(relevant, 1)
        ndcg.append(ndcg_at(ranked, judged, K))
        p10.append(precision_at(ranked, judged, K))
        capped.append(precision_at(ranked, judged, K) * K / min(K, len(relevant)))
        r1.append(float(bool(ranked) and ranked[0] in relevant))
    return {"nDCG@10": float(np.mean(ndcg)), "P@10": float(np.mean(p10)), "R@1": float(np.mean(r1)),
            "P@10_capped": float(np.mean(capped))}  # relevant in the top 10 / min(10, relevant): the T2P protocol's R@10_capped


def p10_ceiling(queries: Sequence[tuple[str, set[str]]]) -> float:
    return float(np.mean([min(K, len(relevant)) / K for _, relevant in queries]))


def ensure_index(root: Path, split: str, data: Path, bundle: Path) -> Path:
    from indexer.build import build_index
    from indexer.layout import IndexLayout
    from vitrine.catalog import read_catalog
    from vitrine.runtime import load_bundle

    out = root / f"index-{split}"
    if not IndexLayout(out).is_index():
        started = time.perf_counter()
        result = build_index(read_catalog(data, split=split), load_bundle(bundle, threads=2), out, threads=2)
        print(f"built {out} in {time.perf_counter() - started:.0f} s: {result.summary()}", flush=True)
    return out


def first_stage(engine: Any, queries: Sequence[tuple[str, set[str]]], depth: int) -> tuple[list[dict], list[dict]]:
    """Per query, the vector and the BM25 top `depth` (id -> score), as the engine's hybrid mode reads them
    (the vector list with fetch_k = depth, whose top 10 is also exactly the vector mode's top 10)."""
    from search.service.cache import normalise_query

    vector, lexical = [], []
    for text, _ in queries:
        emb = engine.encoder.encode_texts([normalise_query(text)])[0]
        vector.append({h.id: h.score for h in engine.index.search(emb, k=depth, kind="text", fetch_k=depth)})
        lexical.append({h.id: h.score for h in engine.search_text(text, k=depth, alpha=None, filters=None, mode="lexical").hits})
    return vector, lexical


def top(scores: dict[str, float], k: int = K) -> list[str]:
    return [i for i, _ in sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:k]]


def fusion_grid(vector: list[dict], lexical: list[dict]) -> dict[str, list[list[str]]]:
    runs = {}
    for method in FUSION_METHODS:
        for w in WEIGHTS:
            runs[f"{method}-w{w}"] = [
                [i for i, _ in fuse_lists([v, x], method=method, weights=[1 - w, w], k=K)] for v, x in zip(vector, lexical)
            ]
    return runs


def evaluate_split(split: str, args: argparse.Namespace) -> dict[str, Any]:
    from search.qrels import Pipeline
    from vitrine.catalog import read_catalog

    index = ensure_index(args.index_root, split, args.data, args.bundle)
    products = read_catalog(args.data, split=split).products
    sets = query_sets(products, args.queries, args.seed)
    pipeline = Pipeline.open(index, args.bundle)
    out: dict[str, Any] = {"products": len(products), "queries": {name: len(qs) for name, qs in sets.items()}, "sets": {},
                           "p10_ceiling": {name: p10_ceiling(qs) for name, qs in sets.items()}}  # fmt: skip
    try:
        engine = pipeline.engine
        for name, queries in sets.items():
            started = time.perf_counter()
            vector, lexical = first_stage(engine, queries, hybrid_depth(K))
            runs = {"vector": [top(v) for v in vector], "lexical": [top(x) for x in lexical], **fusion_grid(vector, lexical)}
            entry = {mode: metrics(run, queries) for mode, run in runs.items()}
            if split == "test":  # the engine's own hybrid mode, with the defaults picked on val
                engine_runs, seconds = [], {"vector": 0.0, "lexical": 0.0, "hybrid": 0.0}
                for text, _ in queries:
                    for mode in seconds:
                        t = time.perf_counter()
                        hits = engine.search_text(text, k=K, alpha=None, filters=None, mode=mode).hits
                        seconds[mode] += time.perf_counter() - t
                        if mode == "hybrid":
                            engine_runs.append([h.id for h in hits])
                entry["hybrid"] = metrics(engine_runs, queries)
                default = f"{DEFAULT_FUSION}-w{DEFAULT_LEXICAL_WEIGHT}"
                if default in runs:
                    entry["hybrid"]["same_as_offline_fusion"] = engine_runs == runs[default]
                entry["ms_per_query"] = {mode: round(1000 * s / len(queries), 2) for mode, s in seconds.items()}
            if split == "test" and name == "brand":
                write_qrels(args.out / "brand-test", queries)
            out["sets"][name] = entry
            print(f"{split} {name}: {len(queries)} queries in {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        pipeline.close()
    return out


def write_qrels(folder: Path, queries: Sequence[tuple[str, set[str]]]) -> None:
    """TREC qrels + BEIR queries.jsonl of a query set (for `vitrine eval --qrels`)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "qrels.txt", "w") as qrels, open(folder / "queries.jsonl", "w") as texts:
        for n, (text, relevant) in enumerate(queries):
            texts.write(json.dumps({"_id": f"b{n}", "text": text}) + "\n")
            qrels.writelines(f"b{n} 0 {doc} 1\n" for doc in sorted(relevant))


def pick_fusion(val: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """The grid entry with the best mean nDCG@10 over `PICK_SETS`: the three sets, and paraphrase so that
    the pick does not simply follow the catalog words the three are made of."""
    means = {
        name: float(np.mean([val["sets"][s][name]["nDCG@10"] for s in PICK_SETS]))
        for name in val["sets"]["t2p"]
        if name not in ("vector", "lexical")
    }
    return max(means, key=lambda name: (means[name], name)), means


def render(report: dict[str, Any]) -> str:
    lines = [f"# Hybrid search (issue 15): {report['config']['bundle']}\n"]
    for split in ("val", "test"):
        result = report[split]
        lines.append(f"## {split}: {result['products']:,} products, queries {result['queries']}\n")
        modes = list(result["sets"]["t2p"])
        modes = [m for m in modes if m != "ms_per_query"]
        lines.append("| mode | " + " | ".join(f"{s} nDCG@10 | {s} P@10 | {s} R@1" for s in ALL_SETS) + " |")
        lines.append("|---|" + "---|" * (3 * len(ALL_SETS)))
        for mode in modes:
            cells = [f"{100 * result['sets'][s][mode][m]:.1f}" for s in ALL_SETS for m in ("nDCG@10", "P@10", "R@1")]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines.append("\nP@10 ceiling (mean min(10, relevant) / 10): "
                     + ", ".join(f"{s} {100 * v:.1f}" for s, v in result["p10_ceiling"].items()) + "\n")  # fmt: skip
        lines.append("P@10 capped (relevant in the top 10 / min(10, relevant); 100 = as good as the judgments allow):\n")
        lines.append("| mode | " + " | ".join(ALL_SETS) + " |")
        lines.append("|---|" + "---|" * len(ALL_SETS))
        for mode in modes:
            lines.append(f"| {mode} | " + " | ".join(f"{100 * result['sets'][s][mode]['P@10_capped']:.1f}" for s in ALL_SETS) + " |")
        lines.append("")
        if split == "test":
            lines.append("ms/query (engine, in process): " + json.dumps({s: result["sets"][s]["ms_per_query"] for s in ALL_SETS}) + "\n")
    lines.append(f"fusion picked on val: {report['picked']} (mean nDCG@10 over the sets: "
                 + ", ".join(f"{k} {100 * v:.1f}" for k, v in sorted(report['val_fusion_means'].items())) + ")")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="catalog (the shared fashion-products folder)")
    parser.add_argument("--index-root", type=Path, default=Path("runs/hybrid"), help="per-split indexes (built once, reused)")
    parser.add_argument("--queries", type=int, default=500, help="queries per set (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/hybrid"))
    parser.add_argument("--val-only", action="store_true", help="only pick the fusion on val (set it in vitrine.fusion, then run all)")
    args = parser.parse_args()
    report: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}, "environment": environment()}
    report["val"] = evaluate_split("val", args)
    report["picked"], report["val_fusion_means"] = pick_fusion(report["val"])
    report["engine_default"] = f"{DEFAULT_FUSION}-w{DEFAULT_LEXICAL_WEIGHT}"
    if report["picked"] != report["engine_default"]:
        print(f"note: val picks {report['picked']}, the engine's default is {report['engine_default']}", flush=True)
    if args.val_only:
        write_json(args.out / "val.json", report)
        print(json.dumps(report["val_fusion_means"], indent=1), json.dumps(report["val"]["sets"], indent=1))
        return 0
    report["test"] = evaluate_split("test", args)
    write_json(args.out / "results.json", report)
    (args.out / "results.md").write_text(render(report), encoding="utf-8")
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
