"""FashionBERT-style cross-encoder: one BERT reads `[CLS] query [SEP] title [SEP]` and the image's patches.

Text tokens get BERT's word and position embeddings; patch tokens are the image tower's spatial feature
map projected to the hidden size, with 2-D (row, column) position embeddings. All tokens get a segment
embedding (query / title / image) and BERT's embedding LayerNorm. With `aligned_dim` (issue 12) each row also carries the dual encoder's query,
title and image embeddings (`vitrine.runtime.rerank_inputs.ALIGNED_SLOTS`): they enter as five tokens
(the three, plus query x image and query x title elementwise, whose sums are the first stage's
cosines), and a similarity head adds a learned weighting of those two cosines to the match logit, so
image-text matching starts where the dual encoder already is instead of from 49 fresh patch tokens.
Heads: the match score on [CLS]
(TIA during pretraining, the rerank score afterwards), masked-token prediction (MLM, tied to the word
embeddings) and masked-patch prediction (MPM, a distribution over patch feature channels).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from trainer.cross_encoder.patch_projection import ImagePatchProjection, PatchProjectionSpec
from vitrine.runtime.rerank_inputs import ALIGNED_SLOTS, IMAGE_SEGMENT, NUM_SEGMENTS

MASK_FILL = -1e4  # additive attention mask; finite so fully-masked rows cannot produce NaN


@dataclass(frozen=True)
class CrossEncoderConfig:
    hf_model_name: str
    hf_tokenizer_name: str
    patch_dim: int
    patch_grid: tuple[int, int]
    max_query_tokens: int = 16
    max_title_tokens: int = 32
    num_layers: int | None = None  # None: all of the backbone's layers
    aligned_dim: int = 0  # the dual encoder's embedding size when rows carry its embeddings; 0: none
    aligned_tokens: bool = True  # with aligned_dim: the embeddings enter as tokens (ablation switch)
    similarity_head: bool = True  # with aligned_dim: the first-stage cosines enter the match logit (ablation switch)
    similarity_init: float = 10.0  # its starting weight on each cosine: the match starts as a scaled first stage
    # With aligned_dim: patches enter through the dual encoder's frozen image head (a PatchProjectionSpec as a dict)
    patch_projection: dict[str, Any] | None = None
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_grid", tuple(int(x) for x in self.patch_grid))
        if len(self.patch_grid) != 2 or min(self.patch_grid) < 1:
            raise ValueError(f"patch_grid must be two positive ints, got {self.patch_grid}")
        if self.patch_dim < 1:
            raise ValueError("patch_dim must be >= 1")
        if self.aligned_dim < 0:
            raise ValueError("aligned_dim must be >= 0")
        if self.patch_projection is not None:
            if not self.aligned_dim:
                raise ValueError("patch_projection projects patches into the dual encoder's space: it needs aligned_dim")
            PatchProjectionSpec(**self.patch_projection)  # validates

    @property
    def num_patches(self) -> int:
        return self.patch_grid[0] * self.patch_grid[1]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["patch_grid"] = list(self.patch_grid)
        return d


class PatchEmbedding(nn.Module):
    """[B, P, C] patch features -> [B, P, H]: a linear projection plus row and column embeddings."""

    def __init__(self, patch_dim: int, grid: tuple[int, int], hidden: int) -> None:
        super().__init__()
        self.grid = grid
        self.proj = nn.Linear(patch_dim, hidden)
        self.row = nn.Embedding(grid[0], hidden)
        self.col = nn.Embedding(grid[1], hidden)
        for emb in (self.row, self.col):
            nn.init.normal_(emb.weight, std=0.02)
        rows = torch.arange(grid[0]).repeat_interleave(grid[1])
        cols = torch.arange(grid[1]).repeat(grid[0])
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, patches: Tensor) -> Tensor:
        return self.proj(patches) + self.row(self.rows) + self.col(self.cols)


class AlignedEmbedding(nn.Module):
    """[B, 3, D] (query, title, image) dual-encoder embeddings -> [B, 5, H] tokens."""

    NUM_TOKENS = len(ALIGNED_SLOTS) + 2

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(dim, hidden)
        self.product_proj = nn.Linear(dim, hidden)
        self.kind = nn.Embedding(self.NUM_TOKENS, hidden)
        nn.init.normal_(self.kind.weight, std=0.02)

    def forward(self, aligned: Tensor) -> Tensor:
        q, t, v = aligned.unbind(1)
        # x D: unit vectors' elementwise products are O(1/D) each, their sum the cosine
        products = torch.stack([q * v, q * t], dim=1) * self.dim
        return torch.cat([self.proj(aligned), self.product_proj(products)], dim=1) + self.kind.weight

    @staticmethod
    def similarities(aligned: Tensor) -> Tensor:
        """[B, 2]: cos(query, image) and cos(query, title) (0 for rows without a title)."""
        q, t, v = aligned.unbind(1)
        return torch.stack([(q * v).sum(-1), (q * t).sum(-1)], dim=-1)


class CrossEncoder(nn.Module):
    def __init__(self, bert: nn.Module, config: CrossEncoderConfig) -> None:
        super().__init__()
        hf = bert.config
        if config.num_layers is not None:
            if not 1 <= config.num_layers <= len(bert.encoder.layer):
                raise ValueError(f"num_layers={config.num_layers}, the backbone has {len(bert.encoder.layer)}")
            bert.encoder.layer = bert.encoder.layer[: config.num_layers]
            hf.num_hidden_layers = config.num_layers
        self.config = config
        hidden = hf.hidden_size
        self.hidden_size = hidden
        emb = bert.embeddings
        self.word_embeddings = emb.word_embeddings
        self.position_embeddings = emb.position_embeddings
        self.embedding_norm = emb.LayerNorm
        self.dropout = nn.Dropout(hf.hidden_dropout_prob)
        # Three segments (FashionBERT Fig. 6); query and image start from BERT's sentence-A row.
        self.segment_embeddings = nn.Embedding(NUM_SEGMENTS, hidden)
        with torch.no_grad():
            old = emb.token_type_embeddings.weight
            self.segment_embeddings.weight.copy_(torch.stack([old[0], old[min(1, old.shape[0] - 1)], old[0]]))
        self.patch_projection = (
            ImagePatchProjection(config.patch_dim, config.aligned_dim, config.patch_grid, PatchProjectionSpec(**config.patch_projection))
            if config.patch_projection is not None else None
        )
        patch_in = config.aligned_dim if self.patch_projection is not None else config.patch_dim
        self.patch_embedding = PatchEmbedding(patch_in, config.patch_grid, hidden)
        self.aligned_embedding = AlignedEmbedding(config.aligned_dim, hidden) if config.aligned_dim and config.aligned_tokens else None
        # The first stage's cosines, weighted into the match logit; starts at similarity_init and learns.
        self.similarity_head = nn.Linear(2, 1) if config.aligned_dim and config.similarity_head else None
        if self.similarity_head is not None:
            nn.init.constant_(self.similarity_head.weight, config.similarity_init)
            nn.init.zeros_(self.similarity_head.bias)
        self.encoder = bert.encoder
        self.hf_config = hf

        self.match_head = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        pooler = getattr(bert, "pooler", None)
        if pooler is not None:  # BERT's pooler is the usual start for a [CLS] classifier
            self.match_head[0].load_state_dict(pooler.dense.state_dict())
        self.mlm_transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=hf.layer_norm_eps))
        self.mlm_bias = nn.Parameter(torch.zeros(hf.vocab_size))
        self.mpm_head = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=hf.layer_norm_eps), nn.Linear(hidden, config.patch_dim)
        )
        # Reranking adds prior_weight x the first-stage score to the match logit, so the cross-encoder
        # learns a correction of the dual encoder's ranking rather than a ranking from scratch.
        # Fine-tuning sets and learns it; 0 means the cross-encoder ranks alone.
        self.prior_weight = nn.Parameter(torch.zeros(()))

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layer)

    @property
    def num_text_positions(self) -> int:
        return int(self.position_embeddings.num_embeddings)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The last encoder layer: shared by every task, where Eq. 6 reads the task gradients."""
        return [p for p in self.encoder.layer[-1].parameters() if p.requires_grad]

    @property
    def aligned(self) -> bool:
        """Rows carry the dual encoder's embeddings (read as tokens, by the similarity head, or both)."""
        return self.config.aligned_dim > 0

    def _check_aligned(self, aligned: Tensor | None, b: int) -> None:
        if not self.aligned:
            if aligned is not None:
                raise ValueError("this cross-encoder takes no aligned inputs")
            return
        expected = (b, len(ALIGNED_SLOTS), self.config.aligned_dim)
        if aligned is None or tuple(aligned.shape) != expected:
            raise ValueError(f"aligned must be {list(expected)}, got {None if aligned is None else tuple(aligned.shape)}")

    def embed(self, input_ids: Tensor, token_type_ids: Tensor, patches: Tensor, aligned: Tensor | None = None) -> Tensor:
        b, t = input_ids.shape
        if patches.dim() != 3 or patches.shape[0] != b or patches.shape[1:] != (self.config.num_patches, self.config.patch_dim):
            raise ValueError(
                f"patches must be [{b}, {self.config.num_patches}, {self.config.patch_dim}], got {tuple(patches.shape)}"
            )
        positions = torch.arange(t, device=input_ids.device)
        text = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None] + self.segment_embeddings(token_type_ids)
        self._check_aligned(aligned, b)
        if self.patch_projection is None:
            image = self.patch_embedding(patches)
        else:
            projected = self.patch_projection(patches)  # [B, P, D] in the dual encoder's space
            image = self.patch_embedding(projected)
            if self.aligned_embedding is not None:  # query x patch: each patch's share of the query-image cosine, as for the photo
                image = image + self.aligned_embedding.product_proj(aligned[:, :1] * projected * self.config.aligned_dim)
        image = image + self.segment_embeddings.weight[IMAGE_SEGMENT]
        parts = [text, image]
        if self.aligned_embedding is not None:
            parts.append(self.aligned_embedding(aligned))
        return self.dropout(self.embedding_norm(torch.cat(parts, dim=1)))

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor, attention_mask: Tensor, patches: Tensor, aligned: Tensor | None = None,
        layers: list[Tensor] | None = None,
    ) -> Tensor:
        """Hidden states [B, T + P (+ 5), H]: the T text positions first, then the P patches, then the
        aligned tokens when the model has them. `layers`, when given, receives every layer's output
        (what hidden-state distillation compares)."""
        if input_ids.shape != token_type_ids.shape or input_ids.shape != attention_mask.shape:
            raise ValueError("input_ids, token_type_ids and attention_mask must have one shape")
        hidden = self.embed(input_ids, token_type_ids, patches, aligned)
        extra = hidden.shape[1] - input_ids.shape[1]
        full = torch.cat([attention_mask.to(hidden.dtype), hidden.new_ones(hidden.shape[0], extra)], dim=1)
        additive = (1.0 - full)[:, None, None, :] * MASK_FILL
        for layer in self.encoder.layer:
            out = layer(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
            if layers is not None:
                layers.append(hidden)
        return hidden

    def match_logits(self, hidden: Tensor, aligned: Tensor | None = None) -> Tensor:
        """[B] match (rerank) logits from the [CLS] state (plus the weighted first-stage cosines)."""
        logits = self.match_head(hidden[:, 0]).squeeze(-1)
        if self.similarity_head is not None:
            self._check_aligned(aligned, hidden.shape[0])
            logits = logits + self.similarity_head(AlignedEmbedding.similarities(aligned)).squeeze(-1)
        return logits

    def score(
        self, input_ids: Tensor, token_type_ids: Tensor, attention_mask: Tensor, patches: Tensor, aligned: Tensor | None = None
    ) -> Tensor:
        return self.match_logits(self.forward(input_ids, token_type_ids, attention_mask, patches, aligned), aligned)

    def with_prior(self, logits: Tensor, first_stage: Tensor | None) -> Tensor:
        """Rerank scores: match logits plus prior_weight x the candidates' first-stage scores."""
        if first_stage is None:
            return logits
        assert first_stage.shape == logits.shape, (first_stage.shape, logits.shape)
        return logits + self.prior_weight * first_stage

    def mlm_logits(self, hidden_at_masked: Tensor) -> Tensor:
        """[M, H] states at masked text positions -> [M, vocab] logits (decoder tied to word embeddings)."""
        return self.mlm_transform(hidden_at_masked) @ self.word_embeddings.weight.T + self.mlm_bias

    def mpm_logits(self, hidden_at_masked: Tensor) -> Tensor:
        """[M, H] states at masked patches -> [M, C] logits over the patch feature channels."""
        return self.mpm_head(hidden_at_masked)

    def truncated(self, num_layers: int) -> CrossEncoder:
        """A copy keeping the first `num_layers` layers: the distillation student's initialisation."""
        if not 1 <= num_layers <= self.num_layers:
            raise ValueError(f"num_layers must be in [1, {self.num_layers}], got {num_layers}")
        student = copy.deepcopy(self)
        student.encoder.layer = student.encoder.layer[:num_layers]
        student.hf_config = copy.deepcopy(self.hf_config)
        student.hf_config.num_hidden_layers = num_layers
        object.__setattr__(student, "config", _replace(self.config, num_layers=num_layers))
        return student


def _replace(config: CrossEncoderConfig, **changes: Any) -> CrossEncoderConfig:
    d = config.to_dict()
    d.update(changes)
    return CrossEncoderConfig(**d)


__all__ = ["AlignedEmbedding", "CrossEncoder", "CrossEncoderConfig", "PatchEmbedding"]
