"""`vitrine bundle quantize`: an int8 copy of a bundle's encoder graphs, with what it lost measured."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from vitrine.cliargs import positive_int

GRAPH_CHOICES = ("text", "image")  # kept here so --help needs no onnxruntime import


def _graphs(value: str) -> list[str]:
    graphs = [g.strip() for g in value.split(",") if g.strip()]
    bad = [g for g in graphs if g not in GRAPH_CHOICES]
    if bad or not graphs:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(GRAPH_CHOICES)}, got {value!r}")
    return graphs


def _cosine(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {number}")
    return number


def register(subparsers: argparse._SubParsersAction) -> None:
    bundle = subparsers.add_parser("bundle", help="inspect and convert model bundles")
    actions = bundle.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    quantize = actions.add_parser(
        "quantize",
        help="write an int8 copy of a bundle (dynamic quantization; faster text encoding on CPUs)",
        description=(
            "Copy a bundle with its text (and optionally image) graph dynamically quantized to int8. "
            "The copy's manifest records, per graph, the smallest cosine and largest difference between "
            "the int8 and float embeddings on the check texts; measure what it costs in retrieval with "
            "`vitrine eval --bundle OUT`."
        ),
    )
    quantize.add_argument("--bundle", type=Path, required=True, help="the float bundle (left unchanged)")
    quantize.add_argument("--out", type=Path, required=True, help="where the int8 bundle goes")
    quantize.add_argument("--graphs", type=_graphs, default=["text"], help="comma list of text,image (default: text)")
    quantize.add_argument("--catalog", type=Path, help="check on this catalog's titles instead of built-in texts")
    quantize.add_argument("--split", default="val", help="the catalog split the check titles come from")
    quantize.add_argument("--check-texts", type=positive_int, default=500, help="titles to check with --catalog")
    quantize.add_argument("--min-cosine", type=_cosine, default=0.95,
                          help="refuse a graph whose int8 embedding of any check input is below this cosine")  # fmt: skip
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    quantize.add_argument("--json", action="store_true", help="print the record as JSON")
    quantize.set_defaults(func=main_quantize)


def main_quantize(args: argparse.Namespace) -> int:
    from vitrine.runtime.quantize import quantize_bundle

    texts = None
    if args.catalog is not None:
        from vitrine.catalog.registry import read_catalog

        products = read_catalog(args.catalog, split=args.split, limit=args.check_texts, check_images=False).products
        texts = [p.title for p in products if p.title]
    records = quantize_bundle(args.bundle, args.out, graphs=args.graphs, check_texts=texts,
                              min_cosine=args.min_cosine, overwrite=args.overwrite)  # fmt: skip
    if args.json:
        print(json.dumps({"bundle": str(args.out), "quantization": records}, indent=2))
    else:
        for graph, record in records.items():
            print(f"{graph}: int8, min cosine {record['min_cosine']:.4f}, max abs diff {record['max_abs_diff']:.4f} "
                  f"over {record['checks']} checks ({record['seconds']} s)")  # fmt: skip
        print(f"wrote {args.out}")
    return 0
