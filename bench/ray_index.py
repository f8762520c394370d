"""Indexing on Ray Data against the single-process build, side by side, and 10M products projected.

    python3 bench/ray_index.py --out bench/out [--bundle DIR] [--catalog DIR] [--limit 1000] [--actors 1,2]

Reads the first `--limit` products of the catalog and builds the same index (flat) several ways in
one run, each into its own folder under a temporary directory (the bundle and catalog are only read):

- single process, `threads=1` and `threads=2` (`indexer.build.build_index` as `vitrine index` runs it);
- Ray Data on a local instance with `--ray-cpus` CPUs, one row per actor count in `--actors`, each
  actor with `--threads-per-actor` threads (`indexer.ray_embed.RayEmbedding`).

For each Ray run it records the wall time of the embedding step, the time until the first block
came back, the actors' summed embedding time and the driver's own time, and checks that the vectors
equal the single-process ones. From the per-actor rate (products per second of actor embedding time,
1 thread) and Ray's measured overheads it projects the time to embed 10 million products on N machines
(`--cores-per-machine`, one 1-thread actor per core), stating what the projection assumes.
Writes ray_index.json and ray_index.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.common import environment, write_json, write_markdown_table  # noqa: E402

DEFAULT_CATALOG = Path(os.environ.get("VITRINE_DATA") or REPO.parent / "shared" / "data" / "fashion-products")
DEFAULT_BUNDLE = REPO / "runs" / "demo" / "bundle"  # what `vitrine demo` trains
TARGET_PRODUCTS = 10_000_000
MACHINES = (1, 10, 100)


def _vectors(index_dir: Path) -> dict[str, np.ndarray]:
    from indexer.layout import IndexLayout

    version = IndexLayout(index_dir).resolve()
    return {name: np.load(version / f"{name}.npy") for name in ("labels", "text_vectors", "image_vectors")}


def _max_diff(a: Path, b: Path) -> float | None:
    """Largest |difference| of the stored vectors; None when the two indexes hold different products."""
    x, y = _vectors(a), _vectors(b)
    if not np.array_equal(x["labels"], y["labels"]):
        return None
    return float(max(np.abs(x[n] - y[n]).max() for n in ("text_vectors", "image_vectors")))


def project(per_actor_rate: float, startup_s: float, per_block_s: float, driver_s_per_product: float,
            tail_s_per_product: float, block_size: int, cores: int, actors_per_core: float, machines: int) -> dict[str, float]:  # fmt: skip
    """Seconds to index TARGET_PRODUCTS: start-up, the slower of the actors and the one driver, then the
    build's shared tail (store, Faiss, files), which runs on the driver's machine."""
    actors = max(1, int(machines * cores * actors_per_core))
    blocks = -(-TARGET_PRODUCTS // block_size)
    actors_s = TARGET_PRODUCTS / (actors * per_actor_rate) + blocks * per_block_s / actors
    driver_s = TARGET_PRODUCTS * driver_s_per_product
    tail_s = TARGET_PRODUCTS * tail_s_per_product
    return {"machines": machines, "actors": actors, "actors_s": actors_s, "driver_s": driver_s, "tail_s": tail_s,
            "total_s": startup_s + max(actors_s, driver_s) + tail_s}  # fmt: skip


def _feed_cost(products: list, n: int) -> float:
    """Seconds per product the driver spends turning products into a Ray dataset (as RayEmbedding does),
    for n products (the catalog's repeated); also warms Ray Data up before the timed runs."""
    import pickle

    import ray.data

    many = [products[i % len(products)] for i in range(n)]
    start = time.perf_counter()
    items = [{"row": i, "product": pickle.dumps(p)} for i, p in enumerate(many)]
    dataset = ray.data.from_items(items, override_num_blocks=-(-n // 256))
    seconds = time.perf_counter() - start
    del dataset, items
    return seconds / n


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.median(values)) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--limit", type=int, default=1000, help="products indexed (the catalog's first)")
    parser.add_argument("--actors", default="1,2", help="actor counts to run, comma-separated")
    parser.add_argument("--threads-per-actor", type=int, default=1)
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="every configuration once per round, in turns")
    parser.add_argument("--cores-per-machine", type=int, default=16, help="projection: cores of each machine")
    parser.add_argument("--actors-per-core", type=float, default=1.0, help="projection: 1-thread actors per core")
    parser.add_argument("--reference-rate", type=float, default=57.4,
                        help="projection: products/s of one 1-thread encoder on an idle core (docs/RESULTS.md: "
                             "114.8/s with 2 threads on the idle 2-core machine)")  # fmt: skip
    parser.add_argument("--feed-products", type=int, default=50_000, help="products fed (not run) to time the driver's feeding")
    parser.add_argument("--tail-us-per-product", type=float, default=33.0,
                        help="projection: the build after embedding, per product (docs/RESULTS.md: 184.5 s whole build "
                             "vs 183.8 s embedding for 21,100 products)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args()

    from indexer.build import build_index
    from indexer.ray_embed import BundleLoader, RayEmbedding, RayOptions, ray_session
    from vitrine.catalog import read_catalog
    from vitrine.runtime import load_bundle

    env_before = environment()
    catalog = read_catalog(args.catalog, limit=args.limit)
    encoders = {threads: load_bundle(args.bundle, threads=threads) for threads in (1, 2)}
    actor_counts = [int(a) for a in args.actors.split(",")]
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vitrine-ray-bench-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        with ray_session(num_cpus=args.ray_cpus):  # up for the whole run: every configuration shares its idle cost
            ray_start_s = time.perf_counter() - start
            feed_per_product = _feed_cost(catalog.products, args.feed_products)
            for round_ in range(args.rounds):
                for config in [("single", 1), *(("ray", a) for a in actor_counts), ("single", 2)]:
                    out = work / f"{config[0]}-{config[1]}-{round_}"
                    if config[0] == "single":
                        threads = config[1]
                        op = build_index(catalog, encoders[threads], out, threads=threads).operation
                        run = {"engine": f"single process, {threads} thread(s)", "actors": 0, "threads": threads,
                               "products": op.embedded, "embed_s": op.embed_seconds, "build_s": op.seconds}  # fmt: skip
                    else:
                        actors = config[1]
                        options = RayOptions(actors=actors, threads_per_actor=args.threads_per_actor, block_size=args.block_size)
                        step = RayEmbedding(BundleLoader(args.bundle.absolute(), threads=args.threads_per_actor), options)
                        op = build_index(catalog, encoders[1], out, threads=args.threads_per_actor, embed_step=step).operation
                        stats = step.stats
                        run = {
                            "engine": f"Ray Data, {actors} actor(s) x {args.threads_per_actor} thread(s)", "actors": actors,
                            "threads": args.threads_per_actor, "products": op.embedded, "embed_s": stats.wall_seconds,
                            "build_s": op.seconds, "first_block_s": stats.first_block_started_seconds,
                            "last_block_s": stats.last_block_finished_seconds, "first_result_s": stats.first_result_seconds,
                            "actor_embed_s": stats.actor_seconds, "feed_s": stats.feed_seconds,
                            "collect_s": stats.collect_seconds, "blocks": stats.blocks,
                            "record_bytes_per_product": stats.record_bytes / stats.products,
                            "per_actor_rate": stats.products / stats.actor_seconds,
                            # once the actors are up: from the first block's start to the last block's end
                            "steady_products_per_s": stats.products
                            / (stats.last_block_finished_seconds - stats.first_block_started_seconds),
                            "max_abs_diff_vs_single": _max_diff(work / f"single-1-{round_}", out),
                        }  # fmt: skip
                    run |= {"round": round_, "products_per_s": run["products"] / run["embed_s"],
                            "load_average_1m": os.getloadavg()[0]}  # fmt: skip
                    runs.append(run)
                    print(run, flush=True)
                    if not out.name.startswith("single-1-"):  # kept: the round's Ray runs compare with it
                        shutil.rmtree(out)

    engines = list(dict.fromkeys(r["engine"] for r in runs))
    keys = ("embed_s", "build_s", "products_per_s", "first_block_s", "last_block_s", "first_result_s",
            "steady_products_per_s", "per_actor_rate",
            "actor_embed_s", "feed_s", "collect_s", "blocks", "record_bytes_per_product")  # fmt: skip
    summary = [{"engine": e, "actors": next(r["actors"] for r in runs if r["engine"] == e), "runs": sum(r["engine"] == e for r in runs),
                **{k: _median([r for r in runs if r["engine"] == e], k) for k in keys}}
               for e in engines]  # fmt: skip
    # Ratios round by round (the same minutes of load), then their median.
    for row in summary:
        row["x_single_1_thread"] = float(np.median([
            r["products_per_s"] / s["products_per_s"] for r in runs for s in runs
            if r["engine"] == row["engine"] and s["round"] == r["round"] and s["engine"] == engines[0]
        ]))  # fmt: skip
        row["max_abs_diff_vs_single"] = max((r.get("max_abs_diff_vs_single") or 0.0) for r in runs if r["engine"] == row["engine"])
    single1 = summary[0]
    one = next(r for r in summary if r["actors"] == 1)
    per_actor_rate = one["per_actor_rate"]
    # Overheads from the 1-actor runs: what the wall time holds beyond the actor's own embedding.
    startup_s = one["first_block_s"]  # actor start, bundle load, first scheduling
    per_block_s = max(0.0, (one["last_block_s"] - one["first_block_s"] - one["actor_embed_s"]) / one["blocks"])  # gaps
    finish_s = one["embed_s"] - one["last_block_s"]  # the last results reaching the driver
    # The driver's per-product work: feeding (measured at --feed-products) and placing results (these runs).
    driver_per_product = feed_per_product + one["collect_s"] / args.limit
    tail_measured = (single1["build_s"] - single1["embed_s"]) / args.limit  # fixed costs dominate at this size
    tail_per_product = args.tail_us_per_product / 1e6
    projections = {
        name: [project(rate, startup_s, per_block_s, driver_per_product, tail_per_product, args.block_size,
                       args.cores_per_machine, args.actors_per_core, n) for n in MACHINES]
        for name, rate in (("measured here", per_actor_rate), ("idle-core reference", args.reference_rate))
    }  # fmt: skip
    record = {
        "bench": "ray_index", "environment_before": env_before, "environment_after": environment(),
        "bundle": str(args.bundle), "catalog": str(args.catalog), "limit": args.limit, "block_size": args.block_size,
        "ray_cpus": args.ray_cpus, "rounds": args.rounds, "ray_start_s": ray_start_s, "runs": runs, "summary": summary,
        "overheads": {"ray_start_s": ray_start_s, "startup_s": startup_s, "per_block_s": per_block_s, "finish_s": finish_s,
                      "feed_s_per_product": feed_per_product, "driver_s_per_product": driver_per_product,
                      "per_actor_rate": per_actor_rate, "build_tail_s_per_product": tail_per_product,
                      "build_tail_s_per_product_measured_here": tail_measured},
        "assumptions": {"cores_per_machine": args.cores_per_machine, "actors_per_core": args.actors_per_core,
                        "reference_rate": args.reference_rate, "target_products": TARGET_PRODUCTS},
        "projections": projections,
    }  # fmt: skip
    write_json(args.out / "ray_index.json", record)
    table = [
        [r["engine"], r["runs"], r["embed_s"], r["products_per_s"], r["x_single_1_thread"], r["first_block_s"], r["last_block_s"],
         r["steady_products_per_s"], r["per_actor_rate"], r["max_abs_diff_vs_single"] if r["actors"] else None]
        for r in summary
    ]  # fmt: skip
    projection_lines = [
        (f"10M products, {name} ({rate:.1f}/s per actor), {p['machines']} machine(s) x {args.cores_per_machine} cores "
         f"({p['actors']} actors): {p['total_s'] / 3600:.2f} h = actors {p['actors_s'] / 3600:.2f} h | driver "
         f"{p['driver_s'] / 3600:.2f} h, + build tail {p['tail_s'] / 3600:.2f} h")
        for name, rate in (("measured here", per_actor_rate), ("idle-core reference", args.reference_rate))
        for p in projections[name]
    ]  # fmt: skip
    write_markdown_table(
        args.out / "ray_index.md",
        ["engine", "runs", "embed s", "products/s", "x single 1-thread (same round)", "first block started s",
         "last block done s", "products/s once up", "per-actor products/s", "max abs diff vs single"],
        table,
        title=f"Ray Data indexing, {args.limit:,} products of {args.catalog.name} (medians of {args.rounds} rounds)",
        notes=[
            (f"Ray local instance ({args.ray_cpus} CPUs) start {ray_start_s:.1f} s, not in 'embed s'; load average "
             f"{env_before['load_average_1m']:.1f} before, {record['environment_after']['load_average_1m']:.1f} after, "
             f"on {env_before['cpu_count']} cores."),
            (f"Overheads (1 actor): start-up until the first block starts {startup_s:.1f} s, {per_block_s * 1000:.0f} ms "
             f"between blocks of {args.block_size}, {finish_s:.2f} s from the last block to the driver; driver {driver_per_product * 1e6:.0f} us per product (feeding {feed_per_product * 1e6:.0f} "
             f"us at {args.feed_products:,} products, {one['record_bytes_per_product']:.0f} B pickled record; placing "
             f"results the rest). The build after embedding (store, Faiss, files): {tail_measured * 1e6:.0f} us per product "
             f"here at {args.limit:,} products (fixed costs), {args.tail_us_per_product:.0f} us in the projection."),
            *projection_lines,
        ],
    )  # fmt: skip
    print((args.out / "ray_index.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
