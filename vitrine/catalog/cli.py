"""`vitrine catalog check PATH`: read a catalog and report what is in it and what is wrong."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vitrine.cliargs import positive_int

FORMATS = ("jsonl", "kaggle", "fashiongen")  # kept here so --help needs no reader imports


def register(subparsers: argparse._SubParsersAction) -> None:
    catalog = subparsers.add_parser("catalog", help="inspect product catalogs")
    actions = catalog.add_subparsers(dest="catalog_command", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check",
        help="read a catalog and report products, splits and problems",
        description=(
            "Read a catalog (products.jsonl, a Kaggle styles.csv or Fashion-Gen .h5 files) "
            "and report products per split and category, and every skipped row with examples. "
            "Exit status: 0 no problems, 1 problems found, 2 not a catalog."
        ),
    )
    check.add_argument("path", type=Path, help="catalog file or folder")
    check.add_argument("--format", choices=FORMATS, help="skip detection and read as this format")
    check.add_argument(
        "--no-images", action="store_true",
        help="do not decode images (their files are still checked to exist)",
    )  # fmt: skip
    check.add_argument("--limit", type=positive_int, help="stop after this many good products")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=main_check)


def main_check(args: argparse.Namespace) -> int:
    from vitrine.catalog.registry import read_catalog

    start = time.perf_counter()
    catalog = read_catalog(
        args.path,
        format=args.format,
        check_images=not args.no_images,
        limit=args.limit,
        progress=sys.stderr.isatty(),
    )
    seconds = time.perf_counter() - start
    report = catalog.report
    if args.json:
        print(json.dumps({**report.to_dict(), "seconds": round(seconds, 2)}, indent=2))
    else:
        print(report.format_text())
        print(f"Read in {seconds:.1f} s")
    return 0 if report.ok else 1
