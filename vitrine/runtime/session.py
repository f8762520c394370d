"""onnxruntime sessions with Vitrine's thread and provider settings."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import onnxruntime as ort

from vitrine.errors import UserError

log = logging.getLogger(__name__)

THREADS_ENV = "VITRINE_THREADS"
DEFAULT_THREADS = 2
DEVICES = ("cpu", "cuda", "auto")


def default_threads() -> int:
    """Intra-op threads from $VITRINE_THREADS, else 2 (serving shares a small CPU)."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return DEFAULT_THREADS
    try:
        threads = int(raw)
    except ValueError:
        raise UserError(f"{THREADS_ENV} must be a whole number, got {raw!r}") from None
    if threads < 1:
        raise UserError(f"{THREADS_ENV} must be at least 1, got {threads}")
    return threads


def providers_for(device: str) -> list[str]:
    """ORT execution providers for "cpu", "cuda" (falls back to CPU with a warning) or "auto"."""
    if device not in DEVICES:
        raise UserError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    available = ort.get_available_providers()
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        log.warning("CUDA requested but this onnxruntime has no CUDAExecutionProvider; using the CPU")
    return ["CPUExecutionProvider"]


def make_session(
    path: Path,
    *,
    threads: int | None = None,
    device: str = "cpu",
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> ort.InferenceSession:
    """An inference session for one ONNX file; unreadable graphs raise UserError."""
    threads = default_threads() if threads is None else threads
    if threads < 1:
        raise UserError(f"threads must be at least 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = optimization
    options.log_severity_level = 3  # errors only; ORT's warnings about unused initialisers are noise
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers_for(device))
    except UserError:
        raise
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise UserError(f"cannot load ONNX model {path}: {exc}") from exc
