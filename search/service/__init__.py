"""The query service: a FastAPI app over a ProductIndex and a model bundle (no torch).

    from search.service import create_app, Settings

Names load on first use, so `vitrine --help` (which imports search.service.cli) stays fast.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {"create_app": "search.service.app", "Settings": "search.service.settings"}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from search.service.app import create_app
    from search.service.settings import Settings


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
