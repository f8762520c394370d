"""The `vitrine` command. Each area registers its own subcommands.

Registration modules must import without torch, so `vitrine --help` and the
serving commands work on a torch-free install; heavy imports happen inside
the command functions.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from search.errors import UserError

# Modules exposing `register(subparsers)`, in the order they appear in --help.
COMMAND_MODULES = (
    "search.catalog.cli",
    "search.evaluation.cli",
    "trainer.cli",
    "trainer.cross_encoder.cli",
    "indexer.cli",
    "search.service.cli",
    "search.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitrine",
        description="Vitrine: cross-modal product search for fashion catalogs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except UserError as exc:  # expected failures: one clear line, no traceback
        print(f"vitrine: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `vitrine ... | head` closed our stdout: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
