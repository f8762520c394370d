"""Vector search of several bundles on bench/hybrid.py's query sets, without building an index.

hybrid.py measures the service's three modes with one bundle; this compares bundles on the vector mode
alone: each bundle embeds a split's products (titles and photos), each query ranks them by the bundle's
fused T2P score (its α_t2p), and the sets are hybrid.py's own (t2p, brand, title, and paraphrase: T2P
queries whose article type is a shopper word the catalog does not use, "purses", "sneakers"). The
paraphrase set is the check that a model trained on catalog words also serves words it never saw.

    python3 bench/query_sets.py --bundles bundles/lr/unlock-lr10/seed0 bundles/q/lr10-q0.1/seed0 --out bench/out/query-sets
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, pct, write_json, write_markdown_table  # noqa: E402
from hybrid import K, metrics, p10_ceiling, query_sets  # noqa: E402

SETS = ("t2p", "brand", "title", "paraphrase")


def rank_products(scores: np.ndarray, ids: np.ndarray, k: int = K) -> list[list[str]]:
    """Each query's top-k product ids by score (ties: lower row first)."""
    assert scores.ndim == 2 and scores.shape[1] == len(ids), (scores.shape, len(ids))
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [ids[row].tolist() for row in top]


def evaluate_bundle(bundle_dir: Path, products: list, sets: dict[str, list[tuple[str, set[str]]]]) -> dict:
    from vitrine.evaluation.encoder import encode_images, encode_texts
    from vitrine.runtime import load_bundle
    from vitrine.scoring import Alphas, fused_scores

    bundle = load_bundle(bundle_dir)
    alpha = Alphas.of(bundle.manifest).for_kind("text")
    started = time.perf_counter()
    titles = encode_texts(bundle, [p.title for p in products], progress=False)
    images = encode_images(bundle, [p.image for p in products], progress=False)
    out: dict = {"bundle": str(bundle_dir), "alpha_t2p": alpha, "embed_seconds": round(time.perf_counter() - started, 1)}
    ids = np.array([p.id for p in products])
    for name in SETS:
        queries = sets[name]
        query_embs = encode_texts(bundle, [q for q, _ in queries], progress=False)
        out[name] = metrics(rank_products(fused_scores(query_embs, titles, images, alpha), ids), queries)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", type=Path, nargs="+", required=True)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/fashion-products"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--queries", type=int, default=500, help="queries per set (hybrid.py's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="the split's first N products only (a smoke run)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/query-sets"))
    args = ap.parse_args()

    from vitrine.catalog.registry import read_catalog

    products = read_catalog(str(args.data)).by_split(args.split)[: args.limit]
    sets = query_sets(products, args.queries, args.seed)
    results = [evaluate_bundle(bundle, products, sets) for bundle in args.bundles]
    meta = {"date": date.today().isoformat(), "split": args.split, "products": len(products), "seed": args.seed,
            "queries": {name: len(sets[name]) for name in SETS},
            "p10_ceiling": {name: round(pct(p10_ceiling(sets[name])), 1) for name in SETS}}  # fmt: skip
    write_json(args.out / "query_sets.json", {"meta": meta, "environment": environment(), "bundles": results})
    headers = ["bundle", "α_t2p"] + [f"{name} {m}" for name in SETS for m in ("nDCG@10", "R@1")]
    rows = [[r["bundle"], r["alpha_t2p"]] + [f"{pct(r[name][m]):.1f}" for name in SETS for m in ("nDCG@10", "R@1")]
            for r in results]  # fmt: skip
    write_markdown_table(args.out / "query_sets.md", headers, rows, title=f"Vector search on {args.split}: query sets of bench/hybrid.py",
                         notes=[f"{k}: {v}" for k, v in meta.items()])  # fmt: skip
    print((args.out / "query_sets.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
