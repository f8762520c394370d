"""Shared helpers for Vitrine's benchmarks: timing, percentile stats, JSON and markdown writers."""
from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-call wall times, in milliseconds."""

    n: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def latency_stats(seconds: Sequence[float]) -> LatencyStats:
    """Percentiles of per-call durations given in seconds."""
    if not len(seconds):
        raise ValueError("no timings to summarise")
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return LatencyStats(
        n=int(ms.size),
        mean_ms=float(ms.mean()),
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        min_ms=float(ms.min()),
        max_ms=float(ms.max()),
    )


def time_calls(fn: Callable[[Any], object], inputs: Iterable[Any], *, warmup: int = 3) -> list[float]:
    """Wall time (seconds) of `fn(x)` for each x; the first `warmup` inputs run untimed first."""
    inputs = list(inputs)
    for x in inputs[:warmup]:
        fn(x)
    times = []
    for x in inputs:
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return times


def time_interleaved(fns: dict[str, Callable[[Any], object]], inputs: Iterable[Any], *, warmup: int = 3) -> dict[str, list[float]]:
    """Like `time_calls` for several functions, taking turns on each input.

    Interleaving spreads background load on a shared machine evenly over the contenders.
    """
    inputs = list(inputs)
    for x in inputs[:warmup]:
        for fn in fns.values():
            fn(x)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for x in inputs:
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - start)
    return times


def throughput(fn: Callable[[], object], items_per_call: int, *, min_seconds: float = 2.0, warmup: int = 1) -> dict[str, float]:
    """Items per second of repeated `fn()` calls, run for at least `min_seconds` after warm-up.

    `items_per_s` uses the median call time (robust to bursts of background load);
    `items_per_s_mean` the total elapsed time.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    median = float(np.median(times))
    return {
        "items_per_s": items_per_call / median,
        "items_per_s_mean": items_per_call * len(times) / sum(times),
        "batch": items_per_call,
        "calls": len(times),
        "median_call_ms": median * 1000.0,
    }


def environment() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        # Other processes' load skews timings on a shared machine; recorded so runs can be compared.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def format_cell(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "" if value is None else str(value).replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, digits: int = 2) -> str:
    """A GitHub markdown table; floats rounded to `digits`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, expected {len(headers)}: {row}")
        lines.append("| " + " | ".join(format_cell(v, digits) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_markdown_table(
    path: str | Path,
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    title: str | None = None,
    notes: Sequence[str] = (),
    digits: int = 2,
) -> Path:
    """Write a markdown file: optional `# title`, the table, then notes as a bullet list."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}\n" if title else "", markdown_table(headers, rows, digits=digits)]
    if notes:
        parts.append("\n" + "".join(f"- {n}\n" for n in notes))
    path.write_text("\n".join(p for p in parts if p), encoding="utf-8")
    return path


def run_logged(cmd: list[str], log: Path) -> None:
    """Run a command, appending it and its output to `log`; raise if it fails."""
    import subprocess

    print("$", " ".join(cmd), flush=True)
    with Path(log).open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)


def pct(x: float) -> float:
    return round(100 * x, 2)


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    """"mean ± std" over seeds (sample std), or the one value when there is one seed."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"
