"""Export a trained model to a model bundle: two ONNX graphs, the tokenizer and a manifest.

The bundle is what serving loads (`vitrine.runtime.load_bundle`, no torch). Export
measures parity on the spot: the bundle, run through the torch-free runtime
(tokenizers + numpy/Pillow preprocessing + onnxruntime), against the torch model
with its own tokenizer and open_clip eval transform. A bundle whose parity exceeds
the tolerance is not written.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image
from torch import nn

from vitrine.errors import UserError
from vitrine.runtime.bundle import load_bundle
from vitrine.runtime.bundle_dir import check_bundle_destination, swap_bundle_into_place
from vitrine.runtime.manifest import (
    BUNDLE_FORMAT,
    FORMAT_VERSION,
    IMAGE_ENCODER_FILE,
    RESERVED_KEYS,
    TEXT_ENCODER_FILE,
    TOKENIZER_DIR,
    BundleManifest,
    ParityRecord,
    hash_bundle_files,
    write_manifest,
)
from vitrine.runtime.preprocess import DEFAULT_CROP, PatchSpec, PreprocessSettings, preprocess_images
from vitrine.runtime.tokenizer import TOKENIZER_FILE, TokenizerSettings

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4
TEXT_INPUT = "input_ids"
IMAGE_INPUT = "pixels"
OUTPUT = "embeddings"
PATCHES_OUTPUT = "patches"
# Used when the caller gives no check inputs: mixed lengths, one longer than any max_length.
DEFAULT_CHECK_TEXTS = (
    "dress",
    "red summer dress",
    "men's black leather ankle boots with side zip",
    "Nike Men Blue T20 Indian Cricket Jersey",
    "women's floral print cotton kurta with three-quarter sleeves and a mandarin collar, " * 8,
)
DEFAULT_CHECK_IMAGE_SIZES = ((60, 80), (224, 224), (300, 197), (17, 40))


class ExportError(UserError):
    """The model could not be exported, or the exported bundle does not match the torch model."""


class _TextGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, normalize=True)


class _ImageGraph(nn.Module):
    """pixels -> embeddings, or (embeddings, patches) from one trunk pass when `patches`."""

    def __init__(self, model: nn.Module, patches: bool = False) -> None:
        super().__init__()
        self.model = model
        self.patches = patches

    def forward(self, pixels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.patches:
            return self.model.encode_image_with_patches(pixels, normalize=True)
        return self.model.encode_image(pixels, normalize=True)


def preprocess_settings(model: nn.Module, preprocess: dict | None = None) -> PreprocessSettings:
    """The eval-transform settings: `preprocess` overrides the model config's `preprocess_cfg`.

    Models built from open_clip names carry no `preprocess_cfg`; open_clip's own record is used.
    """
    config = getattr(model, "config", {}) or {}
    base: dict[str, Any] = dict(config.get("preprocess_cfg") or {})
    if not base and hasattr(model, "clip"):
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(model.clip)
        base = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode", "fill_color") if k in cfg}
    settings = {"image_size": int(model.image_size), **base, **(preprocess or {})}
    if "mean" not in settings or "std" not in settings:
        raise ExportError("preprocessing needs mean and std: pass preprocess={'mean': ..., 'std': ...}")
    try:
        result = PreprocessSettings.model_validate(settings)
    except ValueError as exc:
        raise ExportError(f"invalid preprocessing settings {settings}: {exc}") from exc
    if result.image_size != int(model.image_size):
        raise ExportError(f"preprocess image_size {result.image_size} differs from the model's {model.image_size}")
    return result


def reference_transform(settings: PreprocessSettings):
    """open_clip's eval transform for these settings: what the trainer's `preprocess_val` does."""
    import open_clip

    return open_clip.image_transform(
        settings.image_size,
        is_train=False,
        mean=settings.mean,
        std=settings.std,
        resize_mode=settings.resize_mode,
        interpolation=settings.interpolation,
        fill_color=settings.fill_color,
    )


def default_check_images(seed: int = 0) -> list[Image.Image]:
    """Smooth random images of awkward sizes (portrait, square, landscape, tiny)."""
    rng = np.random.default_rng(seed)
    images = []
    for width, height in DEFAULT_CHECK_IMAGE_SIZES:
        coarse = rng.integers(0, 256, size=(max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
        images.append(Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BILINEAR))
    return images


@contextlib.contextmanager
def onnx_exportable_attention() -> Iterator[None]:
    """Turn off nn.MultiheadAttention's inference fast path while exporting: it traces to
    `aten::_native_multi_head_attention`, which ONNX has no op for (open_clip's ViT and text towers)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _export_graph(
    module: nn.Module, example: torch.Tensor, path: Path, *, input_name: str, dynamic: dict[int, str], opset: int,
    outputs: Sequence[str] = (OUTPUT,),
) -> str:
    """Export with the TorchScript-based exporter (dynamic_axes); dynamo export if that one is gone."""
    common = dict(input_names=[input_name], output_names=list(outputs), opset_version=opset)
    try:
        with warnings.catch_warnings(), onnx_exportable_attention():
            warnings.simplefilter("ignore")  # TracerWarnings about Python-side checks; parity is verified later
            try:
                torch.onnx.export(
                    module, (example,), str(path), dynamo=False, do_constant_folding=True,
                    dynamic_axes={input_name: dynamic, **{name: {0: dynamic[0]} for name in outputs}}, **common,
                )
                method = "torchscript"
            except TypeError:  # a torch without the legacy exporter
                dims = {axis: torch.export.Dim(name, min=1) for axis, name in dynamic.items()}
                torch.onnx.export(
                    module, (example,), str(path), dynamo=True, external_data=False,
                    dynamic_shapes={input_name: dims}, **common,
                )
                method = "dynamo"
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"ONNX export of {path.name} failed: {type(exc).__name__}: {exc}") from exc
    return method


def _hf_text_config(model: nn.Module) -> Any:
    """The HF config of the model's text transformer, or None for non-HF text towers."""
    transformer = getattr(getattr(getattr(model, "clip", None), "text", None), "transformer", None)
    return getattr(transformer, "config", None)


def optimize_text_graph(path: Path, model: nn.Module, check_ids: Sequence[np.ndarray], *, tolerance: float) -> str:
    """Fuse the text graph with onnxruntime's BERT optimizer, in place, when the result still matches.

    Full fusion (Attention, SkipLayerNorm, BiasGelu) first; token-pruning gates read the attention
    probabilities, which the fused Attention op hides, so then fusion without attention. Each
    candidate must reproduce the plain graph on `check_ids` within `tolerance`, else it is dropped.
    Returns a description of what was applied, for the manifest.
    """
    config = _hf_text_config(model)
    if config is None:
        return "none (not an HF text tower)"
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from vitrine.runtime.session import make_session

    plain = make_session(path, threads=1)
    expected = [plain.run([OUTPUT], {TEXT_INPUT: ids})[0] for ids in check_ids]
    candidate = path.with_name(path.stem + ".fused.onnx")
    failures = []
    for attention in (True, False):
        options = FusionOptions("bert")
        options.enable_attention = attention
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")  # the optimizer prints and warns about patterns it skips
                fused = optimize_model(
                    str(path), model_type="bert", num_heads=int(getattr(config, "num_attention_heads", 0) or 0),
                    hidden_size=int(getattr(config, "hidden_size", 0) or 0), optimization_options=options, opt_level=0,
                )
            fused.save_model_to_file(str(candidate))
            session = make_session(candidate, threads=1)
            diff = max(float(np.abs(session.run([OUTPUT], {TEXT_INPUT: ids})[0] - exp).max()) for ids, exp in zip(check_ids, expected))
        except Exception as exc:  # the optimizer raises assorted errors on patterns it cannot fuse
            failures.append(f"attention={attention}: {type(exc).__name__}")
            continue
        if diff <= tolerance:
            candidate.replace(path)
            stats = ", ".join(f"{k} {v}" for k, v in fused.get_fused_operator_statistics().items() if v)
            return f"onnxruntime bert fusion ({stats})"
        failures.append(f"attention={attention}: max abs diff {diff:.2g}")
    candidate.unlink(missing_ok=True)
    log.info("text graph left unfused: %s", "; ".join(failures))
    return "none (" + "; ".join(failures) + ")"


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def model_name(model: nn.Module) -> str:
    """`model.name` if set, else the config's name or open_clip model, else the class name."""
    config = getattr(model, "config", {}) or {}
    return str(getattr(model, "name", None) or config.get("name") or config.get("open_clip_model") or type(model).__name__)


def _tokenizer_settings(tokenizer: Any) -> TokenizerSettings:
    hf = getattr(tokenizer, "hf", None)
    lowercase = None
    if hf is not None:
        lowercase = getattr(hf, "do_lower_case", None)
        if lowercase is None:
            lowercase = hf.init_kwargs.get("do_lower_case")
    return TokenizerSettings(
        dir=TOKENIZER_DIR,
        file=TOKENIZER_FILE,
        max_length=int(tokenizer.max_length),
        pad_token_id=int(tokenizer.pad_token_id),
        pad_token=getattr(hf, "pad_token", None),
        lowercase=lowercase,
        padding=getattr(tokenizer, "padding", "longest"),
    )


def _check_caller_manifest(extra: dict | None) -> dict:
    extra = dict(extra or {})
    clash = sorted(set(extra) & RESERVED_KEYS)
    if clash:
        raise ExportError(f"manifest keys {clash} are written by the exporter and cannot be overridden")
    return _json_safe(extra)


@torch.no_grad()
def measure_parity(
    bundle_dir: Path,
    model: nn.Module,
    tokenizer: Any,
    settings: PreprocessSettings,
    texts: Sequence[str],
    images: Sequence[Image.Image],
    *,
    tolerance: float,
) -> ParityRecord:
    """Bundle via the torch-free runtime vs the torch model: texts batched and one by one, images batched."""
    device = next(model.parameters()).device
    bundle = load_bundle(bundle_dir, verify=False, threads=1)
    texts = list(texts)
    text_diff = None
    lengths: list[int] = []
    if texts:
        ours_batch = bundle.encode_texts(texts)
        ours_alone = np.concatenate([bundle.encode_texts([t]) for t in texts])  # each at its own length
        theirs = model.encode_text(tokenizer(texts, padding="longest").to(device)).float().cpu().numpy()
        text_diff = float(max(np.abs(ours_batch - theirs).max(), np.abs(ours_alone - theirs).max()))
        row_lengths = [len(r) for r in bundle.text.tokenizer.encode_rows(texts)]
        lengths = [min(row_lengths), max(row_lengths)]
    image_diff = pixel_diff = patches_diff = patches_scale = None
    if images:
        transform = reference_transform(settings)
        reference = torch.stack([transform(im) for im in images])
        pixel_diff = float(np.abs(preprocess_images(list(images), settings) - reference.numpy()).max())
        ours = bundle.encode_images(list(images))
        theirs = model.encode_image(reference.to(device)).float().cpu().numpy()
        image_diff = float(np.abs(ours - theirs).max())
        if bundle.patch_spec is not None:
            ours_joint, ours_patches = bundle.encode_images_with_patches(list(images))
            theirs_patches = model.image_patch_features(reference.to(device)).float().cpu().numpy()
            # the joint run's embeddings must be encode_images' too
            image_diff = max(image_diff, float(np.abs(ours_joint - theirs).max()))
            patches_diff = float(np.abs(ours_patches - theirs_patches).max())
            patches_scale = float(np.abs(theirs_patches).max())
    return ParityRecord(
        tolerance=tolerance,
        texts=len(texts),
        images=len(images),
        text_max_abs_diff=text_diff,
        image_max_abs_diff=image_diff,
        preprocess_max_abs_diff=pixel_diff,
        patches_max_abs_diff=patches_diff,
        patches_max_abs=patches_scale,
        token_lengths=lengths,
    )


def _patches_tolerance(parity: ParityRecord) -> float:
    """Patch features are O(1..10): the tolerance scales with their magnitude (never below the absolute one)."""
    return parity.tolerance * max(1.0, parity.patches_max_abs or 0.0)


def _wants_patches(model: nn.Module, patches: bool | None) -> bool:
    available = bool(getattr(model, "has_image_patches", False))
    if patches and not available:
        raise ExportError("patches=True needs an image tower with a timm CNN trunk; this model has none")
    return available if patches is None else bool(patches)


def export_bundle(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    manifest: dict | None = None,
    preprocess: dict | None = None,
    check_texts: list[str] | None = None,
    check_images: list[Image.Image] | None = None,
    opset: int = DEFAULT_OPSET,
    tolerance: float = DEFAULT_TOLERANCE,
    overwrite: bool = False,
    name: str | None = None,
    optimize: bool = True,
    patches: bool | None = None,
) -> Path:
    """Write a model bundle directory for `model` (a trainer VitrineModel) and return its path.

    manifest: extra top-level manifest fields (training fingerprint, val metrics, `alpha`, `pruning`).
    preprocess: overrides for the eval preprocessing (default: the model config's preprocess_cfg).
    check_texts / check_images: parity inputs (default: a few built-in texts and synthetic images).
    tolerance: max abs difference allowed between bundle and torch embeddings.
    overwrite: replace an existing bundle at out_dir (never a directory that is not a bundle).
    name: the model name for the manifest (default: `model.name`, else from its config).
    optimize: fuse the text graph with onnxruntime's BERT optimizer (kept only if it still matches).
    patches: give the image graph a second output `patches` [batch, P, C] (the trunk's block output,
      `model.image_patch_features`); default: when the model has a timm CNN trunk.
    The bundle is built beside out_dir and renamed into place, so a failed export leaves nothing.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    extra = _check_caller_manifest(manifest)
    settings = preprocess_settings(model, preprocess)
    if settings.crop != DEFAULT_CROP[settings.resize_mode]:
        raise ExportError(f"crop {settings.crop!r} with resize_mode {settings.resize_mode!r} is not an open_clip transform")
    tok_settings = _tokenizer_settings(tokenizer)
    texts = list(DEFAULT_CHECK_TEXTS) if check_texts is None else list(check_texts)
    images = default_check_images() if check_images is None else list(check_images)
    with_patches = _wants_patches(model, patches)
    check_bundle_destination(out_dir, overwrite, error=ExportError)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        size = int(model.image_size)
        example_ids = tokenizer(["red summer dress", "black leather ankle boots for women"], padding="longest").to(device)
        example_pixels = torch.zeros(2, 3, size, size, device=device)
        with torch.no_grad():
            text_method = _export_graph(
                _TextGraph(model).eval(), example_ids, tmp / TEXT_ENCODER_FILE,
                input_name=TEXT_INPUT, dynamic={0: "batch", 1: "sequence"}, opset=opset,
            )
            image_method = _export_graph(
                _ImageGraph(model, patches=with_patches).eval(), example_pixels, tmp / IMAGE_ENCODER_FILE,
                input_name=IMAGE_INPUT, dynamic={0: "batch"}, opset=opset,
                outputs=(OUTPUT, PATCHES_OUTPUT) if with_patches else (OUTPUT,),
            )
        text_optimization = "none (optimize=False)"
        if optimize:
            check_ids = [example_ids.cpu().numpy()] + [tokenizer([t], padding="longest").numpy() for t in texts]
            if texts:
                check_ids.append(tokenizer(texts, padding="longest").numpy())
            text_optimization = optimize_text_graph(tmp / TEXT_ENCODER_FILE, model, check_ids, tolerance=tolerance / 10)
        tokenizer.save(tmp / TOKENIZER_DIR)
        if not (tmp / TOKENIZER_DIR / TOKENIZER_FILE).is_file():
            raise ExportError(f"the tokenizer did not write {TOKENIZER_FILE}; the runtime needs it")

        embed_dim = int(model.embed_dim)
        pruning = extra.pop("pruning", getattr(model, "pruning_enabled", None))
        fields: dict[str, Any] = dict(
            format=BUNDLE_FORMAT,
            format_version=FORMAT_VERSION,
            model={"name": name or model_name(model), "config": _json_safe(getattr(model, "config", {}) or {})},
            embed_dim=embed_dim,
            image_size=size,
            preprocess=settings,
            tokenizer=tok_settings,
            text_encoder=dict(file=TEXT_ENCODER_FILE, input_name=TEXT_INPUT, input_dtype="int64",
                              input_shape=["batch", "sequence"], output_name=OUTPUT, output_shape=["batch", embed_dim]),
            image_encoder=dict(file=IMAGE_ENCODER_FILE, input_name=IMAGE_INPUT, input_dtype="float32",
                               input_shape=["batch", 3, size, size], output_name=OUTPUT, output_shape=["batch", embed_dim]),
            opset=opset,
            exporter={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                      "text_method": text_method, "image_method": image_method, "text_optimization": text_optimization},
            files=hash_bundle_files(tmp),
            created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            pruning=pruning,
            patches=PatchSpec(output=PATCHES_OUTPUT, grid=model.image_patch_grid, dim=model.image_patch_dim) if with_patches else None,
            **extra,
        )
        write_manifest(tmp, BundleManifest.model_validate(fields))
        parity = measure_parity(tmp, model, tokenizer, settings, texts, images, tolerance=tolerance)
        write_manifest(tmp, BundleManifest.model_validate({**fields, "parity": parity}))
        worst = max(d for d in (parity.text_max_abs_diff, parity.image_max_abs_diff, parity.preprocess_max_abs_diff, 0.0) if d is not None)
        patches_off = parity.patches_max_abs_diff is not None and parity.patches_max_abs_diff > _patches_tolerance(parity)
        if worst > tolerance or patches_off:
            patch_note = "" if parity.patches_max_abs_diff is None else (
                f", patches {parity.patches_max_abs_diff} (tolerance {_patches_tolerance(parity):.3g})"
            )
            raise ExportError(
                f"exported bundle differs from the torch model: text {parity.text_max_abs_diff}, "
                f"image {parity.image_max_abs_diff}, pixels {parity.preprocess_max_abs_diff} (tolerance {tolerance}){patch_note}"
            )
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
        swap_bundle_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.train(was_training)
    log.info("exported bundle %s (parity: text %s, image %s, patches %s)", out_dir, parity.text_max_abs_diff,
             parity.image_max_abs_diff, parity.patches_max_abs_diff)
    return out_dir
