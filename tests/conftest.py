"""Shared fixtures. The real catalog is required under CI: missing data fails, never skips."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("VITRINE_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data" / "fashion-products"


@pytest.fixture(scope="session")
def fashion_products() -> Path:
    path = shared_data_dir()
    if not (path / "products.jsonl").is_file():
        msg = f"shared catalog not found at {path} (set VITRINE_DATA)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path
