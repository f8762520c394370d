"""Load test of the query service, against a naive pipeline with the same bundle.

    python3 bench/search_load.py --index indexes/fashion [--bundle B] [--requests 400] [--out bench/out]

Starts `vitrine serve` on a free 127.0.0.1 port (its own process), then, per query kind
(text, image) and per client count (1 and 8 by default), sends a bounded number of
requests (--requests, or until --seconds) from threads with keep-alive httpx clients and
measures p50/p99 latency and QPS. Text queries are distinct product titles, so every one
misses the query-embedding cache; a `text_cached` phase repeats queries to show the hit path.
Image queries are catalog photos re-encoded as JPEG at --image-px (a phone upload, not a thumbnail).

The naive pipeline runs in this process with the same bundle: text padded to the tokenizer's
max length, image encoded one by one, and a numpy brute-force fused score over every stored
title and image vector, then the product records. With torch it is the trainer's model rebuilt
from the checkpoint the bundle manifest records (training.checkpoint, or --checkpoint); without
one, it is the bundle's own ONNX graphs fed max-length padded ids (said so in the report).
Its results are compared with the service's for the same queries.

The server inherits the environment: VITRINE_THREADS=2 python3 bench/search_load.py ... compares
onnxruntime intra-op thread counts (the service's default is 1).

Writes bench/out/search_load.json and bench/out/search_load.md. Targets: text p50 <= 10 ms,
>= 150 QPS at 8 clients and >= 10x the naive pipeline's throughput; image p50 <= 30 ms.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import environment, latency_stats, markdown_table, write_json  # noqa: E402
from vitrine.scoring import fuse  # noqa: E402

TARGETS = {"text_p50_ms": 10.0, "text_qps_8": 150.0, "speedup_vs_naive": 10.0, "image_p50_ms": 30.0}  # issue 14 part 5


# ---------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(index: Path, bundle: Path | None, port: int) -> list[str]:
    """`vitrine serve` through the vitrine.cli host (commands register by entry point)."""
    args = ["serve", "--index", str(index), "--port", str(port), "--host", "127.0.0.1", "--log-level", "warning"]
    if bundle is not None:
        args += ["--bundle", str(bundle)]
    return [sys.executable, "-m", "vitrine.cli", *args]


class Server:
    def __init__(self, command: list[str], url: str, log: Path) -> None:
        self.url = url
        self.log = log
        self._log_fh = open(log, "wb")
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self._log_fh, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"vitrine serve exited with {self.process.returncode}; log: {self.log}\n{self.log.read_text()[-2000:]}")
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=2)
                if response.status_code == 200:
                    return response.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"vitrine serve not ready after {timeout_s}s; log: {self.log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log_fh.close()


# ---------------------------------------------------------------- load generation


@dataclass
class Phase:
    name: str
    clients: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0
    cache: dict[str, int] = field(default_factory=dict)
    stage_ms: dict[str, list[float]] = field(default_factory=dict)
    first_error: str | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds the phase cost: "server", "client" (this process)
    text_batch: float | None = None  # mean texts per text-encoder call in the phase (the server's histogram)

    def summary(self) -> dict[str, Any]:
        done = len(self.latencies_ms)
        stats = latency_stats([ms / 1000.0 for ms in self.latencies_ms] or [0.0])
        return {
            "phase": self.name, "clients": self.clients, "requests": done, "errors": self.errors,
            "p50_ms": round(stats.p50_ms, 3), "p90_ms": round(stats.p90_ms, 3), "p99_ms": round(stats.p99_ms, 3),
            "mean_ms": round(stats.mean_ms, 3), "max_ms": round(stats.max_ms, 3),
            "qps": round(done / self.wall_s, 1) if self.wall_s else 0.0, "wall_s": round(self.wall_s, 3),
            "cache": dict(self.cache),
            "server_stage_mean_ms": {k: round(float(np.mean(v)), 3) for k, v in self.stage_ms.items()},
            **self.http_share(stats.mean_ms),
            **({f"{who}_cpu_ms_per_request": round(1000.0 * sec / max(1, done), 3) for who, sec in self.cpu_s.items()}),
            **({"mean_text_batch": round(self.text_batch, 2)} if self.text_batch else {}),
            "first_error": self.first_error,
        }  # fmt: skip

    def http_share(self, client_mean_ms: float) -> dict[str, float]:
        """Where the client's mean latency went: the app (Server-Timing `app`: the request as the ASGI app
        saw it) and the rest, HTTP and JSON (uvicorn, sockets, the client's httpx and JSON parsing); inside the
        app, the stages the engine times plus serialisation, and the framework (routing, validation, threads)."""
        app = self.stage_ms.get("app")
        if not app or not client_mean_ms:
            return {}
        app_ms = float(np.mean(app))
        stages_ms = float(np.mean(self.stage_ms["total"])) + float(np.mean(self.stage_ms.get("serialise", [0.0])))
        return {"client_mean_ms": round(client_mean_ms, 3), "app_mean_ms": round(app_ms, 3),
                "http_json_ms": round(client_mean_ms - app_ms, 3), "http_json_share": round(1 - app_ms / client_mean_ms, 3),
                "framework_ms": round(app_ms - stages_ms, 3)}  # fmt: skip


def parse_server_timing(value: str | None) -> dict[str, float]:
    """`encode;dur=5.1, search;dur=0.8` -> {"encode": 5.1, "search": 0.8}."""
    out: dict[str, float] = {}
    for entry in (value or "").split(","):
        name, _, params = entry.strip().partition(";")
        if params.startswith("dur="):
            out[name] = float(params[4:])
    return out


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) a process has used so far; None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def run_phase(name: str, clients: int, make_request: Callable[[httpx.Client, int], httpx.Response],
              requests: int, seconds: float | None, base_url: str, server_pid: int | None = None) -> Phase:  # fmt: skip
    """`requests` calls of make_request(client, i) over `clients` threads (or until `seconds`)."""
    phase = Phase(name, clients)
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + seconds if seconds else None
    barrier = threading.Barrier(clients + 1)

    def worker() -> None:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            make_request(client, -1)  # connect before the clock starts
            barrier.wait()
            while True:
                with lock:
                    i = next(counter, None)
                if i is None or (deadline and time.monotonic() > deadline):
                    return
                start = time.perf_counter()
                try:
                    response = make_request(client, i)
                    ok = response.status_code == 200
                    body = response.json() if ok else None
                    error = None if ok else f"{response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, body, error = False, None, f"{type(exc).__name__}: {exc}"
                elapsed = (time.perf_counter() - start) * 1000.0
                with lock:
                    if ok:
                        phase.latencies_ms.append(elapsed)
                        tier = body.get("cache") or "n/a"
                        phase.cache[tier] = phase.cache.get(tier, 0) + 1
                        stages = parse_server_timing(response.headers.get("server-timing")) or body.get("timings_ms", {})
                        for stage, ms in stages.items():
                            phase.stage_ms.setdefault(stage, []).append(ms)
                    else:
                        phase.errors += 1
                        phase.first_error = phase.first_error or error

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    batches = text_batches(base_url)
    barrier.wait()
    start, client_cpu, server_cpu = time.perf_counter(), time.process_time(), process_cpu_s(server_pid) if server_pid else None
    for thread in threads:
        thread.join()
    phase.wall_s = time.perf_counter() - start
    # CPU per request does not depend on what else the shared machine runs, as wall time does.
    phase.cpu_s["client"] = time.process_time() - client_cpu
    if server_cpu is not None:
        phase.cpu_s["server"] = process_cpu_s(server_pid) - server_cpu
    after = text_batches(base_url)
    if batches and after and after[1] > batches[1]:
        phase.text_batch = (after[0] - batches[0]) / (after[1] - batches[1])
    return phase


def text_batches(base_url: str) -> tuple[float, float] | None:
    """(texts encoded, encoder calls) so far, from the server's vitrine_text_batch_size histogram."""
    try:
        lines = httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines()
    except httpx.HTTPError:
        return None
    values = {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith("vitrine_text_batch_size_")}
    if "vitrine_text_batch_size_count" not in values:
        return None
    return values["vitrine_text_batch_size_sum"], values["vitrine_text_batch_size_count"]


# ---------------------------------------------------------------- queries


def text_queries(index: Any, count: int, seed: int) -> list[str]:
    """Distinct product titles, shuffled (distinct: every one misses the query cache)."""
    titles = sorted({r.title for r in index.get_many(index.ids()) if r is not None})
    random.Random(seed).shuffle(titles)
    return titles[:count] if len(titles) >= count else [titles[i % len(titles)] for i in range(count)]


def image_queries(index: Any, count: int, seed: int, px: int) -> list[bytes]:
    """Catalog photos re-encoded as JPEGs of `px` on the longer side (what a shopper's phone uploads)."""
    ids = index.ids()
    random.Random(seed).shuffle(ids)
    out: list[bytes] = []
    for product_id in ids:
        if len(out) >= count:
            break
        try:
            image = index.open_image(product_id)
        except (OSError, ValueError, LookupError):
            continue
        scale = px / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    if not out:
        raise SystemExit("no product image of the index could be read")
    return out


# ---------------------------------------------------------------- naive pipeline


class NaivePipeline:
    """Max-length padding + one query at a time + numpy brute force over every product."""

    def __init__(self, index: Any, bundle: Path, checkpoint: Path | None, mode: str, k: int) -> None:
        from vitrine.runtime import load_bundle

        self.index = index
        self.k = k
        # The α the service uses for each query kind (the bundle's tuned α_T2P / α_I2P).
        self.alpha = {kind: index.alphas.for_kind(kind) for kind in ("text", "image")}
        self.ids = np.array(index.ids())
        self.title, self.image = index.vectors(list(self.ids))  # (n, D) float32 each
        self.bundle = load_bundle(bundle)
        self.mode = mode
        if mode == "torch":
            self._load_torch(checkpoint)
        self.description = (
            f"torch model from {checkpoint} (trainer), text padded to {self.max_length} tokens, numpy brute force"
            if mode == "torch"
            else f"the bundle's ONNX graphs (no checkpoint available), text padded to {self.bundle.text.tokenizer.max_length} tokens, numpy brute force"
        )

    def _load_torch(self, checkpoint: Path | None) -> None:
        import torch  # only the naive pipeline needs torch

        from trainer.bundle import load_checkpoint_model

        self.torch = torch
        model, preprocess, tokenizer, _ = load_checkpoint_model(checkpoint)
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.max_length = tokenizer.max_length

    def encode_text(self, text: str) -> np.ndarray:
        if self.mode == "torch":
            with self.torch.inference_mode():
                ids = self.tokenizer([text], padding="max_length")
                return self.model.encode_text(ids).float().numpy()[0]
        tok = self.bundle.text.tokenizer
        row = tok.encode_rows([text])[0]
        ids = np.full((1, tok.max_length), tok.pad_token_id, dtype=np.int64)
        ids[0, : len(row)] = row
        return self.bundle.text.encode_ids(ids)[0]

    def encode_image(self, data: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        if self.mode == "torch":
            with self.torch.inference_mode():
                return self.model.encode_image(self.preprocess(image).unsqueeze(0)).float().numpy()[0]
        return self.bundle.encode_images([image])[0]

    def search(self, query: np.ndarray, kind: str) -> list[str]:
        q = query.astype(np.float64)
        alpha = self.alpha[kind]
        score = fuse(self.title @ q, self.image @ q, alpha)
        order = np.lexsort((self.ids, -score))[: self.k]  # full sort, ties by id as the index does
        ids = [str(i) for i in self.ids[order]]
        self.index.get_many(ids)  # the records a response shows
        return ids


def run_naive(name: str, clients: int, fn: Callable[[int], Any], requests: int, seconds: float | None) -> Phase:
    phase = Phase(name, clients)
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + seconds if seconds else None

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None or (deadline and time.monotonic() > deadline):
                return
            start = time.perf_counter()
            fn(i)
            with lock:
                phase.latencies_ms.append((time.perf_counter() - start) * 1000.0)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start, cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    phase.wall_s = time.perf_counter() - start
    phase.cpu_s["naive"] = time.process_time() - cpu
    return phase


def compare_results(service_ids: list[list[str]], naive_ids: list[list[str]]) -> dict[str, float]:
    same = sum(a == b for a, b in zip(service_ids, naive_ids))
    overlap = [len(set(a) & set(b)) / max(1, len(a)) for a, b in zip(service_ids, naive_ids)]
    return {"queries": len(service_ids), "identical_rankings": round(same / max(1, len(service_ids)), 4),
            "mean_overlap_at_k": round(float(np.mean(overlap)) if overlap else 0.0, 4)}  # fmt: skip


# ---------------------------------------------------------------- report


def cpu_per_request(row: dict[str, Any]) -> float | str:
    """CPU ms per request: the server's and the load generator's, or the naive pipeline's."""
    parts = [row.get(f"{who}_cpu_ms_per_request") for who in ("server", "client", "naive")]
    return round(sum(p for p in parts if p is not None), 2) if any(p is not None for p in parts) else ""


def markdown(report: dict[str, Any]) -> str:
    env, checks = report["environment"], report["targets"]
    rows = [
        [r["phase"], r["clients"], r["requests"], r["errors"], r["p50_ms"], r["p90_ms"], r["p99_ms"], r["qps"],
         ", ".join(f"{k} {v}" for k, v in r["cache"].items()) + (f" (batch {r['mean_text_batch']})" if r.get("mean_text_batch") else ""),
         cpu_per_request(r),
         ", ".join(f"{k} {v:.2f}" for k, v in r["server_stage_mean_ms"].items() if k in ("encode", "search", "records", "total"))]
        for r in report["service"] + report["naive"]
    ]  # fmt: skip
    parts = [
        "# Search service load test\n",
        f"Index `{env['index']}`: {env['products']:,} products, {env['index_type']} Faiss, bundle {env['bundle_fingerprint']}; "
        f"{env['cpu_count']} CPUs (load average {env['load_average_1m']:.1f} at the start); "
        f"server VITRINE_THREADS={env['server_threads_env'] or 'unset (1)'}; k = {env['k']}; "
        f"{env['requests_per_phase']} requests per phase"
        + (f" (at most {env['seconds_per_phase']} s)" if env["seconds_per_phase"] else "")
        + f"; photos re-encoded at {env['image_px']} px.\n",
        "Load comes from threads in this process, on the same machine as the server (they share the CPUs). "
        "`text` queries are distinct titles (every one a cache miss), `text_cached` repeats them.\n",
        markdown_table(["phase", "clients", "requests", "errors", "p50 ms", "p90 ms", "p99 ms", "QPS", "cache",
                        "CPU ms/request", "server stages (mean ms)"], rows),  # fmt: skip
        "CPU ms/request: CPU time the phase cost (server process + this process's load generator; for the naive "
        "pipeline, this process) per request. Unlike wall time, it hardly depends on what else the shared machine runs.\n",
    ]
    shares = [r for r in report["service"] if r.get("app_mean_ms") is not None]
    if shares:
        parts.append("Where the client's mean latency went (ms): the server's stages (Server-Timing; encode includes "
                     "tokenise, search is scan + fill_in), serialisation, the framework around them, and HTTP + JSON "
                     "(client latency minus the app's own time: sockets, uvicorn, the client's httpx and JSON parsing).\n")  # fmt: skip
        order = ["decode", "tokenise", "encode", "scan", "fill_in", "search", "records", "rerank", "total", "serialise"]
        rows = [[r["phase"], r["clients"], r["client_mean_ms"]]
                + [r["server_stage_mean_ms"].get(stage, "") for stage in order]
                + [r["framework_ms"], r["app_mean_ms"], r["http_json_ms"], f"{r['http_json_share']:.0%}"] for r in shares]  # fmt: skip
        parts.append(markdown_table(["phase", "clients", "client mean", *order, "framework", "app", "HTTP+JSON", "HTTP+JSON share"], rows))
    naive = report["naive_pipeline"]
    parts.append(f"Naive pipeline: {naive['description']}.\n")
    for kind, cmp in naive.get("agreement", {}).items():
        parts.append(f"- {kind}: service vs naive top-{env['k']} over {cmp['queries']} queries: identical rankings "
                     f"{cmp['identical_rankings']:.1%}, mean overlap {cmp['mean_overlap_at_k']:.1%}")  # fmt: skip
    parts.append("")
    parts.append(markdown_table(["target", "wanted", "measured", "met"],
                                [[name, c["wanted"], c["measured"], c["met"]] for name, c in checks.items()]))  # fmt: skip
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, help="default: the bundle the index was built with")
    parser.add_argument("--checkpoint", type=Path, help="torch checkpoint for the naive pipeline (default: the bundle manifest's)")
    parser.add_argument("--naive", choices=["auto", "torch", "onnx", "off"], default="auto")
    parser.add_argument("--requests", type=int, default=400, help="requests per phase")
    parser.add_argument("--seconds", type=float, default=None, help="also stop a phase after this long")
    parser.add_argument("--naive-requests", type=int, default=None, help="queries per naive phase (default --requests / 2)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--image-px", type=int, default=512, help="longer side of the uploaded test photos")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args(argv)
    if args.requests < 1 or any(c < 1 for c in args.concurrency):
        parser.error("--requests and --concurrency must be positive")

    from indexer import ProductIndex

    args.out.mkdir(parents=True, exist_ok=True)
    machine = environment()  # before the load: its load average says how busy the machine already was
    index = ProductIndex.open(args.index)
    bundle = args.bundle or (Path(index.bundle_path) if index.bundle_path else None)
    if bundle is None:
        raise SystemExit("the index does not record its bundle: pass --bundle")
    phases = len(args.concurrency)
    n_text = args.requests * (phases + 1) + 64
    texts = text_queries(index, n_text, args.seed)
    photos = image_queries(index, min(256, args.requests), args.seed, args.image_px)
    print(f"{len(index):,} products; {len(set(texts)):,} distinct text queries, {len(photos)} photos of {args.image_px}px", flush=True)

    port = free_port()
    server = Server(serve_command(args.index, args.bundle, port), f"http://127.0.0.1:{port}", args.out / "search_load_server.log")
    service_rows: list[dict] = []
    service_ids: dict[str, list[list[str]]] = {"text": [], "image": []}
    try:
        ready = server.wait_ready()
        print(f"server ready: {ready}", flush=True)
        cursor = {"text": 0}

        def text_request(offset: int, record: str | None = None):
            def call(client: httpx.Client, i: int) -> httpx.Response:
                query = texts[(offset + max(i, 0)) % len(texts)] if i >= 0 else "warm up"
                response = client.post("/search/text", json={"query": query, "k": args.k, "timing": True})
                if record and i >= 0 and response.status_code == 200:
                    service_ids[record].append((offset + i, [r["id"] for r in response.json()["results"]]))
                return response

            return call

        def image_request(record: str | None = None):
            def call(client: httpx.Client, i: int) -> httpx.Response:
                data = photos[max(i, 0) % len(photos)]
                response = client.post("/search/image", files={"image": ("photo.jpg", data, "image/jpeg")}, data={"k": str(args.k), "timing": "true"})
                if record and i >= 0 and response.status_code == 200:
                    service_ids[record].append((i, [r["id"] for r in response.json()["results"]]))
                return response

            return call

        # Warm-up: sessions, allocators, page cache (a separate slice of queries).
        run_phase("warmup", 2, text_request(n_text - 64), 64, None, server.url)
        run_phase("warmup", 2, image_request(), 16, None, server.url)
        for clients in args.concurrency:
            offset = cursor["text"]
            cursor["text"] += args.requests
            record = "text" if clients == args.concurrency[0] else None
            phase = run_phase("text", clients, text_request(offset, record), args.requests, args.seconds, server.url, server.process.pid)
            service_rows.append(phase.summary())
            print(json.dumps(service_rows[-1]), flush=True)
        for clients in args.concurrency:  # the same queries again: cache hits
            phase = run_phase("text_cached", clients, text_request(0), args.requests, args.seconds, server.url, server.process.pid)
            service_rows.append(phase.summary())
            print(json.dumps(service_rows[-1]), flush=True)
        for clients in args.concurrency:
            record = "image" if clients == args.concurrency[0] else None
            phase = run_phase("image", clients, image_request(record), args.requests, args.seconds, server.url, server.process.pid)
            service_rows.append(phase.summary())
            print(json.dumps(service_rows[-1]), flush=True)
    finally:
        server.stop()

    # ------------------------------------------------ naive pipeline, same bundle, same queries
    naive_rows: list[dict] = []
    naive_info: dict[str, Any] = {"description": "not run (--naive off)"}
    if args.naive != "off":
        from vitrine.runtime import read_manifest

        manifest = read_manifest(bundle).model_dump()
        checkpoint = args.checkpoint or (Path(manifest["training"]["checkpoint"]) if isinstance(manifest.get("training"), dict)
                                         and manifest["training"].get("checkpoint") else None)  # fmt: skip
        mode = args.naive
        if mode == "auto":
            mode = "torch" if checkpoint is not None and checkpoint.is_file() and _has_torch() else "onnx"
        if mode == "torch" and (checkpoint is None or not checkpoint.is_file()):
            raise SystemExit(f"--naive torch needs the checkpoint (manifest says {checkpoint}); pass --checkpoint")
        naive = NaivePipeline(index, bundle, checkpoint, mode, args.k)
        naive_info = {"mode": mode, "description": naive.description, "checkpoint": str(checkpoint) if checkpoint else None}
        n_naive = args.naive_requests or max(1, args.requests // 2)
        naive_text_ids: dict[int, list[str]] = {}
        naive_image_ids: dict[int, list[str]] = {}

        def naive_text(i: int) -> None:
            naive_text_ids[i] = naive.search(naive.encode_text(texts[i % len(texts)]), "text")

        def naive_image(i: int) -> None:
            naive_image_ids[i] = naive.search(naive.encode_image(photos[i % len(photos)]), "image")

        run_naive("warmup", 1, naive_text, 8, None)
        for clients in args.concurrency:
            naive_rows.append(run_naive("naive_text", clients, naive_text, n_naive, args.seconds).summary())
            print(json.dumps(naive_rows[-1]), flush=True)
        for clients in args.concurrency:
            naive_rows.append(run_naive("naive_image", clients, naive_image, n_naive, args.seconds).summary())
            print(json.dumps(naive_rows[-1]), flush=True)
        # Agreement on the same queries (the first-concurrency service phases recorded their ids).
        agreement = {}
        for kind, store, encode in (("text", naive_text_ids, naive.encode_text), ("image", naive_image_ids, naive.encode_image)):
            pairs = sorted(service_ids[kind])[:200]
            source = texts if kind == "text" else photos
            naive_lists = [store.get(i) or naive.search(encode(source[i % len(source)]), kind) for i, _ in pairs]
            agreement[kind] = compare_results([ids for _, ids in pairs], naive_lists)
        naive_info["agreement"] = agreement

    def row(phase: str, clients: int, rows: list[dict]) -> dict | None:
        return next((r for r in rows if r["phase"] == phase and r["clients"] == clients), None)

    most = max(args.concurrency)
    text1, text8 = row("text", min(args.concurrency), service_rows), row("text", most, service_rows)
    image1 = row("image", min(args.concurrency), service_rows)
    best_naive = max((r["qps"] for r in naive_rows if r["phase"] == "naive_text"), default=None)
    checks = {
        "text p50 (1 client, cache misses)": {"wanted": f"<= {TARGETS['text_p50_ms']} ms", "measured": text1["p50_ms"], "met": text1["p50_ms"] <= TARGETS["text_p50_ms"]},
        f"text QPS at {most} clients": {"wanted": f">= {TARGETS['text_qps_8']}", "measured": text8["qps"], "met": text8["qps"] >= TARGETS["text_qps_8"]},
        "image p50 (1 client)": {"wanted": f"<= {TARGETS['image_p50_ms']} ms", "measured": image1["p50_ms"], "met": image1["p50_ms"] <= TARGETS["image_p50_ms"]},
    }  # fmt: skip
    naive_cpu = [cpu_per_request(r) for r in naive_rows if r["phase"] == "naive_text" and cpu_per_request(r) != ""]
    if naive_cpu and cpu_per_request(text8) != "":
        checks["text CPU per query, naive / service (informational)"] = {
            "wanted": "", "measured": round(min(naive_cpu) / cpu_per_request(text8), 2), "met": ""}  # fmt: skip
    if best_naive:
        speedup = round(text8["qps"] / best_naive, 2)
        checks["text throughput vs naive (best naive concurrency)"] = {"wanted": f">= {TARGETS['speedup_vs_naive']}x", "measured": speedup, "met": speedup >= TARGETS["speedup_vs_naive"]}  # fmt: skip
    report = {
        "environment": {
            "index": str(args.index), "version": index.version, "products": len(index), "index_type": index.index_type,
            "bundle": str(bundle), "bundle_fingerprint": index.bundle_fingerprint, **machine, "k": args.k,
            "requests_per_phase": args.requests, "seconds_per_phase": args.seconds, "image_px": args.image_px,
            "server_threads_env": os.environ.get("VITRINE_THREADS"),
            "server": ready,
        },  # fmt: skip
        "service": service_rows,
        "naive": naive_rows,
        "naive_pipeline": naive_info,
        "targets": checks,
        "errors": sum(r["errors"] for r in service_rows),
    }
    write_json(args.out / "search_load.json", report)
    (args.out / "search_load.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 1 if report["errors"] else 0


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


if __name__ == "__main__":
    sys.exit(main())
