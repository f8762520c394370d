"""Patches projected through the dual encoder's trained image head (issue 12, part 1's first bullet).

The index stores the image trunk's block map (EfficientNet-Lite0: 7x7x320, pooled to the reranker's grid).
The dual encoder's attention head pools those tokens into the photo's embedding. Run on one token
alone, its attention weight is 1, so the head gives that patch's own embedding in the aligned space:
`mlp(out(value(norm(x + position))))`, plus the residual path on the patch's own conv-head summary.
`ImagePatchProjection` is that computation, frozen, inside the cross-encoder graph. The reranker then reads
patch tokens already comparable with the query's embedding, instead of learning 320 raw channels from scratch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.heads import AttentionPoolHead

ACTIVATIONS = {"relu6": nn.ReLU6, "relu": nn.ReLU, "silu": nn.SiLU, "identity": nn.Identity}


@dataclass(frozen=True)
class PatchProjectionSpec:
    """The dual encoder's head shape: what a checkpoint needs to rebuild the projection without the dual model."""

    num_heads: int
    mlp_hidden: int
    residual: bool
    summary_dim: int | None = None  # the conv head's width when the residual reads it (image_summary "conv_head")
    activation: str = "identity"  # the conv head's activation (timm's bn2.act)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")


class ImagePatchProjection(nn.Module):
    """[B, P, C] patch features -> [B, P, D] unit vectors: each patch through the dual encoder's image head
    as the photo's only token. Frozen: its weights are the dual encoder's (`from_dual`)."""

    def __init__(self, patch_dim: int, embed_dim: int, grid: tuple[int, int], spec: PatchProjectionSpec) -> None:
        super().__init__()
        self.spec, self.grid = spec, tuple(grid)
        self.head = AttentionPoolHead(patch_dim, embed_dim, num_heads=spec.num_heads, mlp_hidden=spec.mlp_hidden,
                                      residual=spec.residual, summary_dim=spec.summary_dim)  # fmt: skip
        self.positions = nn.Parameter(torch.zeros(grid[0] * grid[1], patch_dim))  # the head's, pooled to `grid`
        # The 1x1 conv head with its batch norm folded in (eval mode), then its activation.
        self.summary = nn.Linear(patch_dim, spec.summary_dim) if spec.summary_dim else None
        self.activation = ACTIVATIONS[spec.activation]()
        self.requires_grad_(False)

    def forward(self, patches: Tensor) -> Tensor:
        assert patches.dim() == 3 and patches.shape[1:] == self.positions.shape, (patches.shape, self.positions.shape)
        head = self.head
        out = head.mlp(head.out(head.value(head.norm(patches + self.positions))))
        if head.skip is not None:
            out = out + head.skip(patches if self.summary is None else self.activation(self.summary(patches)))
        return F.normalize(out, dim=-1)

    @torch.no_grad()
    def load_from_dual(self, dual: nn.Module) -> ImagePatchProjection:
        """Copy a trained dual encoder's image head (a `trainer.model.VitrineModel` with attention heads):
        its positions pooled to this grid, its conv head folded with bn2."""
        self.head.load_state_dict({k: v for k, v in dual.image_head.state_dict().items() if k != "positions"})
        source = tuple(dual.image_patch_grid)
        pos = dual.image_head.positions[0]  # [h*w, C]
        grid_pos = pos.T.reshape(1, pos.shape[1], *source)
        self.positions.copy_(F.adaptive_avg_pool2d(grid_pos, self.grid).flatten(2)[0].T)
        if self.summary is not None:
            trunk = dual.clip.visual.trunk
            conv, bn = trunk.conv_head, trunk.bn2
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            weight = conv.weight.flatten(1) * scale[:, None]
            bias = bn.bias - bn.running_mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            self.summary.weight.copy_(weight)
            self.summary.bias.copy_(bias)
        return self


def projection_spec_of(dual: nn.Module) -> PatchProjectionSpec:
    """The projection's shape for a trained dual encoder (attention heads over a timm CNN's block map)."""
    if not getattr(dual, "token_heads", False):
        raise ValueError("projected patches need a dual encoder with attention heads over the image trunk's block map")
    head = dual.image_head
    summary_dim = head.summary_dim
    activation = "identity"
    if summary_dim:
        act = getattr(dual.clip.visual.trunk.bn2, "act", None)
        activation = type(act).__name__.lower() if act is not None else "identity"
    return PatchProjectionSpec(num_heads=head.num_heads, mlp_hidden=head.mlp[0].out_features, residual=head.skip is not None,
                               summary_dim=summary_dim, activation=activation)  # fmt: skip


__all__ = ["ImagePatchProjection", "PatchProjectionSpec", "projection_spec_of"]
