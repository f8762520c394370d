"""Build cross-encoders from the JSON config registry (`trainer/model_configs/cross/*.json`), mirroring
`trainer.factory` for the dual encoder; save and load checkpoints."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.cross_encoder.model import CrossEncoder, CrossEncoderConfig
from trainer.cross_encoder.patch_projection import projection_spec_of
from trainer.pretrained import MODEL_CONFIGS_DIR, resolve_hf_name
from vitrine.runtime.rerank_inputs import PairEncoder

CROSS_CONFIGS_DIR = MODEL_CONFIGS_DIR / "cross"
CHECKPOINT_FORMAT = "vitrine-cross-encoder"


def list_cross_encoders() -> list[str]:
    return sorted(p.stem for p in CROSS_CONFIGS_DIR.glob("*.json"))


def get_cross_encoder_config(name_or_path: str, **overrides: Any) -> CrossEncoderConfig:
    """A registry name ("minilm-l6", "tiny") or a JSON file path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CROSS_CONFIGS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(f"unknown cross-encoder {name_or_path!r}; known: {', '.join(list_cross_encoders())}")
    cfg = json.loads(path.read_text())
    cfg.setdefault("name", path.stem)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return CrossEncoderConfig(**cfg)


def _backbone(config: CrossEncoderConfig, pretrained: bool):
    from transformers import BertConfig, BertModel

    source = resolve_hf_name(config.hf_model_name)
    if pretrained:
        bert = BertModel.from_pretrained(source, attn_implementation="eager")
    else:
        bert = BertModel(BertConfig.from_pretrained(source, attn_implementation="eager"))
    return bert


def get_pair_encoder(config: CrossEncoderConfig) -> PairEncoder:
    from tokenizers import Tokenizer

    path = Path(resolve_hf_name(config.hf_tokenizer_name)) / "tokenizer.json"
    return PairEncoder(
        Tokenizer.from_file(str(path)), max_query_tokens=config.max_query_tokens, max_title_tokens=config.max_title_tokens
    )


def create_cross_encoder(
    name_or_path: str, *, pretrained: bool = True, project_patches_with: nn.Module | None = None, **overrides: Any
) -> tuple[CrossEncoder, PairEncoder]:
    """The cross-encoder (BERT initialised from the config's backbone when `pretrained`) and its pair encoder.
    `project_patches_with`, a trained dual encoder: the patches enter through its frozen image head
    (`patch_projection.ImagePatchProjection`)."""
    if project_patches_with is not None:
        overrides["patch_projection"] = asdict(projection_spec_of(project_patches_with))
        overrides.setdefault("aligned_dim", int(project_patches_with.embed_dim))
    config = get_cross_encoder_config(name_or_path, **overrides)
    model = CrossEncoder(_backbone(config, pretrained), config)
    if project_patches_with is not None:
        model.patch_projection.load_from_dual(project_patches_with)
    return model, get_pair_encoder(config)


def dual_encoder_of_bundle(bundle: str | Path) -> nn.Module:
    """The trained dual encoder a bundle was exported from (its manifest names the checkpoint)."""
    from trainer.bundle import load_checkpoint_model
    from vitrine.runtime.manifest import read_manifest

    checkpoint = ((read_manifest(bundle).model_extra or {}).get("training") or {}).get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_file():
        raise ValueError(f"bundle {bundle} does not name a training checkpoint on this machine ({checkpoint!r}); "
                         "projected patches need the dual encoder's trained image head")
    model, _, _, _ = load_checkpoint_model(Path(checkpoint))
    return model


def save_cross_encoder(model: CrossEncoder, path: str | Path, **extra: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "config": model.config.to_dict(), "state_dict": model.state_dict(), **extra}, tmp)
    tmp.replace(path)
    return path


def load_cross_encoder(path: str | Path) -> tuple[CrossEncoder, PairEncoder, dict[str, Any]]:
    """A saved cross-encoder (no pretrained download: the weights come from the checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cross-encoder checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a Vitrine cross-encoder checkpoint")
    config = CrossEncoderConfig(**ckpt["config"])
    model = CrossEncoder(_backbone(config, pretrained=False), config)
    state = dict(ckpt["state_dict"])
    state.setdefault("prior_weight", torch.zeros(()))  # checkpoints from before the first-stage prior
    model.load_state_dict(state)
    extra = {k: v for k, v in ckpt.items() if k not in ("format", "config", "state_dict")}
    return model, get_pair_encoder(config), extra


__all__ = [
    "create_cross_encoder", "dual_encoder_of_bundle", "get_cross_encoder_config", "get_pair_encoder", "list_cross_encoders",
    "load_cross_encoder", "save_cross_encoder",
]
