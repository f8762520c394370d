"""argparse value types shared by every `vitrine` command, so a bad number reads the same everywhere:

    vitrine index: error: argument --batch-size: must be at least 1, got 0
"""
from __future__ import annotations

import argparse
import math


def _number(value: str, kind: type, what: str) -> int | float:
    try:
        number = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def positive_int(value: str) -> int:
    """A whole number >= 1 (counts, sizes, steps, threads)."""
    number = int(_number(value, int, "a whole number"))
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def non_negative_int(value: str) -> int:
    """A whole number >= 0 (seeds, layers to unlock)."""
    number = int(_number(value, int, "a whole number"))
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {number}")
    return number


def layer_count(value: str) -> int:
    """Layers to unlock: 0 (frozen), N, or -1 (all)."""
    number = int(_number(value, int, "a whole number"))
    if number < -1:
        raise argparse.ArgumentTypeError(f"must be -1 (all), 0 or more, got {number}")
    return number


def positive_float(value: str) -> float:
    """A finite number > 0 (learning rates, weights, temperatures)."""
    number = float(_number(value, float, "a number"))
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {number}")
    return number


def non_negative_float(value: str) -> float:
    """A finite number >= 0 (loss weights that may switch a term off)."""
    number = float(_number(value, float, "a number"))
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {number}")
    return number


def unit_interval(value: str) -> float:
    """A number within [0, 1] (α, probabilities)."""
    number = float(_number(value, float, "a number in [0, 1]"))
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {number}")
    return number


def port(value: str) -> int:
    """A TCP port, 1..65535."""
    number = int(_number(value, int, "a port number"))
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port within 1..65535, got {number}")
    return number
