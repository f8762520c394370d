"""The GPU paths of the design, checked against the CPU path on the same inputs (issue 13, part 5).

One prepared script for a lent GPU machine, well under 5 minutes:

- Faiss on the GPU (faiss-gpu): a flat inner-product index over real-sized vectors gives the CPU's
  top 10 (ties at the 10th score may swap);
- onnxruntime's CUDAExecutionProvider (onnxruntime-gpu) runs the bundle's text and image encoders with
  parity <= 1e-3 against the CPU provider, and encodes faster;
- one CUDA training step with mixed precision (bf16 autocast) gives the float32 CPU step's loss and a
  close gradient, from the same weights and batch.

Each check reports "skipped: why" when its GPU build is missing (faiss-cpu, onnxruntime without CUDA).
On a machine without a GPU the script checks nothing, says so and exits 0. The check functions take
the device side as an argument, so the tests run them CPU against CPU.

    python3 bench/gpu_check.py --bundle bundles/int8/demo --out bench/out/gpu     # JSON + markdown
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json, write_markdown_table  # noqa: E402

PARITY_TOL = 1e-3
LOSS_RTOL = 2e-2  # bf16 autocast against float32
SCORE_TOL = 1e-4


def topk_agreement(cpu_scores: np.ndarray, cpu_ids: np.ndarray, dev_scores: np.ndarray, dev_ids: np.ndarray,
                   tol: float = SCORE_TOL) -> float:  # fmt: skip
    """Share of queries whose two top-k lists agree: same ids, except that ids scoring within `tol` of the
    k-th score (a tie, which either side may break its own way) may differ; scores must agree within `tol`."""
    assert cpu_ids.shape == dev_ids.shape == cpu_scores.shape == dev_scores.shape and cpu_ids.ndim == 2, (cpu_ids.shape, dev_ids.shape)
    agree = 0
    for cs, ci, ds, di in zip(cpu_scores, cpu_ids, dev_scores, dev_ids):
        if np.abs(cs - ds).max() > tol:
            continue
        kth = cs[-1]
        sure_cpu, sure_dev = set(ci[cs > kth + tol].tolist()), set(di[ds > kth + tol].tolist())
        agree += sure_cpu == sure_dev
    return agree / len(cpu_ids)


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def faiss_check(vectors: np.ndarray, queries: np.ndarray, to_device: Callable, k: int = 10) -> dict:
    """Flat inner-product search on the CPU and on `to_device(cpu_index)`: top-k agreement and times."""
    import faiss

    assert vectors.ndim == 2 and queries.ndim == 2 and vectors.shape[1] == queries.shape[1], (vectors.shape, queries.shape)
    cpu = faiss.IndexFlatIP(vectors.shape[1])
    cpu.add(vectors)
    started = time.perf_counter()
    cpu_scores, cpu_ids = cpu.search(queries, k)
    cpu_s = time.perf_counter() - started
    device = to_device(cpu)
    device.search(queries[:8], k)  # warm-up (kernels, memory pools)
    started = time.perf_counter()
    dev_scores, dev_ids = device.search(queries, k)
    dev_s = time.perf_counter() - started
    agreement = topk_agreement(cpu_scores, cpu_ids, dev_scores, dev_ids)
    return {"vectors": int(vectors.shape[0]), "queries": int(queries.shape[0]), "k": k, "top_k_agreement": agreement,
            "max_score_diff": float(np.abs(cpu_scores - dev_scores).max()), "cpu_ms_per_query": 1e3 * cpu_s / len(queries),
            "device_ms_per_query": 1e3 * dev_s / len(queries), "ok": agreement >= 0.999}  # fmt: skip


def faiss_gpu_check(vectors: np.ndarray, queries: np.ndarray) -> dict:
    try:
        import faiss
    except ImportError:
        return {"skipped": "faiss is not installed"}
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return {"skipped": "this faiss has no GPU support (install faiss-gpu-cu12 instead of faiss-cpu)"}
    resources = faiss.StandardGpuResources()
    return faiss_check(vectors, queries, lambda index: faiss.index_cpu_to_gpu(resources, 0, index))


def onnx_check(bundle: Path, device: str, texts: list[str], images: list, repeats: int = 3) -> dict:
    """The bundle's encoders under `device`'s provider against the CPU provider: max abs difference, encode rates."""
    from vitrine.runtime import load_bundle

    cpu, dev = load_bundle(bundle, device="cpu"), load_bundle(bundle, device=device)
    providers = dev.text.session.get_providers()
    out: dict = {"bundle": str(bundle), "providers": providers}
    for kind, encode_cpu, encode_dev, inputs in (("text", cpu.encode_texts, dev.encode_texts, texts),
                                                 ("image", cpu.encode_images, dev.encode_images, images)):  # fmt: skip
        expected, got = encode_cpu(inputs), encode_dev(inputs)
        rates = {}
        for side, encode in (("cpu", encode_cpu), ("device", encode_dev)):
            started = time.perf_counter()
            for _ in range(repeats):
                encode(inputs)
            rates[side] = repeats * len(inputs) / (time.perf_counter() - started)
        out[kind] = {"n": len(inputs), "max_abs_diff": float(np.abs(expected - got).max()),
                     "cpu_per_s": rates["cpu"], "device_per_s": rates["device"]}  # fmt: skip
    out["ok"] = all(out[kind]["max_abs_diff"] <= PARITY_TOL for kind in ("text", "image"))
    return out


def onnx_cuda_check(bundle: Path | None, texts: list[str], images: list) -> dict:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": "this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"}
    if bundle is None:
        return {"skipped": "no --bundle given"}
    result = onnx_check(bundle, "cuda", texts, images)
    if "CUDAExecutionProvider" not in result["providers"]:
        result.update(ok=False, error="the session fell back to the CPU provider")
    return result


def train_step_check(model_name: str, device: str, autocast_dtype, batch: int = 16, seed: int = 0,
                     texts: list[str] | None = None) -> dict:  # fmt: skip
    """One ClipLoss step from the same weights and batch: float32 on the CPU, autocast on `device`.
    Reports both losses and the relative difference of the trainable parameters' gradients."""
    import torch
    from open_clip.loss import ClipLoss

    from trainer.factory import create_model, get_tokenizer

    torch.manual_seed(seed)
    model = create_model(model_name, pretrained="none")
    pixels = torch.randn(batch, 3, model.image_size, model.image_size)
    texts = texts or sample_inputs(None, batch, 0, seed)[0]
    ids = get_tokenizer(model_name)(texts[:batch])
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def step(where: str, dtype) -> tuple[float, dict]:
        model.load_state_dict(state)
        model.to(where).eval()  # no dropout: both sides compute the same function
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type=where.split(":")[0], dtype=dtype, enabled=dtype is not None):
            out = model(pixels.to(where), ids.to(where))
            loss = ClipLoss()(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float())
        loss.backward()
        grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
        return float(loss.detach()), grads

    started = time.perf_counter()
    cpu_loss, cpu_grads = step("cpu", None)
    cpu_s = time.perf_counter() - started
    step(device, autocast_dtype)  # warm-up
    started = time.perf_counter()
    dev_loss, dev_grads = step(device, autocast_dtype)
    dev_s = time.perf_counter() - started
    common = [n for n in cpu_grads if n in dev_grads]
    num = sum(float((cpu_grads[n] - dev_grads[n]).norm() ** 2) for n in common) ** 0.5
    den = sum(float(cpu_grads[n].norm() ** 2) for n in common) ** 0.5
    rel = abs(dev_loss - cpu_loss) / max(abs(cpu_loss), 1e-8)
    return {"model": model_name, "batch": batch, "autocast": str(autocast_dtype), "cpu_loss": cpu_loss, "device_loss": dev_loss,
            "loss_rel_diff": rel, "grad_rel_diff": num / max(den, 1e-12), "parameters_with_grad": len(common),
            "cpu_step_s": cpu_s, "device_step_s": dev_s, "ok": rel <= LOSS_RTOL}  # fmt: skip


def cuda_train_check(model_name: str, texts: list[str]) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device"}
    return train_step_check(model_name, "cuda", torch.bfloat16, texts=texts)


def gpu_present() -> dict[str, bool]:
    """What can reach a GPU here: torch, faiss, onnxruntime (each False when missing or CPU-only)."""
    seen = {"torch": False, "faiss": False, "onnxruntime": False}
    try:
        import torch

        seen["torch"] = torch.cuda.is_available()
    except ImportError:
        pass
    try:
        import faiss

        seen["faiss"] = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except ImportError:
        pass
    try:
        import onnxruntime as ort

        seen["onnxruntime"] = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        pass
    return seen


def sample_inputs(catalog: Path | None, n_texts: int, n_images: int, seed: int) -> tuple[list[str], list]:
    """Titles and photos of the catalog's val split when it is there, else seeded synthetic ones."""
    from PIL import Image

    if catalog is not None and catalog.exists():
        from vitrine.catalog.registry import read_catalog

        val = read_catalog(str(catalog)).by_split("val")
        return [p.title for p in val[:n_texts]], [p.image.open() for p in val[:n_images]]
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "women", "men", "cotton", "shirt", "dress", "watch", "casual", "printed", "kurta", "shoes"]
    texts = [" ".join(rng.choice(words, size=5)) for _ in range(n_texts)]
    images = [Image.fromarray(rng.integers(0, 256, (256, 192, 3), dtype=np.uint8)) for _ in range(n_images)]
    return texts, images


def details(check: dict, prefix: str = "") -> str:
    """One check's numbers as "name value" pairs, nested dicts flattened (text.max_abs_diff 0.0003)."""
    parts = []
    for key, value in check.items():
        if key in ("ok", "providers"):
            continue
        if isinstance(value, dict):
            parts.append(details(value, f"{prefix}{key}."))
        else:
            parts.append(f"{prefix}{key} {value:.4g}" if isinstance(value, float) else f"{prefix}{key} {value}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="a model bundle for the onnxruntime check")
    ap.add_argument("--catalog", type=Path, default=Path("../shared/data/fashion-products"))
    ap.add_argument("--model", default="fashion-lite-apu", help="model config of the training-step check")
    ap.add_argument("--vectors", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/out/gpu"))
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run every check with the CPU as the 'device' side: shows the script runs through, proves nothing about a GPU")
    args = ap.parse_args(argv)

    seen = gpu_present()
    meta = {"date": date.today().isoformat(), "gpu_reachable_from": seen, "cpu_dry_run": args.cpu_dry_run}
    if not any(seen.values()) and not args.cpu_dry_run:
        print("gpu_check: no GPU here (torch sees no CUDA device, faiss has no GPU, onnxruntime has no "
              "CUDAExecutionProvider): nothing was checked. Run it on a GPU machine.")  # fmt: skip
        write_json(args.out / "gpu_check.json", {"meta": meta, "ran": False, "environment": environment()})
        return 0

    rng = np.random.default_rng(args.seed)
    checks: dict[str, dict] = {}
    texts, images = sample_inputs(args.catalog, 256, 64, args.seed)
    runs = {
        "faiss_gpu": lambda: faiss_gpu_check(unit_rows(rng, args.vectors, 256), unit_rows(rng, args.queries, 256)),
        "onnxruntime_cuda": lambda: onnx_cuda_check(args.bundle, texts, images),
        "cuda_train_step": lambda: cuda_train_check(args.model, texts),
    }
    if args.cpu_dry_run:
        import faiss
        import torch

        runs = {
            "faiss_gpu": lambda: faiss_check(unit_rows(rng, args.vectors, 256), unit_rows(rng, args.queries, 256), faiss.clone_index),
            "onnxruntime_cuda": lambda: onnx_check(args.bundle, "cpu", texts, images) if args.bundle else {"skipped": "no --bundle given"},
            "cuda_train_step": lambda: train_step_check(args.model, "cpu", torch.bfloat16, texts=texts),
        }
    for name, run in runs.items():
        started = time.perf_counter()
        try:
            checks[name] = run()
        except Exception as exc:  # a broken check is reported; the others still run
            checks[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        checks[name]["seconds"] = round(time.perf_counter() - started, 2)
        print(name, checks[name], flush=True)
    write_json(args.out / "gpu_check.json", {"meta": meta, "ran": True, "checks": checks, "environment": environment()})
    rows = [[name, "skipped" if "skipped" in c else ("ok" if c.get("ok") else "FAILED"),
             c.get("skipped") or c.get("error") or details(c)] for name, c in checks.items()]  # fmt: skip
    write_markdown_table(args.out / "gpu_check.md", ["check", "result", "details"], rows,
                         title="GPU paths against the CPU path", notes=[f"{k}: {v}" for k, v in meta.items()])
    failed = [name for name, c in checks.items() if "skipped" not in c and not c.get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
