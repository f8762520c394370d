"""`vitrine bundle quantize`: an int8 copy of a bundle's encoder graphs, with what it lost measured."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from vitrine.cliargs import positive_int

if TYPE_CHECKING:
    from PIL import Image

    from vitrine.catalog.product import Product

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
        help="write an int8 copy of a bundle (faster text and image encoding on CPUs)",
        description=(
            "Copy a bundle with its text (and optionally image) graph quantized to int8: the text graph "
            "dynamically; the image graph statically, calibrated on --catalog photos (without a catalog, "
            "dynamically, which does not speed up convolutions). The copy's manifest records, per graph, the "
            "smallest and mean cosine and largest difference between the int8 and float embeddings on the "
            "check inputs; measure what it costs in retrieval with `vitrine eval --bundle OUT`."
        ),
    )
    quantize.add_argument("--bundle", type=Path, required=True, help="the float bundle (left unchanged)")
    quantize.add_argument("--out", type=Path, required=True, help="where the int8 bundle goes")
    quantize.add_argument("--graphs", type=_graphs, default=["text"], help="comma list of text,image (default: text)")
    quantize.add_argument("--catalog", type=Path,
                          help="check on this catalog's titles and photos, and calibrate the image graph on its photos")  # fmt: skip
    quantize.add_argument("--split", default="val", help="the catalog split the check titles and photos come from")
    quantize.add_argument("--check-texts", type=positive_int, default=500, help="titles to check with --catalog")
    quantize.add_argument("--check-images", type=positive_int, default=200, help="photos to check with --catalog")
    quantize.add_argument("--calibration-split", default="train", help="the split the calibration photos come from")
    quantize.add_argument("--calibration-images", type=positive_int, default=256,
                          help="photos that fix the image graph's activation ranges (spread over the split)")  # fmt: skip
    quantize.add_argument("--min-cosine", type=_cosine, default=0.95,
                          help="refuse a text graph whose int8 embedding of any check input is below this cosine")  # fmt: skip
    quantize.add_argument("--min-image-cosine", type=_cosine,
                          help="the floor for the image graph's check photos (default: --min-cosine)")  # fmt: skip
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    quantize.add_argument("--json", action="store_true", help="print the record as JSON")
    quantize.set_defaults(func=main_quantize)


def _photos(products: list[Product], count: int) -> list[Image.Image]:
    """Up to `count` decodable photos spread evenly over `products` (unreadable ones are passed over)."""
    step = max(1, len(products) // count)
    photos = []
    for product in products[::step]:
        if len(photos) == count:
            break
        try:
            photos.append(product.image.open())
        except (OSError, ValueError):  # a broken photo is the catalog check's business, not the calibration's
            continue
    if not photos:
        from vitrine.errors import UserError

        raise UserError("no readable photos in the catalog split to check and calibrate the image graph on")
    return photos


def main_quantize(args: argparse.Namespace) -> int:
    from vitrine.runtime.quantize import quantize_bundle

    texts = check_images = calibration = None
    if args.catalog is not None:
        from vitrine.catalog.registry import read_catalog

        products = read_catalog(args.catalog, split=args.split, check_images=False).products
        texts = [p.title for p in products[: args.check_texts] if p.title]
        if "image" in args.graphs:
            check_images = _photos(products, args.check_images)
            calibration = _photos(read_catalog(args.catalog, split=args.calibration_split).products,
                                  args.calibration_images)  # fmt: skip
    records = quantize_bundle(args.bundle, args.out, graphs=args.graphs, check_texts=texts, check_images=check_images,
                              calibration_images=calibration, min_cosine=args.min_cosine,
                              min_image_cosine=args.min_image_cosine, overwrite=args.overwrite)  # fmt: skip
    if args.json:
        print(json.dumps({"bundle": str(args.out), "quantization": records}, indent=2))
    else:
        for graph, record in records.items():
            mean = f", mean {record['mean_cosine']:.4f}" if record.get("mean_cosine") is not None else ""
            print(f"{graph}: int8 ({record['method']}), min cosine {record['min_cosine']:.4f}{mean}, "
                  f"max abs diff {record['max_abs_diff']:.4f} over {record['checks']} checks ({record['seconds']} s)")  # fmt: skip
        print(f"wrote {args.out}")
    return 0
