"""The layer contracts (import-linter, pyproject.toml) hold, and a back edge makes them fail."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vitrine", "trainer", "indexer", "search")
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([*LINT, "--no-cache", "--no-logo"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the four packages' sources and the contracts."""
    for name in PACKAGES:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "static", "*.json"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_contracts_hold_on_this_tree() -> None:
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("vitrine/scoring.py", "import search.service.app", "search > trainer | indexer > vitrine"),
        ("indexer/store.py", "import trainer.loss", "search > trainer | indexer > vitrine"),
        ("indexer/filters.py", "import torch", "vitrine and indexer never import torch"),
        ("search/service/engine.py", "import trainer.train", "search never imports torch"),
    ],
)
def test_a_back_edge_breaks_a_contract(tree: Path, module: str, line: str, broken: str) -> None:
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # a deliberate back edge\n")
    result = lint(tree)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout, result.stdout
