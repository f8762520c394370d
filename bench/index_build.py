"""Index build speed and size: the full shared catalog through `indexer.build_index`.

    python3 bench/index_build.py --out bench/out [--bundle DIR] [--catalog DIR] [--threads 2]

Reports embedding throughput (products/s; target >= 80 on 2 cores), the whole build's
rate (catalog read, Faiss and writes included), bytes on disk per product, RSS growth
during the build, and search latency on the built index. Without --bundle an untrained
fashion-lite bundle is exported to a temporary directory first (speed does not depend
on the weights). Writes index_build.json and index_build.md.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import environment, latency_stats, write_json, write_markdown_table  # noqa: E402

PRODUCTS_PER_S_TARGET = 80.0
DEFAULT_CATALOG = REPO.parent / "shared" / "data" / "fashion-products"
SEARCH_QUERIES = 200


def rss_bytes() -> int:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples RSS in a thread: the peak during a block (ru_maxrss is the peak of the whole process)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def export_untrained(model: str, directory: Path) -> Path:
    from trainer.export import export_bundle
    from trainer.factory import create_model, get_tokenizer

    print(f"exporting an untrained {model} bundle to {directory} ...", file=sys.stderr)
    return export_bundle(create_model(model, pretrained="none"), get_tokenizer(model), directory / model)


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def search_latency(index_dir: Path, encoder, titles: list[str]) -> dict:
    from indexer import ProductIndex

    index = ProductIndex.open(index_dir)
    queries = encoder.encode_texts(titles)
    plain = [0.0] * len(queries)
    filtered = [0.0] * len(queries)
    for i, query in enumerate(queries):
        start = time.perf_counter()
        index.search(query, k=10)
        plain[i] = time.perf_counter() - start
        start = time.perf_counter()
        index.search(query, k=10, filters={"gender": "Women"})
        filtered[i] = time.perf_counter() - start
    return {"k10": latency_stats(plain).as_dict(), "k10_filtered_gender": latency_stats(filtered).as_dict()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--bundle", type=Path, help="an exported bundle (default: export untrained fashion-lite)")
    parser.add_argument("--model", default="fashion-lite", help="model config to export when no --bundle")
    parser.add_argument("--catalog", type=Path, default=Path(os.environ.get("VITRINE_DATA", DEFAULT_CATALOG)))
    parser.add_argument("--index-dir", type=Path, help="where to build (default: a temporary folder, removed after)")
    parser.add_argument("--index-type", default="flat")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, help="index only this many products")
    args = parser.parse_args(argv)

    import faiss

    from indexer.build import build_index
    from vitrine.catalog import read_catalog
    from vitrine.runtime import load_bundle

    faiss.omp_set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="vitrine-index-bench-") as tmp:
        bundle = args.bundle or export_untrained(args.model, Path(tmp))
        encoder = load_bundle(bundle, threads=args.threads)
        start = time.perf_counter()
        catalog = read_catalog(args.catalog, limit=args.limit, progress=sys.stderr.isatty())
        read_s = time.perf_counter() - start
        index_dir = args.index_dir or Path(tmp) / "index"
        rss_before = rss_bytes()
        load_before = os.getloadavg()[0]
        cpu_before = cpu_seconds()
        with PeakRss() as peak:
            start = time.perf_counter()
            result = build_index(
                catalog, encoder, index_dir, index_type=args.index_type, batch_size=args.batch_size,
                threads=args.threads, bundle_path=bundle, progress=sys.stderr.isatty(),
            )  # fmt: skip
            build_s = time.perf_counter() - start
        cores_used = (cpu_seconds() - cpu_before) / build_s
        load_after = os.getloadavg()[0]
        products = result.manifest.counts.products
        version_bytes = dir_bytes(result.version_dir)
        latency = search_latency(index_dir, encoder, [p.title for p in catalog.products[:SEARCH_QUERIES]])
        op = result.operation

    rss_growth = peak.peak - rss_before
    report = {
        "catalog": str(args.catalog),
        "bundle": str(args.bundle or f"untrained {args.model} (exported for this run)"),
        "embed_dim": result.manifest.embed_dim,
        "index": result.manifest.index,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "products_in": len(catalog.products),
        "products_indexed": products,
        "errors": op.errors,
        "catalog_read_s": round(read_s, 2),
        "embed_s": op.embed_seconds,
        "build_s": round(build_s, 2),
        "embed_products_per_s": op.products_per_s,
        "build_products_per_s": round(products / build_s, 2),
        "target_products_per_s": PRODUCTS_PER_S_TARGET,
        "meets_target": bool(op.products_per_s and op.products_per_s >= PRODUCTS_PER_S_TARGET),
        "cpu_cores_used_avg": round(cores_used, 2),  # < threads when other processes share the CPU
        "load_avg_1min_before_after": [round(load_before, 2), round(load_after, 2)],
        "index_bytes": version_bytes,
        "index_bytes_per_product": round(version_bytes / max(products, 1), 1),
        "rss_before_build_mb": round(rss_before / 2**20, 1),
        "rss_peak_growth_mb": round(rss_growth / 2**20, 1),
        "rss_growth_bytes_per_product": round(rss_growth / max(products, 1), 1),
        "process_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "search_latency_ms": latency,
        "environment": environment(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "index_build.json", report)
    rows = [
        ["products indexed", f"{products:,} of {len(catalog.products):,} ({op.errors} errors)"],
        ["index", f"{result.manifest.index['type']} ({result.manifest.index['factory']}), {result.manifest.embed_dim}-d"],
        ["embedding rate (products/s)", f"{op.products_per_s:.1f} (target >= {PRODUCTS_PER_S_TARGET:.0f}: {'met' if report['meets_target'] else 'NOT met'})"],
        ["whole build rate (products/s)", f"{report['build_products_per_s']:.1f} ({build_s:.1f} s; catalog read {read_s:.1f} s extra)"],
        ["CPU cores this process got (avg) / 1-min load before, after", f"{cores_used:.2f} of {args.threads} / {load_before:.1f}, {load_after:.1f}"],
        ["index on disk (bytes/product)", f"{report['index_bytes_per_product']:,.0f} ({version_bytes / 2**20:.1f} MiB)"],
        ["RSS growth during build (bytes/product)", f"{report['rss_growth_bytes_per_product']:,.0f} ({report['rss_peak_growth_mb']:.0f} MiB peak)"],
        ["search k=10 p50 / p99 (ms)", f"{latency['k10']['p50_ms']:.2f} / {latency['k10']['p99_ms']:.2f}"],
        ["search k=10 + gender filter p50 / p99 (ms)", f"{latency['k10_filtered_gender']['p50_ms']:.2f} / {latency['k10_filtered_gender']['p99_ms']:.2f}"],
    ]  # fmt: skip
    write_markdown_table(
        args.out / "index_build.md", ["measure", "value"], rows, title="Index build",
        notes=[
            f"bundle: {report['bundle']}; {args.threads} threads, batch {args.batch_size}; catalog {args.catalog}",
            "embedding rate = products / time in the embedding pipeline (image decode + preprocess overlapped with ONNX)",
            "RSS growth is mostly onnxruntime's arena for a batch of images (fixed, not per product)",
            "a CPU share below the thread count means other processes shared the cores: rates scale up on an idle machine",
            f"machine: {report['environment']['processor']}, {report['environment']['cpu_count']} CPUs",
        ],
    )  # fmt: skip
    print((args.out / "index_build.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
