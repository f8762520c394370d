"""Export a trained cross-encoder into a model bundle as `reranker/reranker.onnx` (+ its tokenizer).

Batch and text length are dynamic axes, so serving pads K candidates only to their longest row (VSL).
Parity: ORT on VSL batches against torch on the same rows padded to the fixed maximum must agree
within `tolerance`, else nothing is written. With `quantize="int8"` the parity-checked graph is then
quantized (onnxruntime dynamic quantization, per-channel int8 weights) and the bundle ships that; how far
its scores move from the float graph's is recorded, and its ranking quality is `vitrine rerank eval`'s.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.cross_encoder.factory import load_cross_encoder
from trainer.cross_encoder.model import CrossEncoder
from vitrine.runtime.manifest import BundleError, hash_bundle_files, read_manifest, verify_files, write_manifest
from vitrine.runtime.quantize import quantize_graph_int8
from vitrine.runtime.rerank_inputs import ALIGNED_SLOTS, PairEncoder
from vitrine.runtime.reranker import ALIGNED_INPUT, INPUT_NAMES, OUTPUT_NAME, RERANKER_KEY, Reranker, RerankerSpec
from vitrine.runtime.session import make_session

RERANKER_DIR = "reranker"
PARITY_TOLERANCE = 1e-4
PARITY_QUERIES = ("red floral summer dress", "men black formal shoes", "navy blue backpack", "", "women white sports tshirt with long sleeves and print")
PARITY_TITLES = ("Nike Men Blue T20 Indian Cricket Jersey", "", "Puma Women Black Sneakers", "Reid & Taylor Men Black Socks", "Baggit Women Red Handbag")


class _ScoreGraph(nn.Module):
    def __init__(self, model: CrossEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, token_type_ids, attention_mask, patches, aligned=None):
        return self.model.score(input_ids, token_type_ids, attention_mask, patches, aligned)


def _input_names(model: CrossEncoder) -> list[str]:
    return list(INPUT_NAMES) + ([ALIGNED_INPUT] if model.aligned else [])


def _check_aligned(model: CrossEncoder, k: int, rng: np.random.Generator) -> np.ndarray | None:
    """Unit-length check embeddings [k, 3, D] (no title in the rows whose title is empty)."""
    if not model.aligned:
        return None
    x = rng.normal(size=(k, len(ALIGNED_SLOTS), model.config.aligned_dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    x[[i for i, t in enumerate(PARITY_TITLES[:k]) if not t], 1] = 0.0
    return x


def export_reranker_graph(model: CrossEncoder, encoder: PairEncoder, path: Path, opset: int = 17) -> None:
    model = model.eval()
    feeds = encoder.batch(list(PARITY_QUERIES[:2]), list(PARITY_TITLES[:2]))
    example = tuple(torch.from_numpy(feeds[n]) for n in INPUT_NAMES[:3]) + (torch.zeros(2, model.config.num_patches, model.config.patch_dim),)
    aligned = _check_aligned(model, 2, np.random.default_rng(0))
    if aligned is not None:
        example += (torch.from_numpy(aligned),)
    dynamic = {n: {0: "candidates", 1: "text_length"} for n in INPUT_NAMES[:3]}
    dynamic["patches"] = {0: "candidates"}
    if aligned is not None:
        dynamic[ALIGNED_INPUT] = {0: "candidates"}
    dynamic[OUTPUT_NAME] = {0: "candidates"}
    with torch.no_grad():
        torch.onnx.export(
            _ScoreGraph(model), example, str(path), input_names=_input_names(model), output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic, opset_version=opset, dynamo=False,
        )


def measure_reranker_parity(model: CrossEncoder, reranker: Reranker, seed: int = 0) -> dict[str, Any]:
    """Max |ORT VSL score - torch fixed-padding score| over check rows of mixed lengths."""
    rng = np.random.default_rng(seed)
    k = len(PARITY_QUERIES)
    patches = rng.normal(size=(k, model.config.num_patches, model.config.patch_dim)).astype(np.float32)
    aligned = _check_aligned(model, k, rng)
    ort_scores = reranker.score_pairs(list(PARITY_QUERIES), list(PARITY_TITLES), patches, aligned=aligned)
    width = reranker.encoder.max_text_tokens
    padded = reranker.encoder.batch(list(PARITY_QUERIES), list(PARITY_TITLES), pad_to=width)
    with torch.no_grad():
        torch_scores = model.eval().score(
            **{n: torch.from_numpy(padded[n]) for n in INPUT_NAMES[:3]}, patches=torch.from_numpy(patches),
            aligned=None if aligned is None else torch.from_numpy(aligned),
        ).numpy()
    vsl = reranker.encoder.batch(list(PARITY_QUERIES), list(PARITY_TITLES))["input_ids"].shape[1]
    return {
        "max_abs_diff": float(np.abs(ort_scores - torch_scores).max()),
        "rows": k,
        "vsl_text_length": int(vsl),
        "padded_text_length": int(width),
    }


QUANTIZATIONS = ("int8",)


def capped_encoder(encoder: PairEncoder, max_query_tokens: int | None, max_title_tokens: int | None) -> PairEncoder:
    """The pair encoder with its text caps lowered (never raised: the model saw no longer rows)."""
    query = encoder.max_query_tokens if max_query_tokens is None else int(max_query_tokens)
    title = encoder.max_title_tokens if max_title_tokens is None else int(max_title_tokens)
    if query > encoder.max_query_tokens or title > encoder.max_title_tokens:
        raise ValueError(f"caps {query} + {title} exceed what the reranker trained with "
                         f"({encoder.max_query_tokens} + {encoder.max_title_tokens})")  # fmt: skip
    if (query, title) == (encoder.max_query_tokens, encoder.max_title_tokens):
        return encoder
    return encoder.with_caps(query, title)


def export_reranker(
    checkpoint: str | Path,
    bundle_dir: str | Path,
    *,
    opset: int = 17,
    tolerance: float = PARITY_TOLERANCE,
    default_top_n: int = 20,
    quantize: str | None = None,
    max_query_tokens: int | None = None,
    max_title_tokens: int | None = None,
) -> RerankerSpec:
    """Add (or replace) the bundle's reranker. The bundle is rewritten in place, manifest last, so a
    reader sees either the old complete bundle or the new one.

    `max_query_tokens` / `max_title_tokens` cap the text of each row at serving time below what the model
    trained with (fewer tokens a row: faster reranking; measure the quality before shipping a cap)."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS} or None, got {quantize!r}")
    model, encoder, extra = load_cross_encoder(checkpoint)
    encoder = capped_encoder(encoder, max_query_tokens, max_title_tokens)
    patches = getattr(manifest, "patches", None)
    if patches is None:
        raise BundleError(f"bundle {bundle_dir} has no image patches output; the reranker needs one")
    grid, dim = tuple(patches.grid), int(patches.dim)
    mine = model.config.patch_grid
    if dim != model.config.patch_dim or mine[0] > grid[0] or mine[1] > grid[1]:
        raise BundleError(f"the reranker reads {mine} x {model.config.patch_dim} patches, the bundle gives {grid} x {dim}")
    if model.aligned and model.config.aligned_dim != int(manifest.embed_dim):
        raise BundleError(f"the reranker reads {model.config.aligned_dim}-d dual-encoder embeddings, the bundle gives {manifest.embed_dim}")
    with tempfile.TemporaryDirectory(prefix="vitrine-reranker-") as tmp:
        staged = Path(tmp)
        export_reranker_graph(model, encoder, staged / "reranker.onnx", opset)
        encoder.save(staged / "tokenizer.json")
        spec = RerankerSpec(
            file=f"{RERANKER_DIR}/reranker.onnx", tokenizer=f"{RERANKER_DIR}/tokenizer.json",
            model=model.config.name, layers=model.num_layers, hidden_size=model.hidden_size,
            max_query_tokens=encoder.max_query_tokens, max_title_tokens=encoder.max_title_tokens,
            patch_grid=model.config.patch_grid, patch_dim=model.config.patch_dim, default_top_n=default_top_n,
            source_grid=None if grid == mine else grid, aligned_dim=model.config.aligned_dim,
            prior_weight=float(model.prior_weight.detach()),
        )
        staged_spec = spec.model_copy(update={"file": "reranker.onnx", "tokenizer": "tokenizer.json"})
        reranker = Reranker(make_session(staged / "reranker.onnx", threads=2), PairEncoder.from_file(
            staged / "tokenizer.json", max_query_tokens=spec.max_query_tokens, max_title_tokens=spec.max_title_tokens), staged_spec)
        parity = measure_reranker_parity(model, reranker)
        if parity["max_abs_diff"] > tolerance:
            raise BundleError(f"reranker parity failed: ORT and torch differ by {parity['max_abs_diff']:.2e} > {tolerance:.0e}")
        parity["tolerance"] = tolerance
        if quantize == "int8":
            float_graph = staged / "reranker.float.onnx"
            (staged / "reranker.onnx").replace(float_graph)
            quantize_graph_int8(float_graph, staged / "reranker.onnx")
            float_graph.unlink()
            quantized = Reranker(make_session(staged / "reranker.onnx", threads=2), reranker.encoder, staged_spec)
            parity["int8_max_abs_diff_vs_torch"] = measure_reranker_parity(model, quantized)["max_abs_diff"]
        spec = spec.model_copy(update={
            "parity": parity, "precision": quantize or "float32",
            "training": {k: extra[k] for k in ("stage", "knowledge") if k in extra},
        })
        target = bundle_dir / RERANKER_DIR
        if target.exists():
            shutil.rmtree(target)
        target.mkdir()
        for name in ("reranker.onnx", "tokenizer.json"):
            shutil.copy2(staged / name, target / name)
    fields = manifest.model_dump(mode="json")
    fields[RERANKER_KEY] = spec.model_dump(mode="json")
    fields["files"] = hash_bundle_files(bundle_dir)
    write_manifest(bundle_dir, type(manifest).model_validate(fields))
    return spec


def set_reranker_prior_weight(bundle_dir: str | Path, weight: float, *, source: dict[str, Any] | None = None) -> RerankerSpec:
    """Rewrite the bundle's reranker prior weight (e.g. the one `vitrine rerank eval --tune-prior`
    picked on val); `source` says where it came from. Only the manifest changes."""
    if weight < 0:
        raise ValueError("the prior weight must be >= 0")
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    fields = manifest.model_dump(mode="json")
    if fields.get(RERANKER_KEY) is None:
        raise BundleError(f"bundle {bundle_dir} carries no reranker")
    spec = RerankerSpec.model_validate(fields[RERANKER_KEY])
    update: dict[str, Any] = {"prior_weight": float(weight)}
    if source is not None:
        update["prior_source"] = source
    spec = spec.model_copy(update=update)
    fields[RERANKER_KEY] = spec.model_dump(mode="json")
    write_manifest(bundle_dir, type(manifest).model_validate(fields))
    return spec


def export_reranker_copy(checkpoint: str | Path, bundle_dir: str | Path, out_dir: str | Path, **kw: Any) -> RerankerSpec:
    """Copy `bundle_dir` to `out_dir` and add the reranker there (the source bundle stays as it was)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise BundleError(f"{out_dir} exists; remove it or pick another directory")
    shutil.copytree(bundle_dir, out_dir)
    try:
        return export_reranker(checkpoint, out_dir, **kw)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise


__all__ = [
    "export_reranker", "export_reranker_copy", "export_reranker_graph", "measure_reranker_parity", "set_reranker_prior_weight",
]
