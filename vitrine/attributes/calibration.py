"""Temperature scaling (Guo et al. 2017): one scalar T per head, fitted on val logits by NLL.

Dividing logits by T keeps every argmax (accuracy is unchanged) and only reshapes the confidences,
so a head's "0.9" means right about 90 % of the time. ECE measures how far they are from that.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

ECE_BINS = 15
_LOG_T_BOUNDS = (-4.0, 4.0)  # T in [0.018, 55]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(np.asarray(logits, np.float64) / temperature, axis=1))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of integer `labels` under softmax(logits / T)."""
    logits = np.asarray(logits, np.float64)
    if logits.shape[0] == 0:
        return float("nan")
    logp = log_softmax(logits / temperature, axis=1)
    return float(-logp[np.arange(logits.shape[0]), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising `nll(logits, labels, T)` (1.0 when there is nothing to fit on)."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    if logits.shape[0] == 0 or logits.shape[1] < 2:
        return 1.0
    found = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))), bounds=_LOG_T_BOUNDS, method="bounded")
    temperature = float(np.exp(found.x))
    # The bounded search can stop a hair worse than T = 1 on an already calibrated head: keep the better.
    return temperature if nll(logits, labels, temperature) <= nll(logits, labels, 1.0) else 1.0


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ_bins |bin| / n · |accuracy(bin) − mean confidence(bin)|, equal-width bins over (0, 1]."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, bool)
    if confidence.size == 0:
        return float("nan")
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.sum() / confidence.size * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)
