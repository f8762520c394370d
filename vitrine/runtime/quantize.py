"""int8 copies of a bundle's encoder graphs (onnxruntime quantization), with their error measured.

Text: dynamic quantization stores MatMul/Gemm weights as per-channel int8 and quantizes activations on
the fly, which makes the transformer text tower several times cheaper on a CPU.
Image: a convolutional trunk needs its activation ranges fixed ahead of time to run int8 kernels (dynamic
Conv quantization is slower than float here), so with catalog photos to calibrate on, the trunk is
quantized statically (QDQ: uint8 activations, int8 per-channel weights) and the head after it stays float.

It is lossy, so the copy is never silent: the manifest's `quantization` records, per graph, how far the
int8 embeddings are from the float graph's on the check inputs (the smallest and mean cosine, the largest
absolute difference), and `vitrine eval` on the copy measures what it costs in retrieval.

    vitrine bundle quantize --bundle bundles/b --out bundles/b-int8 [--graphs text,image] [--catalog C]
"""
from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from pydantic import BaseModel

from vitrine.errors import UserError
from vitrine.runtime.bundle_dir import check_bundle_destination, swap_bundle_into_place
from vitrine.runtime.manifest import bundle_fingerprint, hash_bundle_files, read_manifest, verify_files, write_manifest
from vitrine.runtime.preprocess import preprocess_images

if TYPE_CHECKING:
    import onnx

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
    mean_cosine: float | None = None
    calibration_images: int | None = None
    max_abs_diff: float
    seconds: float


def _require_onnx() -> None:
    """onnxruntime's quantization tools read and write graphs with the `onnx` package, which serving lacks."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserError("quantizing needs the onnx package: pip install onnx (or the train extra)") from None


def quantize_graph_int8(src: Path, dst: Path) -> None:
    """Write the dynamically quantized (int8 per-channel weights) copy of the ONNX graph `src` to `dst`."""
    _require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Fused graphs (com.microsoft Attention, SkipLayerNorm) defeat ONNX shape inference; their tensors are float.
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": FLOAT_TENSOR})


STATIC_METHOD = "onnxruntime static QDQ of the convolutional trunk, uint8 activations, int8 weights per channel"
ACTIVATIONS = ("Clip", "Relu")  # a Conv's activation is quantized with it, so the int8 kernels fuse
MIN_STRIDE = 8  # layers at a finer resolution stay float (see trunk_nodes)


def _spatial_size(graph: onnx.GraphProto) -> dict[str, int]:
    """Height of every rank-4 tensor whose shape ONNX shape inference fixed."""
    sizes = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        dims = info.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[2].HasField("dim_value"):
            sizes[info.name] = dims[2].dim_value
    return sizes


def trunk_nodes(graph: onnx.GraphProto, min_stride: int = MIN_STRIDE) -> list[str]:
    """Names of the convolutional trunk's nodes to quantize: what the last Conv depends on, and its activation.

    What follows the trunk (pooling, attention head, projection, normalisation) is small and precision
    sensitive, so it stays float. So do the layers whose output is finer than 1/`min_stride` of the input:
    the stem and the first block stages have few channels with very different ranges, which one uint8
    range per tensor serves badly (EfficientNet-Lite0: mean cosine to float 0.989 with them int8, 0.997
    without, for about 10 % of the speed-up).
    """
    nodes = list(graph.node)  # ONNX keeps nodes in topological order
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    if not convs:
        return []
    producer = {out: n for n in nodes for out in n.output}
    last = nodes[convs[-1]]
    keep, stack = {}, [last]
    while stack:
        node = stack.pop()
        if node.name in keep:
            continue
        keep[node.name] = node
        stack.extend(producer[i] for i in node.input if i in producer)
    keep.update({n.name: n for n in nodes if n.op_type in ACTIVATIONS and last.output[0] in n.input})
    sizes = _spatial_size(graph)
    pixels = sizes.get(graph.input[0].name) if graph.input else None
    if pixels:
        fine = {name for name, node in keep.items() if sizes.get(node.output[0], 0) * min_stride > pixels}
        keep = {name: node for name, node in keep.items() if name not in fine}
    return [n.name for n in nodes if n.name in keep]


def quantize_image_graph_int8(src: Path, dst: Path, calibration: np.ndarray, input_name: str) -> None:
    """Write the statically quantized copy of the image graph `src`, calibrated on `calibration` pixels."""
    _require_onnx()
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    assert calibration.ndim == 4 and len(calibration) > 0, calibration.shape

    # Equal batches: the percentile calibrator stacks its per-batch outputs into one array.
    size = max(b for b in range(1, 17) if len(calibration) % b == 0)

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration[i : i + size] for i in range(0, len(calibration), size))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory(prefix="vitrine-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared))
        nodes = trunk_nodes(onnx.load(str(prepared)).graph)
        if not nodes:
            raise UserError(f"the image graph has no convolutional layers at 1/{MIN_STRIDE} of the input's "
                            "resolution or coarser to quantize statically")
        # Percentile ranges ignore the rare extreme activation that would coarsen every other step.
        with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime prints its calibration progress
            quantize_static(str(prepared), str(dst), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                            calibrate_method=CalibrationMethod.Percentile, extra_options={"CalibPercentile": 99.99})


def row_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine of each row pair of two (n, D) embedding matrices."""
    assert reference.shape == candidate.shape and reference.ndim == 2, (reference.shape, candidate.shape)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    return np.einsum("nd,nd->n", reference, candidate) / np.maximum(norms, 1e-12)


def compare_embeddings(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(smallest row cosine, largest absolute difference) between two (n, D) embedding matrices."""
    return float(row_cosines(reference, candidate).min()), float(np.abs(reference - candidate).max())


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
    check_images: Sequence[Image.Image] | None = None,
    calibration_images: Sequence[Image.Image] | None = None,
    min_cosine: float = 0.95,
    min_image_cosine: float | None = None,
    overwrite: bool = False,
) -> dict[str, dict]:
    """Copy `bundle` to `out` with the named graphs quantized to int8; returns what each graph lost.

    With `calibration_images` (catalog photos) the image graph's trunk is quantized statically, which is
    what makes it faster; without, dynamically. The copy is built beside `out` and renamed into place, so a
    failure leaves nothing. A graph whose int8 outputs fall below `min_cosine` (images: `min_image_cosine`,
    default the same) of the float graph's on any check input is refused (UserError).
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
            static = graph == "image" and bool(calibration_images)
            start = time.perf_counter()
            if static:
                pixels = preprocess_images(list(calibration_images), manifest.preprocess)
                quantize_image_graph_int8(src / spec.file, staged / spec.file, pixels, spec.input_name)
            else:
                quantize_graph_int8(src / spec.file, staged / spec.file)
            seconds = time.perf_counter() - start
            candidate = load_bundle(staged, threads=1, verify=False)
            if graph == "text":
                ref, new, checks = reference.encode_texts(texts), candidate.encode_texts(texts), len(texts)
                floor = min_cosine
            else:
                images = list(check_images) if check_images else _check_images(manifest.image_size)
                ref, new, checks = reference.encode_images(images), candidate.encode_images(images), len(images)
                floor = min_cosine if min_image_cosine is None else min_image_cosine
            cosines = row_cosines(ref, new)
            cos, diff = float(cosines.min()), float(np.abs(ref - new).max())
            if cos < floor:
                raise UserError(f"int8 {graph} graph is too far from the float one: cosine {cos:.4f} < {floor}")
            how = {"method": STATIC_METHOD, "calibration_images": len(calibration_images)} if static else {}
            records[graph] = GraphQuantization(checks=checks, min_cosine=round(cos, 6), mean_cosine=round(float(cosines.mean()), 6),
                                               max_abs_diff=round(diff, 6), seconds=round(seconds, 2), **how).model_dump()  # fmt: skip
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
