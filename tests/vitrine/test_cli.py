"""The `vitrine` host: commands come from entry points, and library chatter stays out of the terminal."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from vitrine.cli import ENTRY_POINT_GROUP, build_parser

COMMANDS = {"catalog", "eval", "train", "export", "rerank", "index", "serve", "demo"}


def test_every_layer_registers_its_commands_through_entry_points() -> None:
    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert {"catalog", "eval", "train", "rerank", "index", "serve", "demo"} <= names
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert COMMANDS <= set(sub.choices)


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys; from vitrine.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_library_loggers_are_quiet_unless_verbose(tmp_path: Path) -> None:
    # `index --delete` on a folder without an index imports faiss, then fails with a clear error.
    quiet = run("index", "--delete", "1", "--out", str(tmp_path / "none"), cwd=tmp_path)
    assert quiet.returncode == 2 and quiet.stderr.startswith("vitrine: error:"), quiet.stderr
    assert "faiss" not in quiet.stderr.lower()
    verbose = run("-v", "index", "--delete", "1", "--out", str(tmp_path / "none"), cwd=tmp_path)
    assert verbose.returncode == 2 and "faiss.loader" in verbose.stderr


def test_value_types_refuse_bad_numbers_with_one_message() -> None:
    import argparse
    import re

    import pytest

    from vitrine import cliargs

    assert cliargs.positive_int("3") == 3 and cliargs.layer_count("-1") == -1 and cliargs.unit_interval("0.25") == 0.25
    assert cliargs.port("8000") == 8000 and cliargs.non_negative_int("0") == 0 and cliargs.positive_float("1e-4") == 1e-4
    for parse, bad, message in [
        (cliargs.positive_int, "0", "at least 1"), (cliargs.positive_int, "2.5", "whole number"),
        (cliargs.layer_count, "-2", "-1 (all)"), (cliargs.unit_interval, "1.5", "within [0, 1]"),
        (cliargs.positive_float, "nan", "finite"), (cliargs.positive_float, "0", "greater than 0"),
        (cliargs.port, "70000", "1..65535"), (cliargs.non_negative_float, "-1", "at least 0"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            parse(bad)


def test_a_layer_left_out_of_the_install_only_removes_its_commands(tmp_path: Path) -> None:
    # The serving image has no trainer/: its entry points stay in the metadata but must not break the host.
    code = (
        "import sys; sys.modules['trainer'] = None\n"
        "from vitrine.cli import build_parser\n"
        "sub = next(a for a in build_parser()._actions if a.dest == 'command')\n"
        "print(sorted(sub.choices))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "'serve'" in result.stdout and "'index'" in result.stdout and "'train'" not in result.stdout
