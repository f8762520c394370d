"""`vitrine attributes train | eval | predict`: attribute heads on a bundle's embeddings, and backfill.

Features come from an index built with the bundle (its stored vectors: nothing is encoded) or from
the bundle itself (`--bundle`, embeddings cached in `--cache`). Predictions go into a new version of
the index with their provenance (`indexer.backfill`).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from vitrine.cliargs import positive_int

log = logging.getLogger(__name__)
FIELDS = ("baseColour", "articleType", "gender", "usage", "season")  # kept here so --help imports nothing heavy
VIEWS = ("image", "title", "both")


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def _add_features(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--catalog", type=Path, required=True, help="catalog with splits and attribute values")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--index", type=Path, help="index built from this catalog with the bundle: reuse its stored vectors")
    source.add_argument("--bundle", type=Path, help="model bundle: embed the catalog (cached in --cache)")
    parser.add_argument("--cache", type=Path, help="npz embedding cache for --bundle (default: runs/attributes/embeddings.npz)")
    parser.add_argument("--threads", type=positive_int, help="encoder threads for --bundle")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "attributes",
        help="predict missing product attributes (KG-FLIP backfill)",
        description=(
            "Heads that predict baseColour, articleType, gender, usage and season from a bundle's image and\n"
            "title embeddings, with calibrated confidences, and the backfill of an index's missing values.\n\n"
            "  train:   vitrine attributes train --catalog C --index I --out H [--view both]\n"
            "  eval:    vitrine attributes eval --heads H --catalog C --index I [--split test]\n"
            "  predict: vitrine attributes predict --heads H --index I [--min-precision 0.9]"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="attributes_command", metavar="ACTION", required=True)
    train = actions.add_parser("train", help="fit heads on train, choose and calibrate them on val")
    _add_features(train)
    train.add_argument("--out", type=Path, required=True, help="folder for the heads (heads.npz + heads.json)")
    train.add_argument("--view", choices=VIEWS, default="both", help="embeddings the heads read (default: both)")
    train.add_argument("--fields", nargs="+", default=list(FIELDS), help=f"attributes (default: {' '.join(FIELDS)})")
    train.add_argument("--c-grid", nargs="+", type=float, help="inverse regularisation strengths tried on val (default: 1 10 100)")
    train.set_defaults(func=main_train)

    evaluate = actions.add_parser("eval", help="accuracy, NLL and ECE before/after calibration, recall at 90 %% precision")
    _add_features(evaluate)
    evaluate.add_argument("--heads", type=Path, required=True, help="heads folder from `train`")
    evaluate.add_argument("--split", default="test", help="split to score (default: test)")
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON")
    evaluate.set_defaults(func=main_eval)

    predict = actions.add_parser("predict", help="backfill an index's missing attribute values (a new version)")
    predict.add_argument("--heads", type=Path, required=True, help="heads folder from `train`")
    predict.add_argument("--index", type=Path, required=True, help="index directory to backfill")
    floor = predict.add_mutually_exclusive_group()
    floor.add_argument("--min-precision", type=float, choices=(0.8, 0.9, 0.95),
                       help="keep predictions above the confidence that gave this precision on val")  # fmt: skip
    floor.add_argument("--min-confidence", type=_unit_float, default=0.0, help="keep predictions at least this confident (default: all)")
    predict.add_argument("--keep-versions", type=positive_int, default=2, help="index versions kept on disk (default: 2)")
    predict.add_argument("--json", action="store_true", help="print what was written as JSON")
    predict.set_defaults(func=main_predict)


def load_features(args: argparse.Namespace, fields: list[str]):
    """(AttributeData of the catalog's products, bundle fingerprint)."""
    from vitrine.attributes.data import AttributeData, embed_products
    from vitrine.catalog.registry import read_catalog
    from vitrine.errors import UserError

    products = read_catalog(args.catalog).products
    if args.index is not None:
        from indexer.product_index import ProductIndex

        with ProductIndex.open(args.index) as index:
            present = set(index.ids())
            kept = [p for p in products if p.id in present]
            if len(kept) < len(products):
                log.warning("%d catalog products are not in the index %s: left out", len(products) - len(kept), args.index)
            if not kept:
                raise UserError(f"no product of {args.catalog} is in the index {args.index}")
            title, image = index.vectors([p.id for p in kept])
            return AttributeData.from_products(kept, fields, title, image), index.bundle_fingerprint
    from vitrine.runtime.bundle import load_bundle

    encoder = load_bundle(args.bundle)
    cache = args.cache or Path("runs/attributes/embeddings.npz")
    title, image = embed_products(products, encoder, cache, threads=args.threads)
    return AttributeData.from_products(products, fields, title, image), encoder.fingerprint


def main_train(args: argparse.Namespace) -> int:
    from vitrine.attributes.train import C_GRID, train_heads

    data, fingerprint = load_features(args, list(args.fields))
    heads = train_heads(data, view=args.view, fields=list(args.fields), bundle_fingerprint=fingerprint,
                        c_grid=tuple(args.c_grid or C_GRID))  # fmt: skip
    heads.save(args.out)
    for name, head in heads.heads.items():
        info = head.info
        print(f"{name}: {len(head.classes)} values, C={info['C']:g}, val accuracy {info['val_accuracy']:.4f}, "
              f"T={head.temperature:.3f}, val NLL {info['val_nll']:.4f} -> {info['val_nll_calibrated']:.4f}")  # fmt: skip
    print(f"heads ({args.view}) written to {args.out}")
    return 0


def main_eval(args: argparse.Namespace) -> int:
    from vitrine.attributes.evaluate import evaluate_heads
    from vitrine.attributes.heads import AttributeHeads
    from vitrine.errors import UserError

    heads = AttributeHeads.load(args.heads)
    data, fingerprint = load_features(args, heads.fields)
    if fingerprint != heads.bundle_fingerprint:
        raise UserError(f"the heads read bundle {heads.bundle_fingerprint}'s vectors, the features are {fingerprint}'s")
    report = evaluate_heads(heads, data.split(args.split))
    if args.json:
        print(json.dumps({"view": heads.view, "split": args.split, "fields": report}, indent=2))
        return 0
    print(f"heads {args.heads} ({heads.view}) on {args.split}")
    print(f"{'field':<12} {'n':>6} {'acc':>7} {'R@P90':>7} {'cover':>7} {'ECE raw':>8} {'ECE cal':>8} {'NLL raw':>8} {'NLL cal':>8} {'T':>6}")
    for name, row in report.items():
        raw, cal = row["raw"], row["calibrated"]
        r = cal["r@p90"]
        print(f"{name:<12} {row['products']:>6} {cal['accuracy']:>7.4f} {r['recall']:>7.4f} {r['coverage']:>7.4f} "
              f"{raw['ece']:>8.4f} {cal['ece']:>8.4f} {raw['nll']:>8.4f} {cal['nll']:>8.4f} {row['temperature']:>6.3f}")  # fmt: skip
    return 0


def main_predict(args: argparse.Namespace) -> int:
    from indexer.backfill import backfill_index
    from vitrine.attributes.heads import AttributeHeads

    heads = AttributeHeads.load(args.heads)
    floor: float | dict[str, float] = args.min_confidence
    if args.min_precision is not None:
        thresholds = {name: head.info.get("val_thresholds", {}).get(str(args.min_precision)) for name, head in heads.heads.items()}
        # None: no confidence reached that precision on val, so nothing of that field is written.
        floor = {name: (t if t is not None else float("inf")) for name, t in thresholds.items()}
    result = backfill_index(args.index, heads, min_confidence=floor, keep_versions=args.keep_versions)
    if args.json:
        print(json.dumps({"version": str(result.version), "predicted": result.predicted, "missing": result.missing,
                          "withheld": result.withheld}, indent=2))  # fmt: skip
    else:
        print(result.summary())
    return 0
