"""`vitrine index`: build an index from a catalog, upsert products into it, or delete products from it."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vitrine.cliargs import non_negative_float, non_negative_int, positive_int

if TYPE_CHECKING:
    from indexer.qdrant_index import QdrantEngine

INDEX_TYPES_HELP = (
    "auto (by catalog size: flat up to 100k products, hnsw up to 2M, then ivfpq; the manifest's index.reason "
    "says why), flat (exact inner product), hnsw, ivfpq, or a Faiss factory string such as 'HNSW64,Flat'"
)


RAY_DEFAULTS = {"actors": 1, "threads": 1, "gpus": 0.0, "cpus": None, "block_size": 256, "retries": 3}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index",
        help="build, update or clean up a product search index",
        description=(
            "Embed a catalog's titles and images with a model bundle into an index directory "
            "(vectors, Faiss indexes, product store, manifest). Every change writes a new version "
            "and switches to it atomically, so a failed run leaves the previous index live.\n\n"
            "  build:   vitrine index --bundle B --catalog C --out I\n"
            "  upsert:  vitrine index --upsert --catalog C2 --out I   (add new, replace changed products)\n"
            "  delete:  vitrine index --delete ID [ID ...] --out I\n"
            "  gc:      vitrine index --gc --out I   (remove partial folders of killed builds and old versions\n"
            "           no server is reading; prints what it removed)\n"
            "  du:      vitrine index --du --out I   (bytes per product of every file of the live version)\n\n"
            "With --qdrant-url (a Qdrant server or cluster) or --qdrant-path (an embedded Qdrant folder), the\n"
            "live version is also loaded into a Qdrant collection after the operation, and collections of\n"
            "versions no longer on disk are dropped (the API key is read from $VITRINE_QDRANT_API_KEY):\n"
            "  load:    vitrine index --qdrant-load --out I --qdrant-url http://qdrant:6333 [--qdrant-shards 2 --qdrant-replicas 2]\n\n"
            "With --ray, a build embeds on Ray Data: a pool of actors, each with the bundle loaded once\n"
            "(a local Ray instance without an address; image paths must be readable by every worker):\n"
            "  ray:     vitrine index --bundle B --catalog C --out I --ray [ADDRESS] [--ray-actors 2 --ray-threads 1]"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", "-o", type=Path, required=True, help="index directory")
    parser.add_argument("--bundle", type=Path, help="model bundle (upsert: defaults to the one the index was built with)")
    parser.add_argument("--catalog", type=Path, help="catalog file or folder (products.jsonl, styles.csv, Fashion-Gen .h5)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--upsert", action="store_true", help="add new and replace changed products of --catalog")
    mode.add_argument("--delete", nargs="+", metavar="ID", help="remove these product ids")
    mode.add_argument("--gc", action="store_true",
                      help="remove partial folders left by killed builds and all but the newest --keep-versions "
                           "versions, except the live one and versions a running server is reading, and photos "
                           "in uploads/ that no version refers to (older than an hour)")  # fmt: skip
    mode.add_argument("--du", action="store_true", help="print what one product costs in each file of the live version")
    mode.add_argument("--qdrant-load", action="store_true",
                      help="only load the live version into Qdrant (--qdrant-url or --qdrant-path)")  # fmt: skip
    parser.add_argument("--index-type", help=INDEX_TYPES_HELP + " (default: auto)")
    parser.add_argument("--vector-dtype", choices=("auto", "float32", "float16"), default="auto",
                        help="stored vectors (default auto: float32 up to 100k products, float16 beyond)")  # fmt: skip
    parser.add_argument("--patch-storage", choices=("auto", "float16", "pca-int8"), default="auto",
                        help="stored reranker patches (default auto: float16 when they take <= 2 KB a product, "
                             "else PCA channels as int8 with a per-product scale)")  # fmt: skip
    parser.add_argument("--batch-size", type=positive_int, default=64, help="products per encoder batch (default: 64)")
    parser.add_argument("--threads", type=positive_int, help="encoder and image-decoding threads (default: min(4, CPUs))")
    parser.add_argument("--split", help="index only this split of the catalog (train/val/test)")
    parser.add_argument("--limit", type=positive_int, help="index at most this many products")
    parser.add_argument("--format", choices=("jsonl", "kaggle", "fashiongen"), help="catalog format (default: detect)")
    parser.add_argument("--image-root", type=Path, help="folder catalog image paths are relative to")
    parser.add_argument("--keep-versions", type=positive_int, default=2, help="index versions kept on disk (default: 2)")
    parser.add_argument("--json", action="store_true", help="print the operation's record as JSON")
    qdrant = parser.add_argument_group("Qdrant (a second vector engine for `vitrine serve --backend qdrant`)")
    target = qdrant.add_mutually_exclusive_group()
    target.add_argument("--qdrant-url", help="Qdrant server or cluster to load the live version into (http://host:6333)")
    target.add_argument("--qdrant-path", type=Path, help="embedded Qdrant folder to load it into (serve's default: <index>/qdrant)")
    qdrant.add_argument("--qdrant-collection", default="vitrine", help="collection prefix, one per index (default: vitrine)")
    qdrant.add_argument("--qdrant-shards", type=positive_int, help="shards of a new collection (server; default: Qdrant's)")
    qdrant.add_argument("--qdrant-replicas", type=positive_int, help="copies of each shard (cluster; default: Qdrant's)")
    ray = parser.add_argument_group("Ray (build only: embed on a Ray cluster, `pip install vitrine[ray]`)")
    ray.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                     help="embed with Ray Data actors: at ADDRESS (ray://host:10001, auto), or a local instance "
                          "when no address is given")  # fmt: skip
    ray.add_argument("--ray-actors", type=positive_int, metavar="N", default=RAY_DEFAULTS["actors"],
                     help="encoder actors (default: 1)")  # fmt: skip
    ray.add_argument("--ray-threads", type=positive_int, metavar="N", default=RAY_DEFAULTS["threads"],
                     help="threads (and CPUs reserved) per actor (default: 1)")  # fmt: skip
    ray.add_argument("--ray-gpus", type=non_negative_float, metavar="G", default=RAY_DEFAULTS["gpus"],
                     help="GPUs per actor; > 0 runs the bundle on onnxruntime-gpu's CUDA provider (default: 0)")  # fmt: skip
    ray.add_argument("--ray-cpus", type=positive_int, metavar="N", help="CPUs of a local Ray instance (default: all)")
    ray.add_argument("--ray-block-size", type=positive_int, metavar="N", default=RAY_DEFAULTS["block_size"],
                     help="products per Ray block, the unit a failed task retries (default: 256)")  # fmt: skip
    ray.add_argument("--ray-retries", type=non_negative_int, metavar="N", default=RAY_DEFAULTS["retries"],
                     help="restarts of a dead actor and retries of a failed block (default: 3)")  # fmt: skip
    parser.set_defaults(func=main_index)


def main_index(args: argparse.Namespace) -> int:
    from vitrine.errors import UserError

    progress = sys.stderr.isatty()
    if args.qdrant_load:
        return main_qdrant_load(args)
    if args.gc:
        return main_gc(args)
    if args.du:
        return main_du(args)
    if args.delete:
        if args.catalog or args.bundle or args.index_type:
            raise UserError("--delete takes only ids and --out (no --catalog, --bundle or --index-type)")
        from indexer.build import delete_from_index

        result = delete_from_index(args.out, args.delete, keep_versions=args.keep_versions)
    else:
        if args.catalog is None:
            raise UserError("--catalog is required to build or upsert")
        tuned = [o for o in ("actors", "threads", "gpus", "cpus", "block_size", "retries")
                 if getattr(args, f"ray_{o}") != RAY_DEFAULTS[o]]  # fmt: skip
        if tuned and args.ray is None:
            raise UserError(f"--ray-{tuned[0].replace('_', '-')} is an option of --ray")
        if args.ray is not None and args.upsert:
            raise UserError("--ray builds a whole index; an upsert embeds only the changed products, in this process")
        encoder, bundle = _encoder(args)
        catalog = _read_catalog(args, progress)
        from indexer.build import build_index, upsert_index

        if args.upsert:
            if args.index_type is not None:
                raise UserError("--index-type is fixed when the index is built; rebuild to change it")
            result = upsert_index(
                args.out, catalog, encoder, batch_size=args.batch_size, threads=args.threads,
                progress=progress, keep_versions=args.keep_versions,
            )  # fmt: skip
        elif args.ray is not None:
            result = _build_on_ray(args, catalog, encoder, bundle, progress)
        else:
            result = build_index(
                catalog, encoder, args.out, index_type=args.index_type or "auto", vector_dtype=args.vector_dtype,
                patch_storage=args.patch_storage, batch_size=args.batch_size,
                threads=args.threads, bundle_path=bundle, progress=progress, keep_versions=args.keep_versions,
            )  # fmt: skip
    collection = _load_into_qdrant(args)
    if args.json:
        record = {
            "version": str(result.version_dir),
            **({"qdrant_collection": collection} if collection else {}),
            "operation": result.operation.model_dump(mode="json"),
            "counts": result.manifest.counts.model_dump(mode="json"),
            "index": result.manifest.index,
            "errors": [e.model_dump(mode="json") for e in result.errors],
        }
        print(json.dumps(record, indent=2, ensure_ascii=False))
    else:
        print(result.summary())
        if collection:
            print(f"qdrant: collection {collection} holds the live version")
    return 0


def _build_on_ray(args: argparse.Namespace, catalog, encoder, bundle: Path, progress: bool):
    """build_index with the embedding step on Ray actors; the rest of the build is the same code."""
    from indexer.build import build_index
    from indexer.ray_embed import BundleLoader, RayEmbedding, RayOptions, ray_session

    options = RayOptions(actors=args.ray_actors, threads_per_actor=args.ray_threads, gpus_per_actor=args.ray_gpus,
                         block_size=args.ray_block_size, retries=args.ray_retries)  # fmt: skip
    device = "cuda" if args.ray_gpus > 0 else "cpu"
    step = RayEmbedding(BundleLoader(bundle.expanduser().absolute(), threads=args.ray_threads, device=device), options, progress)
    # Ray prints cluster events (a worker died, its task is retried) on stdout; stdout is the command's result.
    with contextlib.redirect_stdout(sys.stderr), ray_session(args.ray, num_cpus=args.ray_cpus):
        return build_index(
            catalog, encoder, args.out, index_type=args.index_type or "flat", batch_size=args.batch_size,
            threads=args.ray_threads, bundle_path=bundle, progress=progress, keep_versions=args.keep_versions,
            embed_step=step,
        )  # fmt: skip


def _qdrant_engine(args: argparse.Namespace) -> QdrantEngine | None:
    """The Qdrant engine --qdrant-url / --qdrant-path name, or None."""
    import os

    from indexer.qdrant_index import QdrantEngine

    options = {"prefix": args.qdrant_collection}
    if args.qdrant_url:
        return QdrantEngine.connect(args.qdrant_url, api_key=os.environ.get("VITRINE_QDRANT_API_KEY") or None,
                                    shard_number=args.qdrant_shards, replication_factor=args.qdrant_replicas, **options)  # fmt: skip
    if args.qdrant_path:
        return QdrantEngine.embedded(args.qdrant_path, **options)
    return None


def _load_into_qdrant(args: argparse.Namespace) -> str | None:
    """Load the live version into Qdrant and drop pruned versions' collections; its collection's name."""
    from indexer.layout import IndexLayout
    from indexer.qdrant_index import sync_index

    if not (args.qdrant_url or args.qdrant_path):
        return None
    IndexLayout(args.out).resolve()  # no index there: say so before creating anything
    engine = _qdrant_engine(args)
    try:
        with IndexLayout(args.out).lock():  # one writer: no two loads race to create the same collection
            return sync_index(engine, args.out)
    finally:
        engine.close()


def main_qdrant_load(args: argparse.Namespace) -> int:
    from vitrine.errors import UserError

    if args.catalog or args.bundle or args.index_type:
        raise UserError("--qdrant-load takes only --out and the --qdrant-* options")
    if not (args.qdrant_url or args.qdrant_path):
        raise UserError("--qdrant-load needs --qdrant-url or --qdrant-path")
    collection = _load_into_qdrant(args)
    print(json.dumps({"qdrant_collection": collection}) if args.json else f"qdrant: collection {collection} holds the live version")
    return 0


def main_du(args: argparse.Namespace) -> int:
    from indexer.layout import IndexLayout
    from indexer.storage import format_sizes, version_sizes
    from vitrine.errors import UserError

    if args.catalog or args.bundle or args.index_type:
        raise UserError("--du takes only --out")
    sizes = version_sizes(IndexLayout(args.out).resolve())
    print(json.dumps(sizes, indent=2) if args.json else format_sizes(sizes))
    return 0


def main_gc(args: argparse.Namespace) -> int:
    from indexer.layout import IndexLayout
    from vitrine.errors import UserError

    if args.catalog or args.bundle or args.index_type:
        raise UserError("--gc takes only --out and --keep-versions (no --catalog, --bundle or --index-type)")
    from indexer.uploads import clean_uploads

    layout = IndexLayout(args.out)
    cleanup = layout.gc(keep=args.keep_versions)
    with layout.lock():  # photos written over HTTP that no version kept refers to any more
        cleanup.removed += clean_uploads(layout)
    if args.json:
        record = {
            "removed": [{"path": str(path), "bytes": size} for path, size in cleanup.removed],
            "removed_bytes": cleanup.removed_bytes,
            "kept_leased": [str(path) for path in cleanup.leased],
        }
        print(json.dumps(record, indent=2))
        return 0
    for path, size in cleanup.removed:
        print(f"removed {path} ({_megabytes(size)})")
    for path in cleanup.leased:
        print(f"kept {path}: a running server is reading it")
    print(f"gc: removed {len(cleanup.removed)} folder(s) and file(s), {_megabytes(cleanup.removed_bytes)}; "
          f"live version {layout.current().name}")  # fmt: skip
    return 0


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def _encoder(args: argparse.Namespace):
    """The bundle encoder; an upsert without --bundle uses the bundle the index was built with."""
    import faiss

    from vitrine.errors import UserError
    from vitrine.runtime import load_bundle

    bundle = args.bundle
    if bundle is None:
        if not args.upsert:
            raise UserError("--bundle is required to build an index")
        from indexer.layout import IndexLayout
        from indexer.manifest import read_manifest

        current = IndexLayout(args.out).current()
        if current is None:
            raise UserError(f"no index at {args.out} to upsert into; build one first")
        path = read_manifest(current).bundle.path
        if not path:
            raise UserError(f"the index at {args.out} does not record its bundle; pass --bundle")
        bundle = Path(path)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    return load_bundle(bundle, threads=args.threads), bundle


def _read_catalog(args: argparse.Namespace, progress: bool):
    from vitrine.catalog import read_catalog

    return read_catalog(
        args.catalog, format=args.format, split=args.split, limit=args.limit,
        image_root=args.image_root, progress=progress,
    )  # fmt: skip
