"""Index memory and speed at scale: Faiss flat, HNSW, IVF-PQ (and OPQ + IVF-PQ) at 100k and 1M vectors.

    python3 bench/scale.py --index /work/main/runs/demo/index --out bench/out/scale [--sizes 100000 1000000]
    python3 bench/scale.py --report-only --out bench/out/scale   # redo the markdown (and projection) from the JSON

Vectors: the real catalog's 21,100 image vectors (the demo index), plus synthetic vectors
drawn as a mixture around the real ones: x = normalise(v + s * L z), v a random real vector,
z ~ N(0, I), L L^T the real vectors' covariance, s chosen so that cos(x, v) matches the real
catalog's median nearest-neighbour cosine. Each synthetic vector inherits its parent's
attributes, so a filter selects a region of the space as a real filter does.

Queries: real title vectors of the catalog's test split (text -> image search, the engine's
cross-modal case and the harder one for an ANN index built on image vectors).

Every index comes from the factory string the engine uses (`indexer.faiss_index.resolve_spec`),
plus an OPQ prefix variant of IVF-PQ. Per index: bytes per vector (serialised), build time
(train + add; IVF trains on a sample), recall@10 of the raw top 10 against exact search, recall@10
the engine gives (top `fetch_k`=100 from the index, re-scored exactly from the stored vectors),
and p50 latency of one query (one thread, as the engine searches) without and with filters, the
filters applied as the engine applies them (flat: an IDSelector over the allowed labels;
approximate: over-fetch, doubling until 100 matches survive), plus Faiss's own IDSelector
inside HNSW/IVF for comparison.

Faiss runs with 2 OpenMP threads for builds (the machine has 2 cores, shared with other jobs).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import faiss

from bench.common import environment, latency_stats, write_json
from indexer import ProductIndex, faiss_index
from indexer.candidates import OVERFETCH_MAX, filtered_plan
from indexer.layout import IndexLayout
from indexer.store import SqliteProductStore

K = 10
FETCH_K = 100  # the engine's default_fetch_k(10)
FILTERS = {"gender=women": ("gender", "women"), "articleType=watches": ("articleType", "watches")}
TRAIN_SAMPLE = 100_000  # IVF / OPQ training vectors at most (a sample of the catalog)
SEED = 0


# ------------------------------------------------------------------ data


def load_real(index_dir: Path) -> dict[str, Any]:
    folder = IndexLayout(index_dir).resolve()
    manifest = json.loads((folder / "manifest.json").read_text())
    image = np.load(folder / manifest["files"]["image_vectors"]).astype(np.float32)
    text = np.load(folder / manifest["files"]["text_vectors"]).astype(np.float32)
    with SqliteProductStore(folder / manifest["files"]["store"]) as store:
        records = [record for _, record in store.scan()]
    splits = {}
    for line in (Path(manifest["catalog"]["source"]) if Path(manifest["catalog"]["source"]).is_absolute() else
                 Path("/work/shared/data/fashion-products")).joinpath("products.jsonl").open():  # fmt: skip
        row = json.loads(line)
        splits[str(row["id"])] = row["split"]
    attrs = {name: np.array([r.attribute(field).strip().lower() for r in records]) for name, (field, _) in FILTERS.items()}
    test = np.array([splits.get(r.id) == "test" for r in records])
    return {"image": image, "text": text, "attrs": attrs, "test": test, "version": folder.name}


def mixture_scale(real: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """s such that the median cos(synthetic, parent) equals the real median nearest-neighbour cosine."""
    index = faiss.IndexFlatIP(real.shape[1])
    index.add(real)
    sims, _ = index.search(real[rng.choice(len(real), 2000, replace=False)], 2)
    target = float(np.median(sims[:, 1]))
    trace = float(np.trace(np.cov(real.T)))
    # |v|=1 and v.n ~ 0: cos = 1 / sqrt(1 + s^2 tr(C))
    return float(np.sqrt((1.0 / target**2 - 1.0) / trace)), target


def synthesize(real: np.ndarray, attrs: dict[str, np.ndarray], n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """The real vectors plus n - len(real) synthetic ones (mixture around real vectors), L2-normalised."""
    s, target = mixture_scale(real, rng)
    chol = np.linalg.cholesky(np.cov(real.T) + 1e-6 * np.eye(real.shape[1])).astype(np.float32)
    out = np.empty((n, real.shape[1]), np.float32)
    out[: len(real)] = real
    parents = np.concatenate([np.arange(len(real)), rng.integers(0, len(real), n - len(real))])
    for start in range(len(real), n, 100_000):
        stop = min(n, start + 100_000)
        noise = rng.standard_normal((stop - start, real.shape[1]), dtype=np.float32) @ chol.T
        block = real[parents[start:stop]] + s * noise
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    check = np.einsum("ij,ij->i", out[len(real) : len(real) + 2000], real[parents[len(real) : len(real) + 2000]]) if n > len(real) else np.array([target])
    info = {"mixture_scale": round(s, 4), "target_median_nn_cos": round(target, 4), "median_cos_to_parent": round(float(np.median(check)), 4)}
    return out, {name: a[parents] for name, a in attrs.items()}, info


# ------------------------------------------------------------------ indexes


def configs(n: int, dim: int) -> dict[str, str]:
    """Name -> factory string: the engine's own specs, plus OPQ in front of its IVF-PQ."""
    ivfpq = faiss_index.resolve_spec("ivfpq", n, dim).factory  # IVF{nlist},PQ{m}np
    m = faiss_index._pq_subquantizers(dim)
    return {
        "flat": faiss_index.resolve_spec("flat", n, dim).factory,
        "hnsw": faiss_index.resolve_spec("hnsw", n, dim).factory,
        "ivfpq": ivfpq,
        "opq+ivfpq": f"OPQ{m},{ivfpq}",
    }


def build(factory: str, vectors: np.ndarray, rng: np.random.Generator, niter: int | None = None) -> tuple[Any, faiss_index.IndexSpec, dict[str, float]]:
    spec = faiss_index._custom_spec(factory, vectors.shape[1]) if factory.startswith("OPQ") else next(
        faiss_index.resolve_spec(t, len(vectors), vectors.shape[1]) for t in ("flat", "hnsw", "ivfpq")
        if faiss_index.resolve_spec(t, len(vectors), vectors.shape[1]).factory == factory
    )  # fmt: skip
    index = faiss.index_factory(vectors.shape[1], spec.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if niter and ivf is not None:  # fewer k-means iterations (Faiss default 25) to fit the time budget
        ivf.cp.niter = niter
        pre = faiss.downcast_index(index)
        if isinstance(pre, faiss.IndexPreTransform):
            faiss.downcast_VectorTransform(pre.chain.at(0)).niter = niter
    t0 = time.perf_counter()
    if not index.is_trained:
        sample = vectors[np.sort(rng.choice(len(vectors), min(TRAIN_SAMPLE, len(vectors)), replace=False))]
        index.train(sample)
    t1 = time.perf_counter()
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    t2 = time.perf_counter()
    return index, spec, {"train_s": t1 - t0, "add_s": t2 - t1, "build_s": t2 - t0}


def serialized_bytes(index: Any) -> int:
    return int(faiss.serialize_index(index).nbytes)


# ------------------------------------------------------------------ search, as the engine does it


def engine_top(spec, index, vectors, query, allowed_mask=None, allowed_labels=None, n=None, probe_more=False,
               planned=True) -> np.ndarray:  # fmt: skip
    """Top K rows the engine returns: top FETCH_K candidates from the index, re-scored exactly."""
    if allowed_mask is None:
        rows = faiss_index.search(spec, index, query, FETCH_K)
    elif spec.exact:
        rows = faiss_index.search(spec, index, query, FETCH_K, allowed_labels=allowed_labels)
    else:
        if planned and not probe_more:
            plan, first = filtered_plan(n, allowed_labels.size, FETCH_K, exact_index=False,
                                        brute_force_max_rows=ProductIndex.brute_force_max_rows,
                                        overfetch_max=OVERFETCH_MAX)  # fmt: skip
        else:  # before filtered_plan (and the rejected probe-more variant): exact up to 4,096 rows, else from FETCH_K
            small = allowed_labels.size <= ProductIndex.brute_force_max_rows
            plan, first = ("exact", 0) if small else ("overfetch", FETCH_K)
        if plan == "exact":
            rows = allowed_labels
        else:
            rows = overfetch(spec, index, query, allowed_mask, allowed_labels, n, probe_more, first)
    scores = vectors[rows] @ query
    return rows[np.argsort(-scores, kind="stable")[:K]]


def overfetch(spec, index, query, mask, allowed, n, probe_more: bool = False, first: int = FETCH_K) -> np.ndarray:
    """ProductIndex._overfetch for one index: fetch `first`, doubling until FETCH_K matches survive.
    `probe_more`: the alternative measured for IVF, doubling nprobe when a round comes back short."""
    wanted = min(FETCH_K, allowed.size)
    f = first
    nprobe, lists = spec.search.get("nprobe"), faiss_index.nlist(index)
    while f < n:
        labels = faiss_index.search(spec, index, query, f, nprobe=nprobe)
        rows = labels[mask[labels]][:wanted]
        if rows.size >= wanted:
            return rows
        if probe_more and labels.size < f and nprobe is not None and lists is not None and nprobe < lists:
            nprobe = min(lists, 2 * nprobe)
        else:
            f = min(n, 2 * f)
    return allowed


def native_selector_top(spec, index, vectors, query, bitmap) -> np.ndarray:
    """The alternative for approximate indexes: Faiss filters inside the HNSW walk / IVF scan."""
    sel = faiss.IDSelectorBitmap(len(bitmap) * 8, faiss.swig_ptr(bitmap))
    params = faiss_index.search_params(spec, index, FETCH_K, None)
    if params is None:
        params = faiss.SearchParameters()
    inner = getattr(params, "referenced_params", None) if isinstance(params, faiss.SearchParametersPreTransform) else None  # OPQ: the selector goes to the IVF's own parameters
    (inner if inner is not None else params).sel = sel
    with faiss_index.single_threaded():
        _, labels = index.search(query[None, :], FETCH_K, params=params)
    rows = labels[0][labels[0] >= 0]
    scores = vectors[rows] @ query
    return rows[np.argsort(-scores, kind="stable")[:K]]


def exact_filtered_top(vectors, query, allowed) -> np.ndarray:
    """The third way: score the whole filtered set exactly (what the engine does up to 4,096 rows)."""
    scores = vectors[allowed] @ query
    top = np.argpartition(-scores, K)[:K] if allowed.size > K else np.arange(allowed.size)
    return allowed[top[np.argsort(-scores[top], kind="stable")]]


def exact_top(vectors: np.ndarray, queries: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Exact top-K rows per query (brute force in blocks, 2 threads)."""
    if mask is None:
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return index.search(queries, K)[1]
    allowed = np.flatnonzero(mask)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors[allowed])
    return allowed[index.search(queries, K)[1]]


def recall(found: list[np.ndarray] | np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(map(int, f[:K])) & set(map(int, t))) / K for f, t in zip(found, truth)]))


def timed(fn, queries) -> tuple[list[np.ndarray], list[float]]:
    out, times = [], []
    for q in queries[:3]:
        fn(q)
    for q in queries:
        t0 = time.perf_counter()
        out.append(fn(q))
        times.append(time.perf_counter() - t0)
    return out, times


def p50_ms(times: list[float]) -> float:
    return round(latency_stats(times).p50_ms, 3)


# ------------------------------------------------------------------ run


def _engine_filtered(spec, index, vectors, mask, allowed, n, query, probe_more=False, planned=True):
    return engine_top(spec, index, vectors, query, mask, allowed, n, probe_more, planned)


def _native(spec, index, vectors, bitmap, query):
    return native_selector_top(spec, index, vectors, query, bitmap)


def _exact_filtered(vectors, allowed, query):
    return exact_filtered_top(vectors, query, allowed)


def run_size(n: int, real: dict, queries: np.ndarray, args, rng) -> dict[str, Any]:
    t0 = time.perf_counter()
    vectors, attrs, synth = synthesize(real["image"], real["attrs"], n, rng)
    gen_s = time.perf_counter() - t0
    dim = vectors.shape[1]
    nq_recall = args.recall_queries
    nq_latency = args.latency_queries if n <= 200_000 else args.latency_queries_large
    q_rec, q_lat = queries[:nq_recall], queries[:nq_latency]
    masks = {name: attrs[name] == FILTERS[name][1] for name in FILTERS}
    truth = {"none": exact_top(vectors, q_rec), **{name: exact_top(vectors, q_rec, m) for name, m in masks.items()}}
    result: dict[str, Any] = {
        "n": n, "dim": dim, "synthetic": synth, "generate_s": round(gen_s, 1),
        "filters": {name: {"field": FILTERS[name][0], "value": FILTERS[name][1], "selectivity": round(float(m.mean()), 4)}
                    for name, m in masks.items()},
        "indexes": {},
    }
    for name, factory in configs(n, dim).items():
        if name in args.skip.get(n, ()):
            result["indexes"][name] = {"factory": factory, "skipped": "over the time budget on this machine"}
            continue
        print(f"[{n:,}] {name}: {factory}", flush=True)
        index, spec, times = build(factory, vectors, rng, args.ivf_niter)
        row: dict[str, Any] = {"factory": spec.factory, "search": spec.search, **{k: round(v, 2) for k, v in times.items()},
                               "ivf_niter": args.ivf_niter}  # fmt: skip
        row["bytes_per_vector"] = round(serialized_bytes(index) / n, 1)
        raw = []
        with faiss_index.single_threaded():
            for q in q_rec:
                raw.append(faiss_index.search(spec, index, q, K))
        row["recall@10_raw"] = round(recall(raw, truth["none"]), 4)
        found = [engine_top(spec, index, vectors, q) for q in q_rec]
        row["recall@10_engine"] = round(recall(found, truth["none"]), 4)
        _, lat = timed(partial(engine_top, spec, index, vectors), q_lat)
        row["p50_ms"] = p50_ms(lat)
        if faiss_index.nlist(index) is not None and args.nprobe_sweep:
            row["nprobe_sweep"] = {}
            for nprobe in args.nprobe_sweep:
                probe = faiss_index.IndexSpec(spec.type, spec.factory, spec.removal, spec.exact, {**spec.search, "nprobe": nprobe})
                found = [engine_top(probe, index, vectors, q) for q in q_rec]
                _, lat = timed(partial(engine_top, probe, index, vectors), q_lat)
                row["nprobe_sweep"][nprobe] = {"recall@10_engine": round(recall(found, truth["none"]), 4), "p50_ms": p50_ms(lat)}
            print(f"   nprobe: {row['nprobe_sweep']}", flush=True)
        row["filtered"] = {}
        for fname, mask in (masks.items() if not args.no_filters else ()):
            allowed = np.flatnonzero(mask).astype(np.int64)
            bitmap = np.packbits(mask, bitorder="little")
            fn = partial(_engine_filtered, spec, index, vectors, mask, allowed, n)
            found = [fn(q) for q in q_rec[: args.filtered_recall_queries]]
            _, lat = timed(fn, q_lat)
            entry = {"recall@10_engine": round(recall(found, truth[fname]), 4), "p50_ms": p50_ms(lat)}
            if faiss_index.nlist(index) is not None:  # the alternative: probe more lists when a round comes back short
                fn0 = partial(_engine_filtered, spec, index, vectors, mask, allowed, n, probe_more=True)
                found0 = [fn0(q) for q in q_rec[: args.filtered_recall_queries]]
                _, lat0 = timed(fn0, q_lat)
                entry["probe_more"] = {"recall@10": round(recall(found0, truth[fname]), 4), "p50_ms": p50_ms(lat0)}
            if not spec.exact:  # the engine before indexer.candidates.filtered_plan
                fn1 = partial(_engine_filtered, spec, index, vectors, mask, allowed, n, planned=False)
                found1 = [fn1(q) for q in q_rec[: args.filtered_recall_queries]]
                _, lat1 = timed(fn1, q_lat)
                entry["before_plan"] = {"recall@10": round(recall(found1, truth[fname]), 4), "p50_ms": p50_ms(lat1)}
                fn2 = partial(_native, spec, index, vectors, bitmap)
                found2 = [fn2(q) for q in q_rec[: args.filtered_recall_queries]]
                _, lat2 = timed(fn2, q_lat)
                entry["faiss_selector"] = {"recall@10": round(recall(found2, truth[fname]), 4), "p50_ms": p50_ms(lat2)}
            fn3 = partial(_exact_filtered, vectors, allowed)
            _, lat3 = timed(fn3, q_lat)
            entry["exact_scan_p50_ms"] = p50_ms(lat3)
            row["filtered"][fname] = entry
        print(f"   {json.dumps(row)}", flush=True)
        result["indexes"][name] = row
        del index
        gc.collect()
    return result


def run_storage(index_dir: Path, rng: np.random.Generator) -> dict[str, Any]:
    """What storing vectors in float16 and patches compactly costs in quality, on the real demo index."""
    from indexer.patch_codec import PatchCodec
    from indexer.storage import version_sizes

    real = load_real(index_dir)
    folder = IndexLayout(index_dir).resolve()
    queries = real["text"][real["test"]]
    out: dict[str, Any] = {"demo_index": version_sizes(folder), "float16_vectors": {}, "compact_patches": []}
    for name in ("image", "text"):
        base = real[name]
        half = base.astype(np.float16).astype(np.float32)
        exact = faiss.IndexFlatIP(base.shape[1])
        exact.add(base)
        approx = faiss.IndexFlatIP(base.shape[1])
        approx.add(half)
        s32, i32 = exact.search(queries, K)
        _, i16 = approx.search(queries, K)
        out["float16_vectors"][name] = {
            "queries": len(queries), "recall@10_vs_float32": round(recall(i16, i32), 4),
            "max_abs_score_error": float(np.abs((half[i32] * queries[:, None, :]).sum(-1) - s32).max()),
        }  # fmt: skip
    out["demo_format_2"] = {}
    for kind in ("float16", "pca-int8"):
        copy = convert_demo(folder, REPO / "bench" / "out" / "scale" / f"demo-format2-{kind}", kind)
        out["demo_format_2"][kind] = {"sizes": version_sizes(IndexLayout(copy).resolve()),
                                      "parity": compare_demo(index_dir, copy, queries[:100])}  # fmt: skip
        print(json.dumps(out["demo_format_2"][kind]["parity"]), flush=True)
    patches = np.load(folder / "patches.npy", mmap_mode="r")
    held_out = np.asarray(patches[-1000:], dtype=np.float32)  # fit on other products, measure on these
    for r in (16, 24, 32, 48):
        codec = PatchCodec.fit(patches[:-1000], r)
        decoded = codec.decode(*codec.encode(held_out))
        cos = (decoded * held_out).sum(-1) / (np.linalg.norm(decoded, axis=-1) * np.linalg.norm(held_out, axis=-1) + 1e-12)
        pooled = (decoded.mean(1) * held_out.mean(1)).sum(-1) / (np.linalg.norm(decoded.mean(1), axis=-1) * np.linalg.norm(held_out.mean(1), axis=-1))
        out["compact_patches"].append({
            "components": r, "bytes_per_product": codec.bytes_per_product(patches.shape[1]),
            "relative_error": round(float(np.linalg.norm(decoded - held_out) / np.linalg.norm(held_out - codec.mean)), 4),
            "patch_cosine_mean": round(float(cos.mean()), 4), "pooled_cosine_mean": round(float(pooled.mean()), 4),
        })  # fmt: skip
    return out


def convert_demo(folder: Path, out: Path, patch_storage: str) -> Path:
    """A format-2 copy of a format-1 flat version (no re-embedding): vectors once, patches as `patch_storage`."""
    import shutil

    from indexer.build import FILES, _write_version_patches
    from indexer.manifest import read_manifest, write_manifest
    from indexer.storage import IndexStorage, storage_files

    manifest = read_manifest(folder)
    assert manifest.index["type"] == "flat" and manifest.storage is None, "expects the demo's format-1 flat index"
    if out.exists():
        shutil.rmtree(out)
    version = out / "versions" / folder.name
    version.mkdir(parents=True)
    for role in ("store", "labels", "text_vectors", "image_vectors"):
        shutil.copy(folder / FILES[role], version / FILES[role])
    storage = IndexStorage(vectors="float32", faiss_files=False, patches=patch_storage,
                           patch_components=24 if patch_storage == "pca-int8" else None,
                           reasons=[f"converted from format 1 by bench/scale.py, patches {patch_storage}"])  # fmt: skip
    patches = np.load(folder / manifest.files["patches"], mmap_mode="r")
    _write_version_patches(version, storage, patches, np.arange(len(patches)))
    converted = manifest.model_copy(update={"format_version": 2, "storage": storage, "files": storage_files(storage, FILES)})
    write_manifest(version, converted)
    (out / "CURRENT").write_text(folder.name + "\n")
    return out


def compare_demo(original: Path, converted: Path, queries: np.ndarray) -> dict[str, Any]:
    """Open time and search parity of the converted copy against the original (format 1) index."""
    from indexer.product_index import ProductIndex

    t0 = time.perf_counter()
    a = ProductIndex.open(original)
    t1 = time.perf_counter()
    b = ProductIndex.open(converted)
    t2 = time.perf_counter()
    try:
        filters = [None, {"gender": "women"}, {"articleType": "watches"}]
        same = total = 0
        for q in queries:
            for f in filters:
                total += 1
                same += a.search(q, k=10, filters=f) == b.search(q, k=10, filters=f)
        ids = a.ids()[:200]
        patch_error = float(np.linalg.norm(a.patches(ids) - b.patches(ids)) / np.linalg.norm(a.patches(ids)))
    finally:
        a.close()
        b.close()
    return {"open_s_format_1": round(t1 - t0, 2), "open_s_format_2": round(t2 - t1, 2), "searches": total,
            "identical_results": same, "patch_relative_error_200_products": round(patch_error, 4)}  # fmt: skip


def storage_markdown(data: dict[str, Any]) -> str:
    demo = data["demo_index"]
    lines = [f"## What one product costs today: the demo index ({demo['products']:,} products, format {demo['format_version']})\n",
             "| file | bytes | bytes/product |", "|---|---|---|"]  # fmt: skip
    for name, row in demo["files"].items():
        lines.append(f"| {name} | {row['bytes']:,} | {row['bytes_per_product']:,.1f} |")
    lines.append(f"| total | {demo['total_bytes']:,} | {demo['bytes_per_product']:,.1f} |\n")
    for kind, row in data.get("demo_format_2", {}).items():
        sizes, parity = row["sizes"], row["parity"]
        files = ", ".join(f"{name} {r['bytes_per_product']:,.0f}" for name, r in sizes["files"].items() if r["bytes_per_product"] >= 1)
        lines.append(
            f"- The same index converted to format 2 with {kind} patches: **{sizes['bytes_per_product']:,.0f} B a product** "
            f"({files}); opens in {parity['open_s_format_2']} s (format 1: {parity['open_s_format_1']} s); "
            f"{parity['identical_results']}/{parity['searches']} searches (100 test titles x no filter, gender=women, "
            f"articleType=watches) return identical hits and scores; patches' relative error {parity['patch_relative_error_200_products']}."
        )  # fmt: skip
    lines.append("\n## Quality of the compact forms (real demo vectors and patches)\n")
    lines.append("| vectors | recall@10 of float16 vs float32 (exact search, test-split title queries) | max score error |")
    lines.append("|---|---|---|")
    for name, row in data["float16_vectors"].items():
        lines.append(f"| {name} | {row['recall@10_vs_float32']:.4f} | {row['max_abs_score_error']:.2e} |")
    lines.append("\n| patch PCA components | bytes/product | relative error (vs centred) | mean patch cosine | mean pooled cosine |")
    lines.append("|---|---|---|---|---|")
    for row in data["compact_patches"]:
        lines.append(f"| {row['components']} | {row['bytes_per_product']:,} | {row['relative_error']:.3f} | {row['patch_cosine_mean']:.3f} | {row['pooled_cosine_mean']:.3f} |")
    return "\n".join(lines) + "\n"


def _filtered_cell(entry: dict[str, Any]) -> str:
    cell = f"{entry['p50_ms']:.2f} ({entry['recall@10_engine']:.3f})"
    if "before_plan" in entry:
        cell += f"; before the plan {entry['before_plan']['p50_ms']:.2f} ({entry['before_plan']['recall@10']:.3f})"
    if "probe_more" in entry:
        cell += f"; probing more lists instead {entry['probe_more']['p50_ms']:.2f} ({entry['probe_more']['recall@10']:.3f})"
    return cell + f"; exact scan of the set {entry['exact_scan_p50_ms']:.2f}"


def report(data: dict[str, Any], out: Path) -> Path:
    lines = [
        "# Index memory and speed at scale (bench/scale.py)\n",
        (f"Machine: {data['environment']['cpu_count']}-core CPU, shared with other jobs (load {data['environment']['load_average_1m']:.1f} at start); "
        f"Faiss {data['faiss']}, {data['threads']} OpenMP threads for builds, one thread per query. "
        f"Vectors: {data['real_vectors']:,} real image vectors + synthetic ones (mixture around real vectors, see below); "
        f"queries: {data['queries']} real test-split title vectors (text -> image). "
        f"Latency: one query, top {FETCH_K} from the index then exact re-scoring, as the engine does.\n"),
        "| vectors | index | factory | bytes/vector | build s (train + add) | recall@10 raw | recall@10 engine | p50 ms | "
        + " | ".join(f"{f} p50 ms (recall)" for f in FILTERS) + " | Faiss selector inside the index: " + ", ".join(FILTERS) + " |",
        "|" + "---|" * (9 + len(FILTERS)),
    ]
    for size in data["sizes"]:
        for name, row in size["indexes"].items():
            if "skipped" in row:
                lines.append(f"| {size['n']:,} | {name} | `{row['factory']}` | " + " | ".join(["skipped: " + row["skipped"]] + [""] * (6 + len(FILTERS))) + " |")
                continue
            filt = [_filtered_cell(row["filtered"][f]) if f in row["filtered"] else "not measured" for f in FILTERS]
            native = "; ".join(
                f"{row['filtered'][f]['faiss_selector']['p50_ms']:.2f} ms ({row['filtered'][f]['faiss_selector']['recall@10']:.3f})"
                for f in FILTERS if "faiss_selector" in row["filtered"].get(f, {})
            ) or "n/a (exact)"  # fmt: skip
            lines.append(
                f"| {size['n']:,} | {name} | `{row['factory']}` | {row['bytes_per_vector']:,.0f} | {row['build_s']:.1f} "
                f"({row['train_s']:.1f} + {row['add_s']:.1f}) | {row['recall@10_raw']:.3f} | {row['recall@10_engine']:.3f} | "
                f"{row['p50_ms']:.2f} | " + " | ".join(filt) + f" | {native} |"
            )
    lines.append("")
    for size in data["sizes"]:
        sel = ", ".join(f"{f} {v['selectivity']:.1%}" for f, v in size["filters"].items())
        syn = size["synthetic"] or {}
        mix = (f"mixture scale s = {syn['mixture_scale']}, median cos(synthetic, parent) {syn['median_cos_to_parent']} "
               f"(target: the real catalog's median nearest-neighbour cosine, {syn['target_median_nn_cos']})") if syn else "see text"
        lines.append(f"- {size['n']:,} vectors: {mix}; filter selectivity {sel}.")
    lines.append("")
    lines.append(projection_markdown())
    if (out / "storage.json").is_file():
        lines.append(storage_markdown(json.loads((out / "storage.json").read_text())))
    path = out / "scale.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def projection_markdown() -> str:
    from indexer.storage import projection_rows

    rows = projection_rows([21_100, 100_000, 1_000_000, 10_000_000, 100_000_000])
    head = "| products | index type (auto) | " + " | ".join(rows[0]["per_file"]) + " | bytes/product | total |"
    out = ["## Bytes per product by file, projected (default settings)\n", head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        cells = " | ".join(f"{v:,.0f}" for v in row["per_file"].values())
        out.append(f"| {row['products']:,} | {row['index_type']} | {cells} | {row['bytes_per_product']:,.0f} | {row['total_gb']:,.1f} GB |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, default=REPO.parent.parent / "main" / "runs" / "demo" / "index")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "scale")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ivf-niter", type=int, help="k-means (and OPQ) iterations when training (default: Faiss's 25 / 50)")
    parser.add_argument("--recall-queries", type=int, default=500)
    parser.add_argument("--filtered-recall-queries", type=int, default=200)
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--latency-queries-large", type=int, default=60)
    parser.add_argument("--skip", nargs="*", default=[], metavar="N:NAME", help="index types to skip at a size, e.g. 1000000:hnsw")
    parser.add_argument("--nprobe-sweep", type=int, nargs="*", default=[], help="IVF: also measure these nprobe values (no filter)")
    parser.add_argument("--no-filters", action="store_true", help="skip the filtered measurements")
    parser.add_argument("--report-only", action="store_true", help="rewrite scale.md from scale.json")
    parser.add_argument("--storage", action="store_true", help="only measure float16 vectors and compact patches on the demo index")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.storage:
        write_json(args.out / "storage.json", run_storage(args.index, np.random.default_rng(SEED)))
        print(storage_markdown(json.loads((args.out / "storage.json").read_text())))
        return 0
    if args.report_only:
        print(report(json.loads((args.out / "scale.json").read_text()), args.out))
        return 0
    skip: dict[int, set[str]] = {}
    for item in args.skip:
        size, name = item.split(":")
        skip.setdefault(int(size), set()).add(name)
    args.skip = skip
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(SEED)
    real = load_real(args.index)
    queries = real["text"][real["test"]]
    queries = np.ascontiguousarray(queries[rng.permutation(len(queries))])
    data: dict[str, Any] = {
        "environment": environment(), "faiss": faiss.__version__, "threads": args.threads, "index_version": real["version"],
        "real_vectors": len(real["image"]), "queries": int(max(args.recall_queries, args.latency_queries)), "sizes": [],
    }  # fmt: skip
    for n in args.sizes:
        t0 = time.perf_counter()
        data["sizes"].append(run_size(n, real, queries, args, rng))
        data["sizes"][-1]["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(args.out / "scale.json", data)
    print(report(data, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
