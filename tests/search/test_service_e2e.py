"""End to end: a real tiny ONNX bundle, a real ProductIndex built with it, real uvicorn on 127.0.0.1, httpx."""
from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from indexer import ProductIndex
from search.service import Settings, create_app
from search.service.cli import register
from tests.support.indexes import IndexFixture, build_fixture_index
from tests.support.redis_server import free_port
from tests.support.service import LiveServer, build_bundle_index, jpeg_bytes, wait_ready
from vitrine.errors import UserError
from vitrine.runtime import load_bundle

pytestmark = pytest.mark.torch  # needs the train extra

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Path:
    return tiny_bundle


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, bundle) -> IndexFixture:
    return build_bundle_index(tmp_path_factory.mktemp("e2e"), bundle, n=24)


@pytest.fixture(scope="module")
def server(built: IndexFixture):
    # No injection: the app opens the index and the bundle its manifest records, as `vitrine serve` does.
    settings = Settings(index=built.index_dir, max_body_bytes=1 << 20, max_image_bytes=512 << 10)
    with LiveServer(create_app(settings)) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_text_search_matches_the_bundle_and_index_directly(http, built, bundle):
    encoder = load_bundle(bundle)
    with ProductIndex.open(built.index_dir) as index:
        for query in ["red tshirts", "women blue casual shoes", "black handbag"]:
            body = http.post("/search/text", json={"query": query, "k": 5}).json()
            expected = index.search(encoder.encode_texts([query])[0], k=5)
            assert [r["id"] for r in body["results"]] == [h.id for h in expected]
            assert [r["score"] for r in body["results"]] == pytest.approx([h.score for h in expected], abs=1e-5)
            assert body["alpha"] == pytest.approx(index.alphas.for_kind("text"))


def test_image_upload_search_matches_the_bundle_and_index_directly(http, built, bundle):
    photo = jpeg_bytes((40, 90, 200))
    body = http.post("/search/image", files={"image": ("shot.jpg", photo, "image/jpeg")}, data={"k": "6"}).json()
    encoder = load_bundle(bundle)
    with ProductIndex.open(built.index_dir) as index:
        expected = index.search(encoder.encode_images([Image.open(io.BytesIO(photo)).convert("RGB")])[0], k=6)
    assert [r["id"] for r in body["results"]] == [h.id for h in expected]
    assert set(body["results"][0]["parts"]) == {"i2t", "i2i"}


def test_thumbnails_page_and_probes(http):
    result = http.post("/search/text", json={"query": "green", "k": 1}).json()["results"][0]
    thumb = http.get(result["image_url"])
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).format == "JPEG"
    assert "result" in http.get("/").text.lower()
    assert http.get("/healthz").json() == {"status": "ok"} and http.get("/readyz").json()["status"] == "ready"
    assert "vitrine_stage_seconds_bucket" in http.get("/metrics").text


def test_streamed_body_over_the_limit_is_a_413(http):
    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(40):
            yield b"x" * 65536

    response = http.post("/search/image", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    declared = http.post("/search/text", content=b"{" + b" " * (2 << 20) + b"}", headers={"content-type": "application/json"})
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "payload_too_large"
    assert http.get("/healthz").status_code == 200  # the server is fine afterwards


def _parse_serve(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vitrine")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


def test_vitrine_serve_runs_uvicorn_on_loopback(built):
    port = free_port()
    code = (
        "import sys, argparse; from search.service.cli import register; "
        "p = argparse.ArgumentParser(); register(p.add_subparsers(dest='command', required=True)); "
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    process = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--index", str(built.index_dir), "--port", str(port)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        ready = wait_ready(f"http://127.0.0.1:{port}", timeout_s=60)
        assert ready["index"]["products"] == 24
        response = httpx.post(f"http://127.0.0.1:{port}/search/text", json={"query": "red", "k": 2}, timeout=10)
        assert response.status_code == 200 and len(response.json()["results"]) == 2
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0].decode(errors="replace")
    # uvicorn shuts down gracefully, then re-raises SIGTERM (exit -15).
    assert process.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in output, output
    assert f"127.0.0.1:{port}" in output  # the default host is loopback


def test_serve_defaults_and_clear_errors(tmp_path, built, bundle):
    args = _parse_serve("--index", str(tmp_path / "missing"))
    assert args.host is None and args.port is None  # Settings supply 127.0.0.1:8000
    assert (Settings().host, Settings().port) == ("127.0.0.1", 8000)
    with pytest.raises(UserError, match="not found"):
        args.func(args)
    # An index built by another model: serving it with this bundle would embed queries in the wrong space.
    other = build_fixture_index(tmp_path / "other", n=4)
    args = _parse_serve("--index", str(other.index_dir), "--bundle", str(bundle))
    with pytest.raises(UserError, match="not the one"):
        args.func(args)
    with pytest.raises(UserError, match="does not record its bundle"):
        args = _parse_serve("--index", str(other.index_dir))
        args.func(args)


def test_an_int8_copy_of_the_bundle_serves_the_index_the_float_one_built(tmp_path, built, bundle):
    from vitrine.runtime.quantize import quantize_bundle

    int8 = tmp_path / "int8"
    quantize_bundle(bundle, int8, min_cosine=0.5)
    encoder = load_bundle(int8)
    assert encoder.fingerprint != load_bundle(bundle).fingerprint and encoder.embeds_like == load_bundle(bundle).fingerprint
    settings = Settings(index=built.index_dir, bundle=int8)
    with LiveServer(create_app(settings)) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        body = client.post("/search/text", json={"query": "women blue casual shoes", "k": 5}).json()
        health = client.get("/readyz").json()
    with ProductIndex.open(built.index_dir) as index:
        expected = index.search(encoder.encode_texts(["women blue casual shoes"])[0], k=5)
    assert [r["id"] for r in body["results"]] == [h.id for h in expected]
    # Query embeddings are cached under the model that computed them, not the index's.
    assert health["index"]["bundle_fingerprint"] == encoder.fingerprint
