"""int8 copies of a bundle's encoder graphs (onnxruntime dynamic quantization), with their error measured.

Dynamic quantization stores MatMul/Gemm weights as per-channel int8 and quantizes activations on the
fly, which makes the transformer text tower several times cheaper on a CPU. It is lossy, so the copy is
never silent: the manifest's `quantization` records, per graph, how far the int8 embeddings are from the
float graph's on the check texts (the smallest cosine and the largest absolute difference), and
`vitrine eval` on the copy measures what it costs in retrieval.

    vitrine bundle quantize --bundle bundles/b --out bundles/b-int8 [--graphs text] [--catalog C]
"""
from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from vitrine.errors import UserError
from vitrine.runtime.bundle_dir import check_bundle_destination, swap_bundle_into_place
from vitrine.runtime.manifest import bundle_fingerprint, hash_bundle_files, read_manifest, verify_files, write_manifest

GRAPHS = ("text", "image")
FLOAT_TENSOR = 1  # onnx.TensorProto.FLOAT
DEFAULT_CHECK_TEXTS = (
    "red floral summer dress", "black leather ankle boots for women", "men navy blue slim fit jeans",
    "kids white sports shoes", "gold analog watch", "unisex grey hooded sweatshirt", "pink lipstick",
    "Puma Men Black Running Shoes", "Nike Women Blue Printed T-shirt", "brown",
)


class GraphQuantization(BaseModel):
    """How one graph was quantized and how far its outputs moved (measured on `checks` inputs)."""

    method: str = "onnxruntime dynamic, int8 weights per channel"
    checks: int
    min_cosine: float
    max_abs_diff: float
    seconds: float


def quantize_graph_int8(src: Path, dst: Path) -> None:
    """Write the dynamically quantized (int8 per-channel weights) copy of the ONNX graph `src` to `dst`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Fused graphs (com.microsoft Attention, SkipLayerNorm) defeat ONNX shape inference; their tensors are float.
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": FLOAT_TENSOR})


def compare_embeddings(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(smallest row cosine, largest absolute difference) between two (n, D) embedding matrices."""
    assert reference.shape == candidate.shape and reference.ndim == 2, (reference.shape, candidate.shape)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    cosine = np.einsum("nd,nd->n", reference, candidate) / np.maximum(norms, 1e-12)
    return float(cosine.min()), float(np.abs(reference - candidate).max())


def _check_images(size: int, n: int = 6) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def quantize_bundle(
    bundle: str | Path,
    out: str | Path,
    *,
    graphs: Sequence[str] = ("text",),
    check_texts: Sequence[str] | None = None,
    min_cosine: float = 0.95,
    overwrite: bool = False,
) -> dict[str, dict]:
    """Copy `bundle` to `out` with the named graphs quantized to int8; returns what each graph lost.

    The copy is built beside `out` and renamed into place, so a failure leaves nothing. A graph whose
    int8 outputs fall below `min_cosine` of the float graph's on any check input is refused (UserError).
    """
    from vitrine.runtime.bundle import load_bundle

    unknown = sorted(set(graphs) - set(GRAPHS))
    if unknown or not graphs:
        raise UserError(f"graphs must be some of {', '.join(GRAPHS)}, got {', '.join(graphs) or 'none'}")
    src, dst = Path(bundle).expanduser().absolute(), Path(out).expanduser().absolute()
    if src == dst:
        raise UserError("--out must differ from --bundle: the float bundle is the reference and stays")
    manifest = read_manifest(src)
    verify_files(src, manifest)
    again = sorted(set(graphs) & set(manifest.quantization))
    if again:
        raise UserError(f"the {', '.join(again)} graph of {src} is already int8; quantize its float original")
    check_bundle_destination(dst, overwrite, overwrite_hint="--overwrite")
    texts = list(check_texts) if check_texts else list(DEFAULT_CHECK_TEXTS)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        staged = tmp / "bundle"
        shutil.copytree(src, staged)
        reference = load_bundle(src, threads=1, verify=False)
        records: dict[str, dict] = dict(manifest.quantization)
        for graph in graphs:
            spec = manifest.text_encoder if graph == "text" else manifest.image_encoder
            start = time.perf_counter()
            quantize_graph_int8(src / spec.file, staged / spec.file)
            seconds = time.perf_counter() - start
            candidate = load_bundle(staged, threads=1, verify=False)
            if graph == "text":
                ref, new, checks = reference.encode_texts(texts), candidate.encode_texts(texts), len(texts)
            else:
                images = _check_images(manifest.image_size)
                ref, new, checks = reference.encode_images(images), candidate.encode_images(images), len(images)
            cos, diff = compare_embeddings(ref, new)
            if cos < min_cosine:
                raise UserError(f"int8 {graph} graph is too far from the float one: cosine {cos:.4f} < {min_cosine}")
            records[graph] = GraphQuantization(checks=checks, min_cosine=round(cos, 6), max_abs_diff=round(diff, 6),
                                               seconds=round(seconds, 2)).model_dump()  # fmt: skip
        fields = manifest.model_dump(mode="json")
        fields["quantization"] = records
        fields["embeds_like"] = manifest.embeds_like or bundle_fingerprint(src)
        fields["files"] = hash_bundle_files(staged)
        write_manifest(staged, type(manifest).model_validate(fields))
        staged.chmod(0o755)
        swap_bundle_into_place(staged, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return records
