"""Multinomial logistic regression (softmax over classes, L2 on the weights) fitted with scipy's L-BFGS.

The same objective as scikit-learn's `LogisticRegression(C=C)` (the tests hold it to that oracle),
written on numpy float32 matmuls: on the 2-core shared machine it fits the catalog's 16k products
about 5x faster than scikit-learn's per-sample loss loop, and it needs no package beyond numpy/scipy.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax

MAX_ITER = 500
TOL = 1e-4  # on the gradient's largest component, as scikit-learn's lbfgs `tol`


def fit_softmax(features: np.ndarray, codes: np.ndarray, num_classes: int, *, C: float = 1.0, max_iter: int = MAX_ITER,
                tol: float = TOL) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """(weight (D, K), bias (K,), iterations) minimising mean NLL + ||weight||² / (2 C n); bias unpenalised.

    Starts from zero for every C: warm starts along a C grid stop at once, as the penalty's change
    moves the mean gradient by less than `tol`."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    n, d = x.shape
    k = num_classes
    onehot = np.zeros((n, k), np.float32)
    onehot[np.arange(n), codes] = 1.0
    penalty = 1.0 / (C * n)

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        weight = theta[: d * k].reshape(d, k).astype(np.float32)
        bias = theta[d * k :].astype(np.float32)
        logp = log_softmax(x @ weight + bias, axis=1)
        residual = (np.exp(logp) - onehot) / n
        loss = -float((logp * onehot).sum(dtype=np.float64)) / n + 0.5 * penalty * float((theta[: d * k] ** 2).sum())
        grad = np.concatenate([(x.T @ residual).ravel().astype(np.float64) + penalty * theta[: d * k],
                               residual.sum(axis=0, dtype=np.float64)])  # fmt: skip
        return loss, grad

    found = minimize(loss_and_grad, np.zeros(d * k + k), jac=True, method="L-BFGS-B",
                     options={"maxiter": max_iter, "gtol": tol, "ftol": 64 * np.finfo(float).eps})  # fmt: skip
    theta = found.x
    return theta[: d * k].reshape(d, k).astype(np.float32), theta[d * k :].astype(np.float32), int(found.nit)
