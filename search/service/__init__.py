"""The query service: a FastAPI app over a ProductIndex and a model bundle (no torch).

    from search.service import create_app, Settings

Names load on first use, so `vitrine --help` (which imports search.service.cli) stays fast.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from vitrine.lazy import lazy_exports

_EXPORTS = {"create_app": "search.service.app", "Settings": "search.service.settings"}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from search.service.app import create_app
    from search.service.settings import Settings


__getattr__ = lazy_exports(__name__, _EXPORTS)
