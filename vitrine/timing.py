"""Per-request stage timings that lower layers can report without a timing argument in every signature.

The service records a request's stages into a dict (`recording(timings)`); code below it (the index's
candidate scan and fill-in, the text encoder's tokeniser) wraps its parts in `stage(name)`, which adds
the elapsed milliseconds to that dict, and does nothing when no one is recording. A context variable
carries the dict, so concurrent requests on other threads never see each other's timings.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_timings: ContextVar[dict[str, float] | None] = ContextVar("vitrine_stage_timings", default=None)


@contextmanager
def recording(timings: dict[str, float]) -> Iterator[dict[str, float]]:
    """`stage(...)` blocks run inside this one add their milliseconds to `timings`."""
    token = _timings.set(timings)
    try:
        yield timings
    finally:
        _timings.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block into the recording dict under `name` (ms, summed over repeats); free when not recording."""
    timings = _timings.get()
    if timings is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + (time.perf_counter() - start) * 1000.0
