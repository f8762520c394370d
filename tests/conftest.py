"""Shared fixtures and the suite's marker policy.

- `integration`: every test that uses the shared real catalog (the `fashion_products` fixture) is
  marked automatically, so `make test-fast` (-m "not integration") really needs no data.
- `torch`: tests that need the train extra. A module marks itself with `pytestmark = pytest.mark.torch`.
  Under CI (CI=true) a missing torch or a missing catalog is a failure, never a skip.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH_MARK = "pytest.mark.torch"
HAVE_TORCH = importlib.util.find_spec("torch") is not None
_left_out: list[str] = []


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def shared_data_dir() -> Path:
    env = os.environ.get("VITRINE_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data" / "fashion-products"


@pytest.fixture(scope="session")
def fashion_products() -> Path:
    path = shared_data_dir()
    if not (path / "products.jsonl").is_file():
        msg = f"shared catalog not found at {path} (set VITRINE_DATA)"
        if under_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The untrained 'tiny' ONNX bundle, exported once per session (needs torch)."""
    from tests.support.indexes import export_tiny_bundle

    return export_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle") / "bundle")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Without torch, a torch-marked module cannot even be imported: leave it out (and say so at the end)."""
    if HAVE_TORCH or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    if TORCH_MARK not in collection_path.read_text(encoding="utf-8"):
        return None
    if under_ci():
        raise pytest.UsageError(f"{collection_path} needs torch, which is not installed (CI installs the train extra)")
    _left_out.append(str(collection_path.relative_to(REPO)))
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "fashion_products" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _left_out:
        terminalreporter.write_line(
            f"NOT RUN: {len(_left_out)} torch-marked test modules (install the train extra): {', '.join(_left_out)}",
            yellow=True,
        )
