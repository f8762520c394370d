"""Helpers for the service tests: images to upload, a live uvicorn server, a tiny real bundle + index.

    server = LiveServer(create_app(settings)).start()   # real uvicorn on 127.0.0.1:<free port>
    server.url                                          # http://127.0.0.1:<port>
    server.stop()
"""
from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from PIL import Image

from tests.support.indexes import IndexFixture, build_fixture_index
from tests.support.redis_server import free_port


def jpeg_bytes(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (48, 64), quality: int = 90) -> bytes:
    """A product-like photo: a coloured block on a studio-white background."""
    image = Image.new("RGB", size, (250, 250, 250))
    w, h = size
    image.paste(colour, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def noisy_jpeg(size: tuple[int, int] = (96, 96), seed: int = 0) -> bytes:
    """Random pixels compress badly, so truncating the file cuts into pixel data."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


def png_bytes(size: tuple[int, int], colour: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    """A flat-colour PNG: tiny on disk however many pixels it declares (decompression-bomb shape)."""
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG", optimize=True)
    return out.getvalue()


def build_bundle_index(root: Path, bundle: Path, n: int = 24) -> IndexFixture:
    """A real ProductIndex of fixture products embedded by the real bundle (whose path the manifest records)."""
    from vitrine.runtime import load_bundle

    return build_fixture_index(root, n=n, index_type="flat", encoder=load_bundle(bundle))


def export_tiny_reranker_bundle(out: Path, bundle: Path, *, model: str = "tiny-aligned", prior_weight: float = 0.01,
                                default_top_n: int = 6, seed: int = 0) -> Path:
    """A copy of `bundle` (the tiny one) with an untrained, seeded cross-encoder `model` ("tiny" or
    "tiny-aligned"), whose rerank scores add `prior_weight` x the first-stage score; needs torch."""
    import torch

    from trainer.cross_encoder.export import export_reranker_copy
    from trainer.cross_encoder.factory import create_cross_encoder, save_cross_encoder

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cross, _ = create_cross_encoder(model, pretrained=False)
    with torch.no_grad():
        cross.prior_weight.fill_(prior_weight)
        if cross.similarity_head is not None:
            # An aligned model's logit starts as 10 x each first-stage cosine, and its untrained [CLS] head
            # varies little between candidates: shrink the first and widen the second so the scores, and
            # with them the tests' reordering, come from the encoder itself.
            cross.similarity_head.weight.fill_(prior_weight)
            cross.match_head[-1].weight.mul_(100.0)
    export_reranker_copy(save_cross_encoder(cross, out / "ce.pt"), bundle, out / "with-reranker", default_top_n=default_top_n)
    return out / "with-reranker"


class LiveServer:
    """A real uvicorn server in a thread, on a free loopback port; `options` go to uvicorn.Config
    (e.g. `**search.service.connections.server_options(settings)`, as `vitrine serve` runs it)."""

    def __init__(self, app, port: int | None = None, **options: Any) -> None:
        self.port = port or free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on", access_log=False, **options)
        )
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during start-up (see the log above)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn did not start within {timeout_s}s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=15)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_ready(url: str, timeout_s: float = 60.0) -> dict:
    """Poll /readyz until it answers 200; its JSON."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/readyz", timeout=2.0)
            if response.status_code == 200:
                return response.json()
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout_s}s: {last}")
