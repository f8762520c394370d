"""The `vitrine` command host. Each layer registers its own subcommands through the
`vitrine.commands` entry-point group (see pyproject.toml), so this module names no layer above it.

An entry point is a `register(subparsers)` function. Registration modules must import without
torch, so `vitrine --help` and the serving commands work on a torch-free install; heavy imports
happen inside the command functions.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import EntryPoint, entry_points

from vitrine.errors import UserError

ENTRY_POINT_GROUP = "vitrine.commands"
# Our own loggers speak at INFO; libraries (faiss's loader, onnx fusion, httpx...) only at WARNING unless -v.
FIRST_PARTY_LOGGERS = ("vitrine", "trainer", "indexer", "search", "__main__")


def command_entry_points() -> list[EntryPoint]:
    """The installed `vitrine.commands` entry points, sorted by name (the order of --help)."""
    found = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    if not found:
        raise UserError(
            f"no {ENTRY_POINT_GROUP!r} entry points found: install Vitrine (pip install -e .) "
            "so its commands register"
        )
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitrine",
        description="Vitrine: cross-modal product search for fashion catalogs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, library messages included")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in command_entry_points():
        try:
            register = entry.load()
        except ModuleNotFoundError as exc:
            # An image built without a layer (the serving image has no trainer/) lacks its commands.
            package = entry.module.split(".")[0]
            if exc.name is None or exc.name.split(".")[0] != package:
                raise
            logging.getLogger(__name__).debug("command %s unavailable: package %s not installed", entry.name, package)
            continue
        register(sub)
    return parser


def configure_logging(verbose: bool) -> None:
    """Library loggers at WARNING (DEBUG with -v); Vitrine's own at INFO (DEBUG with -v)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    for name in FIRST_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # faiss logs its loader attempts at INFO while being imported: quiet it before any command does.
    configure_logging("-v" in argv or "--verbose" in argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        configure_logging(args.verbose)
        return int(args.func(args) or 0)
    except UserError as exc:  # expected failures: one clear line, no traceback
        print(f"vitrine: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `vitrine ... | head` closed our stdout: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
