"""`vitrine eval`: cross-modal retrieval and product-search metrics for any encoder."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vitrine.cliargs import non_negative_int, positive_int, unit_interval

log = logging.getLogger(__name__)

PROTOCOLS = ("sample", "full", "kagl", "t2p", "i2p")  # kept here so --help needs no numpy

DESCRIPTION = """\
Evaluate an encoder (any object with encode_texts/encode_images returning L2-normalised
float32 embeddings) on one split of a catalog. Each product contributes its text (the
title, or --text-field description) and its first image; both are encoded once.

Protocols (--protocols, default all):
  sample  Fashion-Gen protocol (FashionBERT, KaleidoBERT, FashionKLIP). --queries seeded
          queries; each ranks its ground truth among 1 + --candidates candidates drawn at
          random from the query product's subcategory, topped up from the whole split when
          the subcategory is too small (the report counts those queries). Negatives never
          carry the query's exact text. T2I: a product text ranks images; I2T: a product
          image ranks texts (distinct from each other). R@1/5/10.
  full    Every query against every candidate of the split, relevance by text: T2I
          queries are the distinct texts, and every product carrying exactly that text is
          a correct image; I2T queries are all product images against all distinct texts,
          the product's own text correct. R@1/5/10.
  kagl    Marqo's KAGL protocol (the public fashion-embedding leaderboard): up to
          --kagl-queries seeded distinct titles rank every image of the split (or of
          --gallery-catalog); relevant = every gallery product with exactly that title.
          BEIR-style R@1 and R@10 (share of the relevant found) and MRR@10.
  t2p     Text-to-product search (FashionKLIP sec. 5) with shopper queries composed from
          attributes ("women red handbags", "men sports shoes"), --t2p-queries of them;
          relevant = every product matching all named attributes. Products are ranked by
            Score_t2p = alpha * sim(q, title) + (1 - alpha) * sim(q, image).
          P@1, P@10, nDCG@10 (binary gains) and R@10_capped = relevant in the top 10 /
          min(10, relevant products).
  i2p     Image-to-product search: a seeded shopper photo of a product (crop keeping
          80-95 % of each side, flip, +-10 % brightness/contrast/saturation, JPEG 60-90)
          ranks all products by
            Score_i2p = alpha * sim(q_img, title) + (1 - alpha) * sim(q_img, image);
          relevant = that product. R@1/5/10/20 over --i2p-queries photos.

Ties count against the model everywhere: a rank is the number of wrong candidates
scoring >= the correct one. Same --seed, same metrics."""

EPILOG = """\
outputs in --out: metrics.json (all metrics, config, counts, timings), metrics.md
(tables) and recall_at_k.png (R@K for K = 1..20).

example:
  vitrine eval --catalog data/fashion-products --encoder tests.encoders:ColourHashEncoder \\
      --split test --out runs/eval-colourhash"""


def _protocol_list(value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join(PROTOCOLS)} (got {value!r})")
    return names


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate an encoder: sample/full/KAGL cross-modal retrieval, T2P and I2P product search",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--catalog", type=Path, default=None, help="catalog file or folder (any format vitrine reads); required"
    )
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    which = parser.add_mutually_exclusive_group()  # one of them is required: checked in main_eval
    which.add_argument(
        "--encoder",
        metavar="MODULE:ATTR",
        help="encoder class or zero-argument factory, e.g. tests.encoders:ColourHashEncoder",
    )
    which.add_argument(
        "--bundle",
        type=Path,
        metavar="DIR",
        help="exported model bundle (loaded by vitrine.runtime.load_bundle)",
    )
    parser.add_argument(
        "--protocols",
        type=_protocol_list,
        default=PROTOCOLS,
        metavar="LIST",
        help=f"comma-separated subset of {','.join(PROTOCOLS)} (default: all)",
    )
    parser.add_argument(
        "--text-field",
        choices=("title", "description"),
        default="title",
        help="product text used as query/candidate (default: title)",
    )
    parser.add_argument(
        "--queries",
        type=count_or_file,
        default=1000,
        metavar="N|FILE",
        help="sample protocol: queries per direction (default: 1000; fewer if the split is smaller); "
        "with --qrels, the queries FILE",
    )
    parser.add_argument(
        "--candidates",
        type=positive_int,
        default=100,
        help="sample protocol: negatives per query (default: 100)",
    )
    parser.add_argument(
        "--kagl-queries", type=positive_int, default=2000, help="KAGL: distinct titles as queries (default: 2000)"
    )
    parser.add_argument(
        "--gallery-catalog",
        type=Path,
        default=None,
        metavar="PATH",
        help="KAGL: rank this catalog's images (all of its products) instead of the split's",
    )
    parser.add_argument(
        "--t2p-queries", type=positive_int, default=500, help="T2P: shopper queries (default: 500)"
    )
    parser.add_argument(
        "--i2p-queries", type=positive_int, default=1000, help="I2P: shopper photos (default: 1000)"
    )
    parser.add_argument(
        "--alpha",
        type=unit_interval,
        default=None,
        help="weight of the title in T2P/I2P scores (default: the encoder's tuned alpha, else 0.5)",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed for every sampled query, negative and photo (default: 0)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="texts/images per encoder call (default: 64)"
    )
    parser.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        metavar="N",
        help="only the first N products of the split (smoke runs)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder for metrics.json, metrics.md, recall_at_k.png",
    )
    parser.set_defaults(func=main_eval)


def load_products(catalog: Path, split: str, limit: int | None) -> tuple[list, dict]:
    """The split's products and counts about the read (skipped rows are reported, not hidden)."""
    from vitrine.catalog import read_catalog
    from vitrine.errors import UserError

    read = read_catalog(catalog, split=split, limit=limit, progress=sys.stderr.isatty())
    if not read.products:
        raise UserError(f"{catalog}: no products in split {split!r} (choose another --split)")
    skipped = read.report.skipped
    if skipped:
        log.warning(
            "%s: %d catalog rows were skipped (run `vitrine catalog check` for details)", catalog, skipped
        )
    return read.products, {"catalog_format": read.format, "catalog_rows_skipped": int(skipped)}


def count_or_file(value: str) -> int | Path:
    """--queries: a count (the sample protocol's), or a file (judged queries, with --qrels)."""
    return positive_int(value) if value.strip().lstrip("+-").isdigit() else Path(value)


def main_eval(args: argparse.Namespace) -> int:
    from vitrine.errors import UserError

    if args.catalog is None or (args.encoder is None and args.bundle is None):
        raise UserError("vitrine eval needs --catalog and one of --encoder or --bundle "
                        "(or --qrels FILE --queries FILE --index DIR to score the search pipeline on judged queries)")  # fmt: skip
    if isinstance(args.queries, Path):
        raise UserError(f"--queries {args.queries} is a file: judged queries need --qrels (and --index)")
    from vitrine.evaluation.encoder import load_bundle_encoder, load_encoder
    from vitrine.evaluation.evaluator import EvalConfig, run_evaluation
    from vitrine.evaluation.report import render_markdown, write_report

    config = EvalConfig(
        protocols=tuple(args.protocols),
        queries=args.queries,
        kagl_queries=args.kagl_queries,
        candidates=args.candidates,
        t2p_queries=args.t2p_queries,
        i2p_queries=args.i2p_queries,
        alpha=args.alpha,
        seed=args.seed,
        batch_size=args.batch_size,
        text_field=args.text_field,
    )
    encoder = load_bundle_encoder(args.bundle) if args.bundle is not None else load_encoder(args.encoder)
    products, read_counts = load_products(args.catalog, args.split, args.limit)
    context = {
        "catalog": str(args.catalog),
        "split": args.split,
        "limit": args.limit,
        "encoder_spec": args.encoder if args.bundle is None else f"bundle:{args.bundle}",
    }
    gallery = None
    if args.gallery_catalog is not None:
        from vitrine.catalog import read_catalog

        gallery = read_catalog(args.gallery_catalog, progress=sys.stderr.isatty()).products
        context["gallery_catalog"] = str(args.gallery_catalog)
    report = run_evaluation(encoder, products, config, context=context, gallery=gallery)
    report["counts"].update(read_counts)
    paths = write_report(report, args.out)
    print(render_markdown(report))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
