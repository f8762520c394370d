"""`vitrine demo`: from a catalog to a searchable web page in one command.

Each stage is skipped when its output is already there, so a second run starts serving at once:
train a quick bundle (frozen towers, projections only; needs the `train` extra) unless --bundle
is given, export it, index the catalog with it, then serve.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from vitrine.cliargs import port, positive_int
from vitrine.catalog.splits import HASHED_SPLITS_NOTE
from vitrine.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_CATALOG = "../shared/data/fashion-products"
# Attention heads (+ mean-pooled residual) over cached token states (trainer.recipe). Not the train default
# (fashion-lite-apu, ~24 min): the demo is timed, and this trains in about 10 minutes.
DEMO_MODEL = "fashion-lite-apr"
DEMO_EPOCHS = 10
# Shopper queries spelled from the catalog's attributes ("women red handbags") train the heads too: +12 val
# T2P nDCG@10 for the quick model, the retrieval metrics within noise, ~40 s more (docs/RESULTS.md, session 6).
DEMO_QUERY_WEIGHT = 0.1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a quick bundle if needed, index a catalog and serve it",
        description=(
            "One command from a catalog to a searchable web page. Without --bundle it trains a quick model "
            "(frozen pretrained towers run once and cached, attention-pooling heads trained over the cache: minutes on "
            "2 CPU cores), exports it, indexes the "
            "catalog and serves it on 127.0.0.1. Stages whose outputs exist in --workdir are reused. "
            "Catalogs: the products.jsonl folder (default $VITRINE_DATA or ../shared/data/fashion-products), "
            "the Kaggle 'Fashion Product Images' download (a folder with styles.csv and images/), or Fashion-Gen .h5."
        ),
    )
    p.add_argument("--catalog", default=None, help="catalog path (default $VITRINE_DATA or ../shared/data/fashion-products)")
    p.add_argument("--bundle", type=Path, default=None, help="use this model bundle instead of training one")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="where the run, bundle and index go")
    p.add_argument("--epochs", type=positive_int, default=DEMO_EPOCHS, help=f"epochs of the quick training (default {DEMO_EPOCHS})")
    p.add_argument("--model", default=DEMO_MODEL, help=f"model config of the quick training (default {DEMO_MODEL})")
    p.add_argument("--pretrained", default=None, help="pretrained weights of the quick training (default: the config's)")
    p.add_argument("--train-limit", type=positive_int, default=None, help="train on the first N products of each split (faster)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--no-serve", action="store_true", help="stop after indexing (prints the serve command)")
    p.set_defaults(func=run_demo)


def default_catalog() -> str:
    return os.environ.get("VITRINE_DATA") or DEFAULT_CATALOG


def quick_bundle(catalog: str, workdir: Path, *, epochs: int, limit: int | None, model: str = DEMO_MODEL,
                 pretrained: str | None = None) -> Path:
    """Train the heads over frozen, cached towers and export them; reuses what is already in `workdir`."""
    bundle = workdir / "bundle"
    if (bundle / "manifest.json").is_file():
        log.info("reusing bundle %s", bundle)
        return bundle
    try:
        from trainer.bundle import export_checkpoint
        from trainer.train import TrainConfig, train
    except ImportError as exc:  # a serving-only install has no torch
        raise UserError(f"training a bundle needs the 'train' extra ({exc}); or pass --bundle") from exc
    run = workdir / "run"
    if not (run / "summary.json").is_file():
        print(f"[1/3] training a quick bundle on {catalog} (frozen towers, {epochs} epochs)", flush=True)
        train(TrainConfig(catalog=catalog, out=str(run), model=model, pretrained=pretrained, epochs=epochs,
                          text_unlocked_layers=0, limit=limit, cache_dir=str(workdir / "cache"),
                          val_every=max(1, epochs // 2), query_weight=DEMO_QUERY_WEIGHT))
    print(f"[1/3] exporting the bundle to {bundle}", flush=True)
    return export_checkpoint(run / "best.pt", bundle, catalog=catalog)


def ensure_index(catalog, bundle: Path, index_dir: Path) -> Path:
    """Index `catalog` (a read Catalog) with `bundle`, unless `index_dir` already holds that pairing."""
    from indexer.build import build_index
    from indexer.product_index import ProductIndex
    from vitrine.runtime import load_bundle

    encoder = load_bundle(bundle)
    if (index_dir / "CURRENT").is_file():
        index = ProductIndex.open(index_dir)
        same = index.bundle_fingerprint == encoder.fingerprint
        index.close()
        if same:
            log.info("reusing index %s", index_dir)
            return index_dir
    print(f"[2/3] indexing {catalog.source} into {index_dir}", flush=True)
    result = build_index(catalog, encoder, index_dir, bundle_path=bundle, progress=True)
    print(f"      {result.summary()}", flush=True)
    return index_dir


def run_demo(args: argparse.Namespace) -> int:
    from vitrine.catalog import read_catalog

    catalog = args.catalog or default_catalog()
    if not Path(catalog).exists():
        raise UserError(f"catalog not found: {catalog} (pass --catalog or set VITRINE_DATA)")
    started = time.perf_counter()
    products = read_catalog(catalog)  # fails early, with the reader's message, on a non-catalog
    if products.report.hashed_splits:
        print(f"{catalog}: {products.report.hashed_splits:,} rows have no split label: {HASHED_SPLITS_NOTE}", flush=True)
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or quick_bundle(catalog, workdir, epochs=args.epochs, limit=args.train_limit,
                                         model=args.model, pretrained=args.pretrained)
    index_dir = ensure_index(products, Path(bundle), workdir / "index")
    print(f"ready in {(time.perf_counter() - started) / 60:.1f} min (stages already in {workdir} are reused)", flush=True)
    if args.no_serve:
        print(f"ready: vitrine serve --index {index_dir} --host {args.host} --port {args.port}")
        return 0
    print("[3/3] serving", flush=True)
    from search.service.cli import run_server

    return run_server({"index": index_dir, "bundle": Path(bundle), "host": args.host, "port": args.port})
