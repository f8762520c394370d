"""Reranking quality by how the index stores patches: the same reranker fed each storage's decoded patches.

    python bench/rerank_patches.py --bundle bundles/r12/teacher --features-bundle bundles/r12/base --split test --out bench/out

Variants (bytes a product of patch data in brackets): the image graph's grid as float16 (the old
default), the reranker's pooled grid as float16, and the pooled grid as PCA-int8 codes at the index's
automatic channel count and at fewer channels. The PCA basis is fitted on the split's own patches, as a
first index build fits it on its catalog. Each variant runs the rerank evaluator (sample T2I, T2P;
the bundle's prior weight, and the logit alone, which shows what the patches change even when the
prior keeps the first stage's order) on the same queries. Writes rerank_patches.json and rerank_patches.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import environment, write_json, write_markdown_table  # noqa: E402

DEFAULT_CATALOG = REPO.parent / "shared" / "data" / "fashion-products"
BUDGET = 2048


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="bundle carrying the reranker")
    parser.add_argument("--features-bundle", required=True, help="bundle whose cached (full-grid) product features to use")
    parser.add_argument("--catalog", default=str(DEFAULT_CATALOG))
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-queries", type=int, default=1000)
    parser.add_argument("--t2p-queries", type=int, default=500)
    parser.add_argument("--components", type=int, nargs="*", default=[32], help="extra PCA channel counts to try")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="runs/cache")
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args(argv)

    from indexer.patch_codec import PatchCodec, components_for
    from trainer.patches import bundle_product_features
    from vitrine.catalog.registry import read_catalog
    from vitrine.evaluation.rerank import RerankEvaluator
    from vitrine.runtime import load_bundle, read_manifest
    from vitrine.runtime.patch_grid import pool_patches
    from vitrine.runtime.reranker import load_reranker

    products = [p for p in read_catalog(args.catalog).products if p.split == args.split]
    feats = bundle_product_features(args.features_bundle, products, args.cache, progress=False)
    encoder = load_bundle(args.features_bundle)
    reranker = load_reranker(args.bundle, read_manifest(args.bundle), threads=args.threads)
    if reranker is None:
        sys.exit(f"rerank_patches: {args.bundle} carries no reranker")
    spec = reranker.spec
    full = np.asarray(feats.patches)
    source = spec.input_grid
    pooled = pool_patches(full, source, spec.patch_grid).astype(np.float16)
    variants: dict[str, tuple[np.ndarray, float]] = {}
    if source != tuple(spec.patch_grid):
        variants[f"{source[0]}x{source[1]} float16 (pooled by the reranker)"] = (full, full[0].size * 2)
    variants[f"{spec.patch_grid[0]}x{spec.patch_grid[1]} float16"] = (pooled, pooled[0].size * 2)
    for r in [components_for(spec.num_patches, spec.patch_dim), *args.components]:
        codec = PatchCodec.fit(pooled, r)
        codes, scales = codec.encode(pooled)
        decoded = codec.decode(codes, scales)
        err = float(np.linalg.norm(decoded - pooled.astype(np.float32)) / np.linalg.norm(pooled.astype(np.float32)))
        variants[f"{spec.patch_grid[0]}x{spec.patch_grid[1]} pca-int8 r={r} (rel. error {err:.3f})"] = (decoded, codec.bytes_per_product(spec.num_patches))

    evaluator = RerankEvaluator(top_n=spec.default_top_n, num_queries=args.num_queries, t2p_queries=args.t2p_queries, tia_pairs=200,
                                alpha_t2p=encoder.alphas.for_kind("text"), progress=False)
    results, rows = {}, []
    for name, (patches, nbytes) in variants.items():
        t0 = time.perf_counter()
        report = evaluator(reranker, products, feats.text, feats.image, patches, encoder.encode_texts)
        t2i, t2p = report["t2i_sample"], report["t2p"]
        results[name] = {"bytes_per_product": nbytes, "t2i_R@1": t2i["reranked"]["R@1"], "dual_t2i_R@1": t2i["dual_encoder"]["R@1"],
                         "t2p_nDCG@10": t2p["reranked"]["nDCG@10"], "dual_t2p_nDCG@10": t2p["dual_encoder"]["nDCG@10"],
                         "cross_only_t2i_R@1": t2i["cross_only"]["R@1"], "cross_only_t2p_nDCG@10": t2p["cross_only"]["nDCG@10"],
                         "rerank_ms_p50": t2i["rerank_ms_p50"], "seconds": round(time.perf_counter() - t0, 1)}
        r = results[name]
        rows.append([name, f"{nbytes:,.0f}", "yes" if nbytes <= BUDGET else "no", f"{100 * r['t2i_R@1']:.1f} ({100 * r['dual_t2i_R@1']:.1f})",
                     f"{100 * r['t2p_nDCG@10']:.1f} ({100 * r['dual_t2p_nDCG@10']:.1f})",
                     f"{100 * r['cross_only_t2i_R@1']:.1f} / {100 * r['cross_only_t2p_nDCG@10']:.1f}", f"{r['rerank_ms_p50']:.1f}"])
        print(" | ".join(rows[-1]), flush=True)
    report = {"environment": environment(), "bundle": args.bundle, "split": args.split, "prior_weight": reranker.prior_weight,
              "patch_grid": list(spec.patch_grid), "source_grid": list(source), "results": results}
    out = Path(args.out)
    write_json(out / "rerank_patches.json", report)
    write_markdown_table(out / "rerank_patches.md", ["patches stored", "B/product", f"<= {BUDGET} B", "sample T2I R@1 after rerank (dual)",
                                                     "T2P nDCG@10 after rerank (dual)", "logit alone: T2I R@1 / T2P nDCG@10",
                                                     "T2I top-20 rerank p50 ms"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
