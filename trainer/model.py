"""The dual encoder Vitrine trains and exports, and its text tokenizer.

`VitrineModel` wraps an open_clip model (a `CustomTextCLIP` with a timm image tower and an HF
text tower for Vitrine's own configs, or any open_clip model) behind one interface the trainer,
the exporter and the prototype selection use.

Image tower split, so a locked image tower can be run once and cached:
  * timm towers (open_clip `TimmModel`): trunk = the timm network with global pooling
    (`[B, 1280]` for efficientnet_lite0), head = open_clip's projection (dropout + linear).
  * any other open_clip visual tower (ViT, ModifiedResNet, ...): the whole tower is the trunk
    (its output is already the embedding) and the head is the identity.

With `heads_cfg: {"type": "attention"}` (config `fashion-lite-ap`) the towers' token states are the
trunk features instead: the image trunk gives the 7x7 block map as [B, 49, C] tokens and the text
trunk MiniLM's last-layer token states, and `trainer.heads.AttentionPoolHead`s pool and project them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.heads import AttentionPoolHead
from trainer.pruning import PruningGate, attach_pruning_gates

# The timm CNN trunk parts `image_patch_features` and `encode_image_with_patches` run (EfficientNet family).
_PATCH_TRUNK_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")


def _hf_transformer(text_tower: nn.Module) -> nn.Module | None:
    """The HF model inside an open_clip `HFTextEncoder`, or None for open_clip's own text towers."""
    transformer = getattr(text_tower, "transformer", None)
    return transformer if hasattr(transformer, "config") else None


class VitrineModel(nn.Module):
    """Image/text dual encoder producing L2-normalised embeddings in one shared space."""

    def __init__(
        self,
        clip: nn.Module,
        config: dict[str, Any],
        *,
        embed_dim: int,
        image_size: int,
        pad_token_id: int = 0,
        pruning_cfg: dict[str, float] | None = None,
    ):
        super().__init__()
        self.clip = clip
        self.config = config
        self.embed_dim = int(embed_dim)
        self.image_size = int(image_size)
        self.pad_token_id = int(pad_token_id)
        text_tower = getattr(clip, "text", None)
        self._hf_text = _hf_transformer(text_tower) if text_tower is not None else None
        # Vitrine configs train on the timm trunk / projection split; other open_clip towers are one block.
        self._visual_split = hasattr(clip.visual, "trunk") and hasattr(clip.visual, "head")
        self._patch_shape_cache: tuple[int, int, int] | None = None
        if self._hf_text is not None:
            cfg = pruning_cfg or {}
            self.pruning_gates = attach_pruning_gates(
                self._hf_text,
                temperature=cfg.get("temperature", 1e-4),
                final_threshold=cfg.get("final_threshold", 0.01),
            )
        else:
            self.pruning_gates = nn.ModuleList()
        heads = config.get("heads_cfg") or {}
        self.token_heads = heads.get("type") == "attention"
        if self.token_heads:
            if not (self.has_image_patches and self._hf_text is not None):
                raise ValueError("attention heads need a timm CNN image trunk and an HF text tower")
            options = {"num_heads": int(heads.get("num_heads", 4)), "mlp_hidden": int(heads.get("mlp_hidden", 1024)),
                       "residual": bool(heads.get("residual", False))}
            grid = self.image_patch_grid
            # "conv_head": the image residual reads the photo's pooled conv-head features (timm's own pooled
            # vector, 1280-d for EfficientNet-Lite0) instead of the mean of the block map.
            self.image_summary = heads.get("image_summary", "blocks")
            if self.image_summary not in ("blocks", "conv_head"):
                raise ValueError(f"heads_cfg.image_summary must be 'blocks' or 'conv_head', got {self.image_summary!r}")
            summary_dim = int(self.clip.visual.trunk.num_features) if self.image_summary == "conv_head" else None
            self.image_head = AttentionPoolHead(self.image_patch_dim, self.embed_dim, num_positions=grid[0] * grid[1],
                                                summary_dim=summary_dim, **options)  # fmt: skip
            self.text_head = AttentionPoolHead(int(self._hf_text.config.hidden_size), self.embed_dim, **options)
        # Where the cached-token recipe cuts the towers: the last `image_top_stages` block stages and the
        # last `text_top_layers` text layers run after the cache (and train); the rest runs once, cached.
        # Any cut computes the same function, so export and serving never need to know it.
        self.image_top_stages = 0
        self.text_top_layers = 0

    # -- parameters ---------------------------------------------------------------------------------
    @property
    def logit_scale(self) -> nn.Parameter:
        """log of the contrastive temperature's inverse (open_clip convention; use `.exp()`)."""
        return self.clip.logit_scale

    @property
    def image_trunk_dim(self) -> int:
        """Width of `image_trunk_features` (embed_dim when the whole visual tower is the trunk)."""
        if self.token_heads:
            return self.image_patch_dim
        if self._visual_split:
            return int(self.clip.visual.trunk.num_features)
        return self.embed_dim

    # -- image ------------------------------------------------------------------------------------
    def _check_pixels(self, pixels: Tensor) -> None:
        if not isinstance(pixels, Tensor) or pixels.dim() != 4 or pixels.shape[1] != 3:
            shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
            raise ValueError(f"pixels must be a [B, 3, H, W] tensor, got {shape}")

    def image_trunk_features(self, pixels: Tensor) -> Tensor:
        """[B, 3, H, W] -> pooled trunk features [B, image_trunk_dim] (with token heads: grid tokens [B, P, C])."""
        self._check_pixels(pixels)
        if self.token_heads:
            trunk = self._patch_trunk()
            stages = list(trunk.blocks)
            x = trunk.bn1(trunk.conv_stem(pixels))
            for stage in stages[: len(stages) - self.image_top_stages]:
                x = stage(x)
            return self._flatten_patches(x)
        visual = self.clip.visual
        return visual.trunk(pixels) if self._visual_split else visual(pixels)

    def encode_image_features(self, feats: Tensor, normalize: bool = True) -> Tensor:
        """Trunk features [B, image_trunk_dim] -> embeddings [B, D] (the projection head)."""
        if self.token_heads:
            if feats.dim() != 3:
                raise ValueError(f"image tokens must be [B, P, C], got {tuple(feats.shape)}")
            x = feats
            if self.image_top_stages:
                side = round(feats.shape[1] ** 0.5)
                if side * side != feats.shape[1]:
                    raise ValueError(f"cached image tokens must form a square grid, got {feats.shape[1]} tokens")
                x = feats.transpose(1, 2).reshape(feats.shape[0], feats.shape[2], side, side)
                for stage in list(self._patch_trunk().blocks)[-self.image_top_stages :]:
                    x = stage(x)
                x = self._flatten_patches(x)
            return self._encode_image_tokens(x, normalize)
        if feats.dim() != 2 or feats.shape[1] != self.image_trunk_dim:
            raise ValueError(f"trunk features must be [B, {self.image_trunk_dim}], got {tuple(feats.shape)}")
        out = self.clip.visual.head(feats) if self._visual_split else feats
        return F.normalize(out, dim=-1) if normalize else out

    def _encode_image_tokens(self, tokens: Tensor, normalize: bool) -> Tensor:
        """The block map's tokens [B, P, C] -> [B, D] (attention head; conv-head summary when configured)."""
        summary = None
        if self.image_summary == "conv_head":
            trunk = self._patch_trunk()
            side = self.image_patch_grid
            grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *side)
            summary = trunk.bn2(trunk.conv_head(grid)).mean(dim=(2, 3))
        out = self.image_head(tokens, summary=summary)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        """[B, 3, H, W] -> [B, D]."""
        return self.encode_image_features(self.image_trunk_features(pixels), normalize=normalize)

    # -- image patches (the spatial map the cross-encoder reranker reads) --------------------------
    @property
    def has_image_patches(self) -> bool:
        """Whether the image tower is a timm CNN trunk with a patch map (conv_stem, bn1, blocks, conv_head)."""
        trunk = getattr(self.clip.visual, "trunk", None) if self._visual_split else None
        return trunk is not None and all(hasattr(trunk, name) for name in _PATCH_TRUNK_PARTS)

    def _patch_trunk(self) -> nn.Module:
        if not self.has_image_patches:
            raise ValueError(
                f"image patch features need a timm CNN trunk with {', '.join(_PATCH_TRUNK_PARTS)}; "
                f"this image tower is a {type(self.clip.visual).__name__}"
            )
        return self.clip.visual.trunk

    def _patch_map(self, pixels: Tensor) -> Tensor:
        """[B, 3, H, W] -> the trunk's block output [B, C, h, w], before the 1x1 conv_head."""
        self._check_pixels(pixels)
        trunk = self._patch_trunk()
        return trunk.blocks(trunk.bn1(trunk.conv_stem(pixels)))

    @staticmethod
    def _flatten_patches(feature_map: Tensor) -> Tensor:
        """[B, C, h, w] -> [B, h*w, C], patches in row-major (h, w) order."""
        return feature_map.flatten(2).transpose(1, 2)

    def image_patch_features(self, pixels: Tensor) -> Tensor:
        """[B, 3, H, W] -> patch features [B, P, C]: P = h*w grid cells row-major, C = image_patch_dim."""
        return self._flatten_patches(self._patch_map(pixels))

    def encode_image_with_patches(self, pixels: Tensor, normalize: bool = True) -> tuple[Tensor, Tensor]:
        """[B, 3, H, W] -> (embeddings [B, D], patches [B, P, C]) from one pass through the trunk."""
        trunk = self._patch_trunk()
        feature_map = self._patch_map(pixels)
        # The rest of timm's forward_features (conv_head, bn2) then forward_head: what trunk(pixels) does.
        patches = self._flatten_patches(feature_map)
        if self.token_heads:
            return self._encode_image_tokens(patches, normalize), patches
        pooled = trunk.forward_head(trunk.bn2(trunk.conv_head(feature_map)))
        return self.encode_image_features(pooled, normalize=normalize), patches

    @property
    def image_patch_dim(self) -> int:
        """C of `image_patch_features` (320 for efficientnet_lite0)."""
        return self._patch_shape()[0]

    @property
    def image_patch_grid(self) -> tuple[int, int]:
        """(h, w) of the patch grid at the configured image size (7x7 for efficientnet_lite0 at 224 px)."""
        _, height, width = self._patch_shape()
        return height, width

    def _patch_shape(self) -> tuple[int, int, int]:
        """(C, h, w), probed once with a blank image in eval mode (strides and padding vary by timm model)."""
        if self._patch_shape_cache is None:
            trunk = self._patch_trunk()
            param = next(trunk.parameters())
            modes = {module: module.training for module in trunk.modules()}  # restored one by one: they may differ
            trunk.eval()  # train-mode BatchNorm would update its running stats (and fails on a 1x1 map)
            try:
                with torch.no_grad():
                    probe = torch.zeros(1, 3, self.image_size, self.image_size, device=param.device, dtype=param.dtype)
                    shape = self._patch_map(probe).shape
            finally:
                for module, training in modes.items():
                    module.training = training
            self._patch_shape_cache = (int(shape[1]), int(shape[2]), int(shape[3]))
        return self._patch_shape_cache

    # -- text -------------------------------------------------------------------------------------
    def text_attention_mask(self, input_ids: Tensor) -> Tensor:
        """1 for real tokens, 0 for padding (derived from the pad id, as open_clip's HFTextEncoder does)."""
        return (input_ids != self.pad_token_id).long()

    def encode_text(self, input_ids: Tensor, normalize: bool = True) -> Tensor:
        """[B, L] token ids padded with the tokenizer's pad id -> [B, D]."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer [B, L] tensor, got {shape}")
        if self.token_heads:
            return self.encode_text_tokens(*self.text_token_states(input_ids), normalize=normalize)
        out = self.clip.encode_text(input_ids.long(), normalize=False)
        return F.normalize(out, dim=-1) if normalize else out

    def text_token_states(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """([B, L, H] last-layer token states, [B, L] attention mask): what the text head pools."""
        if not self.text_split:
            raise ValueError("text token states need an HF text tower")
        mask = self.text_attention_mask(input_ids)
        if not self.text_top_layers:
            out = self.clip.text.transformer(input_ids=input_ids.long(), attention_mask=mask)
            return out.last_hidden_state, mask
        layers = list(self._hf_text.encoder.layer)
        states = self._hf_text.embeddings(input_ids=input_ids.long())
        return self._run_text_layers(states, mask, layers[: len(layers) - self.text_top_layers]), mask

    def _run_text_layers(self, states: Tensor, mask: Tensor, layers: Sequence[nn.Module]) -> Tensor:
        # BERT's additive key mask [B, 1, 1, L]: 0 for real tokens, the dtype's minimum for padding.
        extended = (1.0 - mask[:, None, None, :].to(states.dtype)) * torch.finfo(states.dtype).min
        for layer in layers:
            out = layer(states, attention_mask=extended)
            states = out[0] if isinstance(out, tuple) else out
        return states

    def encode_text_tokens(self, states: Tensor, mask: Tensor, normalize: bool = True) -> Tensor:
        """Token states at the cache boundary [B, L, H] and their mask -> [B, D] (top layers, then the head)."""
        if self.text_top_layers:
            states = self._run_text_layers(states, mask, list(self._hf_text.encoder.layer)[-self.text_top_layers :])
        out = self.text_head(states, mask)
        return F.normalize(out, dim=-1) if normalize else out

    @property
    def text_split(self) -> bool:
        """Whether the text tower splits into a trunk (HF transformer + pooler) and a projection head."""
        return self._hf_text is not None

    def text_trunk_features(self, input_ids: Tensor) -> Tensor:
        """Pooled text features before the projection (cacheable while the text tower is locked)."""
        if not self.text_split:
            raise ValueError("text trunk features need an HF text tower")
        text = self.clip.text
        mask = self.text_attention_mask(input_ids)
        return text.pooler(text.transformer(input_ids=input_ids.long(), attention_mask=mask), mask)

    def encode_text_features(self, feats: Tensor, normalize: bool = True) -> Tensor:
        """Pooled text features -> [B, D] (the projection head)."""
        out = self.clip.text.proj(feats)
        return F.normalize(out, dim=-1) if normalize else out

    # -- joint ------------------------------------------------------------------------------------
    def forward(
        self,
        pixels: Tensor | None = None,
        input_ids: Tensor | None = None,
        *,
        trunk_features: Tensor | None = None,
    ) -> dict[str, Any]:
        """Normalised features for ClipLoss.

        Pass `trunk_features` instead of `pixels` when the image trunk is locked and cached.
        With pruning on, also returns `prune_masks` (one [B, L] mask per layer) and
        `text_attention_mask` for `loss.pruning_loss`.
        """
        if pixels is not None and trunk_features is not None:
            raise ValueError("pass pixels or trunk_features, not both")
        if trunk_features is not None:
            image_features = self.encode_image_features(trunk_features)
        elif pixels is not None:
            image_features = self.encode_image(pixels)
        else:
            image_features = None
        out: dict[str, Any] = {
            "image_features": image_features,
            "text_features": self.encode_text(input_ids) if input_ids is not None else None,
            "logit_scale": self.logit_scale.exp(),
        }
        if input_ids is not None and self.pruning_enabled:
            out["prune_masks"] = self.pruning_masks()
            out["text_attention_mask"] = self.text_attention_mask(input_ids)
        return out

    # -- freezing ---------------------------------------------------------------------------------
    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = True) -> None:
        """Freeze the image tower (LiT), leaving the last `unlocked_groups` timm layer groups trainable.

        BatchNorm statistics of the locked part are frozen with timm's converter: open_clip's
        own converter turns timm's BatchNormAct2d into a plain FrozenBatchNorm2d and silently
        drops the activation fused into it.
        """
        visual = self.clip.visual
        if not self._visual_split:  # open_clip's own towers (ViT, ModifiedResNet) lock by layer groups
            visual.lock(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)
            return
        visual.lock(unlocked_groups=unlocked_groups, freeze_bn_stats=False)
        if freeze_bn_stats:
            _freeze_locked_batch_norms(visual.trunk)

    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the text tower except its last `unlocked_layers` layers; the projection stays trainable.

        Partial locking of HF towers is done here: open_clip 3.x looks up a 'layer_attr' its BERT
        arch entry lacks.
        """
        if unlocked_layers < 0:
            raise ValueError(f"unlocked_layers must be >= 0, got {unlocked_layers}")
        if not unlocked_layers or self._hf_text is None:
            self.clip.lock_text_tower(unlocked_layers=unlocked_layers, freeze_layer_norm=True)
            return
        layers = list(self._hf_text.encoder.layer)
        if unlocked_layers > len(layers):
            raise ValueError(f"unlocked_layers={unlocked_layers} but the text tower has {len(layers)} layers")
        for module in [self._hf_text.embeddings, *layers[: len(layers) - unlocked_layers]]:
            for p in module.parameters():
                p.requires_grad = False

    @property
    def image_block_stages(self) -> list[nn.Module]:
        """The image trunk's block stages, bottom to top (what `image_top_stages` counts)."""
        return list(self._patch_trunk().blocks)

    @property
    def text_layers(self) -> list[nn.Module]:
        """The HF text tower's encoder layers, bottom to top (what `text_top_layers` counts)."""
        if self._hf_text is None:
            raise ValueError("this model has no HF text tower")
        return list(self._hf_text.encoder.layer)

    def set_cache_boundary(self, image_stages: int = 0, text_layers: int = 0) -> None:
        """Cut the towers for the cached-token recipe: `image_trunk_features` / `text_token_states` stop
        before the last `image_stages` block stages / `text_layers` text layers, which
        `encode_image_features` / `encode_text_tokens` then run. The composed function is unchanged."""
        if not self.token_heads:
            raise ValueError("a cache boundary inside the towers needs attention heads (heads_cfg.type 'attention')")
        stages, layers = len(self.image_block_stages), len(self.text_layers)
        if not 0 <= image_stages <= stages - 1:
            raise ValueError(f"image_stages must be in [0, {stages - 1}], got {image_stages}")
        if not 0 <= text_layers <= layers:
            raise ValueError(f"text_layers must be in [0, {layers}], got {text_layers}")
        self.image_top_stages, self.text_top_layers = int(image_stages), int(text_layers)

    # -- token pruning ----------------------------------------------------------------------------
    @property
    def pruning_enabled(self) -> bool:
        return any(g.enabled for g in self.pruning_gates)

    def set_pruning(self, enabled: bool) -> None:
        """Switch MML-TP token gates on/off (only for HF BERT-like text towers)."""
        if enabled and not len(self.pruning_gates):
            raise ValueError("token pruning needs an HF BERT-like text tower; this model has none")
        for gate in self.pruning_gates:
            gate.enabled = bool(enabled)
            gate.last_mask = None

    def pruning_masks(self) -> list[Tensor]:
        """The [B, L] masks of the last text forward, one per layer (empty when pruning is off)."""
        if not self.pruning_enabled:
            return []
        masks = [g.last_mask for g in self.pruning_gates]
        if any(m is None for m in masks):
            raise RuntimeError("no text forward has run since pruning was enabled")
        return masks

    def pruning_thresholds(self) -> Tensor:
        """Current per-layer thresholds tau (detached), for logging."""
        return torch.stack([g.threshold.detach() for g in self.pruning_gates]) if len(self.pruning_gates) else torch.empty(0)


def _freeze_locked_batch_norms(trunk: nn.Module) -> None:
    """Replace BatchNorms whose affine parameters are all frozen by timm's frozen (activation-keeping) versions."""
    from timm.layers import freeze_batch_norm_2d

    targets = [
        name
        for name, module in trunk.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and not any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    for name in targets:
        trunk.set_submodule(name, freeze_batch_norm_2d(trunk.get_submodule(name)))


class TextTokenizer:
    """Batch tokenizer returning padded `input_ids` for `VitrineModel.encode_text`.

    Vitrine configs wrap an HF fast tokenizer (`.hf`). open_clip models keep open_clip's own
    tokenizer (`open_clip_tokenizer`), whose fixed-length padding and text cleaning their text
    towers were trained with; `padding` is then ignored, and `.hf` is its HF tokenizer if it has one.
    """

    def __init__(self, hf_tokenizer: Any = None, max_length: int = 64, *, open_clip_tokenizer: Any = None):
        if hf_tokenizer is None and open_clip_tokenizer is None:
            raise ValueError("give an hf_tokenizer and/or an open_clip_tokenizer")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.hf = hf_tokenizer
        self._open_clip = open_clip_tokenizer
        # open_clip towers were trained on fixed-length ids (SigLIP pools the last position): keep them so.
        self.padding = "max_length" if open_clip_tokenizer is not None else "longest"
        self.max_length = int(max_length)
        if hf_tokenizer is not None:
            if hf_tokenizer.pad_token_id is None:
                raise ValueError("the HF tokenizer has no pad token")
            self.pad_token_id = int(hf_tokenizer.pad_token_id)
        else:
            self.pad_token_id = 0  # open_clip's SimpleTokenizer pads with 0

    @classmethod
    def from_pretrained(cls, name_or_path: str, max_length: int) -> "TextTokenizer":
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
        if not getattr(hf, "is_fast", False):
            raise ValueError(f"{name_or_path}: a fast (tokenizers-backed) tokenizer is required")
        return cls(hf, max_length)

    def __call__(self, texts: Sequence[str], padding: str = "longest") -> Tensor:
        """Token ids [B, L], truncated to max_length; L = longest text or max_length."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings")
        if len(texts) == 0:
            raise ValueError("texts is empty")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if self._open_clip is not None:
            return self._open_clip(list(texts)).long()  # always padded to max_length
        encoded = self.hf(
            list(texts), padding=padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return encoded["input_ids"].long()

    def save(self, directory: str | Path) -> Path:
        """Write the HF tokenizer files; tokenizer.json carries truncation and padding so the
        plain `tokenizers` library reproduces `__call__(padding="longest")` without torch."""
        if self.hf is None:
            raise NotImplementedError("this open_clip tokenizer has no HF or `tokenizers` equivalent to save")
        from tokenizers import Tokenizer

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(directory))
        backend = Tokenizer.from_str(self.hf.backend_tokenizer.to_str())
        backend.enable_truncation(max_length=self.max_length)
        backend.enable_padding(pad_id=self.pad_token_id, pad_token=self.hf.pad_token)
        backend.save(str(directory / "tokenizer.json"))
        meta = {"max_length": self.max_length, "pad_token_id": self.pad_token_id, "padding": self.padding}
        (directory / "vitrine_tokenizer.json").write_text(json.dumps(meta, indent=2) + "\n")
        return directory


__all__ = ["PruningGate", "TextTokenizer", "VitrineModel"]
