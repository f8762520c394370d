"""Cross-encoder losses: FashionBERT's adaptive task weights (Eq. 6), MPM's KL, reranking and distillation.

FashionBERT Eq. 5 picks the task weights w that minimise
    1/2 ||sum_i w_i grad(l_i)||^2 + 1/2 sum_i (w_i - 1/L)^2,   sum_i w_i = 1, w_i >= 0,
and Eq. 6 is its KKT solution with the tasks' gradients treated as mutually orthogonal:
    w_i = (1 / (1 + ||grad l_i||^2)) / sum_j (1 / (1 + ||grad l_j||^2)).
A task whose gradient is already large is weighted down; equal gradients give 1/L each.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def adaptive_task_weights(grad_sq_norms: Tensor) -> Tensor:
    """Eq. 6: [L] squared gradient norms -> [L] weights on the simplex."""
    if grad_sq_norms.dim() != 1 or grad_sq_norms.numel() == 0:
        raise ValueError("grad_sq_norms must be a non-empty 1-D tensor")
    if bool((grad_sq_norms < 0).any()) or not bool(torch.isfinite(grad_sq_norms).all()):
        raise ValueError(f"squared gradient norms must be finite and >= 0, got {grad_sq_norms.tolist()}")
    inverse = 1.0 / (1.0 + grad_sq_norms.double())
    return (inverse / inverse.sum()).to(grad_sq_norms.dtype)


class AdaptiveLoss:
    """Combines task losses with Eq. 6 weights recomputed every step from each task's gradient on
    the shared parameters (the last encoder layer: one cheap partial backward per task)."""

    def __init__(self, shared: Sequence[nn.Parameter]) -> None:
        self.shared = [p for p in shared if p.requires_grad]
        if not self.shared:
            raise ValueError("no trainable shared parameters")

    def grad_sq_norms(self, losses: Mapping[str, Tensor]) -> Tensor:
        norms = []
        for loss in losses.values():
            grads = torch.autograd.grad(loss, self.shared, retain_graph=True, allow_unused=True)
            norms.append(sum(float(g.pow(2).sum()) for g in grads if g is not None))
        return torch.tensor(norms, dtype=torch.float64)

    def __call__(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float], dict[str, float]]:
        """(weighted total, weights by task, squared gradient norms by task)."""
        names = list(losses)
        sq = self.grad_sq_norms(losses)
        weights = adaptive_task_weights(sq)
        total = sum(float(w) * losses[n] for n, w in zip(names, weights))
        return total, {n: float(w) for n, w in zip(names, weights)}, {n: float(s) for n, s in zip(names, sq)}


def masked_patch_kl(logits: Tensor, target_features: Tensor) -> Tensor:
    """MPM: KL(softmax(target feature) || softmax(prediction)) per masked patch, averaged."""
    assert logits.shape == target_features.shape and logits.dim() == 2
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target_features, -1), log_target=True, reduction="batchmean")


def listwise_rerank_loss(scores: Tensor) -> Tensor:
    """[G, 1 + k] scores, the positive in column 0: softmax cross-entropy per group."""
    return F.cross_entropy(scores, scores.new_zeros(scores.shape[0], dtype=torch.long))


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 2.0) -> Tensor:
    """[G, n] group logits: MSE on the teacher's logits plus KL between the groups' softened rankings."""
    assert student.shape == teacher.shape
    teacher = teacher.detach()
    kl = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1), log_target=True, reduction="batchmean")
    return F.mse_loss(student, teacher) + kl * temperature**2


__all__ = ["AdaptiveLoss", "adaptive_task_weights", "distillation_loss", "listwise_rerank_loss", "masked_patch_kl"]
