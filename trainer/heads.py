"""Token-pooling projection heads: what turns a tower's token states into an embedding.

A pooled vector throws away where things are in a photo and which words a title stresses. These
heads keep the towers' token grids (EfficientNet-Lite0's 7x7 block map, MiniLM's last-layer token
states) and pool them with one learned query, then project with a 2-layer MLP. The attention is
written out with plain matmuls so the ONNX exporter handles it (nn.MultiheadAttention's fast path
exports as `aten::_native_multi_head_attention`, which ONNX has no op for).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

MASKED = -1e4  # added to padded keys' scores: exp() underflows to 0 in float32 and float16 alike


class AttentionPoolHead(nn.Module):
    """[B, T, C] tokens (+ [B, T] mask, 1 = real) -> [B, D]: learned-query attention pooling, then an MLP."""

    def __init__(
        self,
        in_dim: int,
        embed_dim: int,
        *,
        num_heads: int = 4,
        mlp_hidden: int = 1024,
        num_positions: int | None = None,
        residual: bool = False,
        summary_dim: int | None = None,
    ) -> None:
        super().__init__()
        if in_dim % num_heads:
            raise ValueError(f"in_dim {in_dim} is not divisible by num_heads {num_heads}")
        self.in_dim, self.num_heads, self.head_dim = in_dim, num_heads, in_dim // num_heads
        # A grid (image) has no order of its own: learned positions. Text states already carry theirs.
        self.positions = nn.Parameter(torch.zeros(1, num_positions, in_dim)) if num_positions else None
        self.norm = nn.LayerNorm(in_dim)
        self.query = nn.Parameter(torch.randn(num_heads, self.head_dim) * 0.02)
        self.key = nn.Linear(in_dim, in_dim)
        self.value = nn.Linear(in_dim, in_dim)
        self.out = nn.Linear(in_dim, in_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, embed_dim))
        # A linear path from the plain mean of the tokens keeps what mean pooling already knows (MiniLM's
        # sentence similarity, the global look of a photo) while the attention path learns the rest.
        # `summary_dim` reads a caller's own summary instead (e.g. the photo's pooled conv-head features).
        self.summary_dim = summary_dim
        self.skip = nn.Linear(summary_dim or in_dim, embed_dim) if residual else None

    def forward(self, tokens: Tensor, mask: Tensor | None = None, summary: Tensor | None = None) -> Tensor:
        if tokens.dim() != 3 or tokens.shape[-1] != self.in_dim:
            raise ValueError(f"tokens must be [B, T, {self.in_dim}], got {tuple(tokens.shape)}")
        batch, length, _ = tokens.shape
        x = tokens if self.positions is None else tokens + self.positions[:, :length]
        x = self.norm(x)
        keys = self.key(x).view(batch, length, self.num_heads, self.head_dim)
        values = self.value(x).view(batch, length, self.num_heads, self.head_dim)
        scores = torch.einsum("hd,bthd->bht", self.query, keys) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + (1.0 - mask.to(scores.dtype))[:, None, :] * MASKED
        weights = scores.softmax(dim=-1)
        pooled = torch.einsum("bht,bthd->bhd", weights, values).reshape(batch, self.in_dim)
        out = self.mlp(self.out(pooled))
        if self.skip is not None:
            if self.summary_dim is not None:
                if summary is None or summary.shape != (batch, self.summary_dim):
                    got = None if summary is None else tuple(summary.shape)
                    raise ValueError(f"this head's residual reads a [B, {self.summary_dim}] summary, got {got}")
                return out + self.skip(summary)
            if mask is None:
                mean = tokens.mean(dim=1)
            else:
                weight = mask.to(tokens.dtype)[:, :, None]
                mean = (tokens * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)
            out = out + self.skip(mean)
        return out


class AttributeHeads(nn.Module):
    """One linear classifier per catalog attribute on an embedding (KG-FLIP-style knowledge signal)."""

    def __init__(self, embed_dim: int, classes: dict[str, int]) -> None:
        super().__init__()
        self.names = list(classes)
        self.heads = nn.ModuleDict({name: nn.Linear(embed_dim, n) for name, n in classes.items()})

    def forward(self, embeddings: Tensor) -> dict[str, Tensor]:
        return {name: self.heads[name](embeddings) for name in self.names}


__all__ = ["AttentionPoolHead", "AttributeHeads"]
