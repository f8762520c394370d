"""Hostile clients against a real uvicorn server run as `vitrine serve` runs it (issue 14, part 1):
stalled bodies and heads, oversized heads, keep-alive after a refused request, thin images that
would blow up in the resize, the headers and docs the web page is served with, and the lease
that keeps the served index version from being pruned.

Raw-socket cases are a table, like the bad-input table of test_service_api.py: what is sent,
and the status that must come back (or a plain close) within the server's timeouts.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import resource
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from indexer import ProductIndex
from indexer.build import build_index
from indexer.layout import IndexLayout
from search.service import Settings, create_app
from search.service.auth import key_digest
from search.service.connections import server_options
from search.service.headers import PAGE_CSP
from tests.support.indexes import FixtureEncoder, IndexFixture, build_fixture_index, make_index_catalog
from tests.support.service import LiveServer, png_bytes
from vitrine.catalog import read_catalog
from vitrine.runtime.preprocess import PreprocessSettings, preprocess_images

TIMEOUTS = dict(request_head_timeout_s=1.0, body_idle_timeout_s=1.0, body_timeout_s=2.0, keep_alive_timeout_s=1,
                max_request_head_bytes=4096)  # fmt: skip
GRACE_S = 2.0  # scheduling slack on a loaded 2-core machine


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> IndexFixture:
    return build_fixture_index(tmp_path_factory.mktemp("service-hardening"), n=16)


@pytest.fixture(scope="module")
def index(fixture: IndexFixture) -> ProductIndex:
    with ProductIndex.open(fixture.index_dir) as opened:
        yield opened


WRITE_KEY = "hardening-write-key-0123456789"


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(**TIMEOUTS, write_keys={"hardening": key_digest(WRITE_KEY)})


@pytest.fixture(scope="module")
def server(index: ProductIndex, fixture: IndexFixture, settings: Settings):
    app = create_app(settings, index=index, encoder=fixture.encoder)
    with LiveServer(app, **server_options(settings)) as live:
        yield live


# ---------------------------------------------------------------- raw sockets


@dataclass
class Exchange:
    status: int | None  # None: the server sent nothing
    body: bytes
    seconds: float  # until the server closed the connection
    closed: bool


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body, from a blocking socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def exchange(port: int, data: bytes, wait_s: float) -> Exchange:
    """Send `data`, then read until the server closes the connection (or `wait_s` passes)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        if data:
            sock.sendall(data)
        received, closed = b"", False
        try:
            while not closed:
                chunk = sock.recv(65536)
                received += chunk
                closed = not chunk
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            pass  # still open after wait_s
        seconds = time.monotonic() - started
    if not received:
        return Exchange(None, b"", seconds, closed)
    head, _, body = received.partition(b"\r\n\r\n")
    return Exchange(int(head.split()[1]), body, seconds, closed)


def post_head(path: str, content_type: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()  # fmt: skip


def put_head(path: str, content_type: str, length: int, key: str, method: str = "PUT") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Length: {length}\r\n\r\n").encode()  # fmt: skip


MULTIPART = "multipart/form-data; boundary=xyz"
# (name, bytes sent, expected status or None for a plain close, code, seconds the server may take)
SLOW_CLIENTS = [
    ("text body stalls (declares 100 bytes, sends 8)", post_head("/search/text", "application/json", 100) + b'{"query"',
     408, "request_timeout", TIMEOUTS["body_idle_timeout_s"]),
    ("image JSON body stalls", post_head("/search/image", "application/json", 100) + b'{"image_',
     408, "request_timeout", TIMEOUTS["body_idle_timeout_s"]),
    ("multipart body stalls", post_head("/search/image", MULTIPART, 100) + b"--xyz\r\nC",
     408, "request_timeout", TIMEOUTS["body_idle_timeout_s"]),
    ("headers stall halfway", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Wait: ",
     408, "request_timeout", TIMEOUTS["request_head_timeout_s"]),
    ("write body stalls (keyed PUT declares 100 bytes, sends 9)",
     put_head("/products/new1", "application/json", 100, WRITE_KEY) + b'{"title":',
     408, "request_timeout", TIMEOUTS["body_idle_timeout_s"]),
    ("batch body stalls", put_head("/products:batch", "application/json", 100, WRITE_KEY, method="POST") + b'{"delete"',
     408, "request_timeout", TIMEOUTS["body_idle_timeout_s"]),
    ("connects and sends nothing", b"", None, None, TIMEOUTS["request_head_timeout_s"]),
    ("headers over the size limit", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 8000,
     431, "request_head_too_large", 0.0),
    # A head that arrives whole in one read is parsed within it: it must be measured all the same.
    ("query string over the size limit, whole", b"GET /healthz?q=" + b"a" * 8000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
     431, "request_head_too_large", 0.0),
    ("header over the size limit, whole, with its body",
     post_head("/search/text", "application/json", 16).replace(b"\r\n\r\n", b"\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
     + b'{"query": "red"}', 431, "request_head_too_large", 0.0),
    ("many small headers over the size limit", b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 1000 + b"\r\n",
     431, "request_head_too_large", 0.0),
    ("URL over 64 KiB, the parser's own limit", b"GET /" + b"a" * 73_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
     431, "request_head_too_large", 0.0),
    ("5 MB header", b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 5_000_000 + b"\r\n\r\n",
     431, "request_head_too_large", 0.0),
    ("not HTTP", b"HELLO THERE\r\n\r\n", 400, "invalid_http_request", 0.0),
]  # fmt: skip


@pytest.mark.parametrize(("name", "sent", "status", "code", "within_s"), SLOW_CLIENTS, ids=[c[0] for c in SLOW_CLIENTS])
def test_slow_and_oversized_clients_are_answered_and_closed(server, name, sent, status, code, within_s):
    result = exchange(server.port, sent, wait_s=within_s + 3 * GRACE_S)
    assert result.closed, f"{name}: connection still open after {result.seconds:.1f} s"
    assert result.seconds < within_s + GRACE_S, result.seconds
    assert result.status == status, result
    if code is not None:
        assert json.loads(result.body)["error"]["code"] == code


def raw_head(size: int, where: str) -> bytes:
    """A GET of /healthz whose head (request line, headers, blank line) is exactly `size` bytes,
    the padding in the query string or in one header."""
    if where == "query":
        head = b"GET /healthz?q= HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        return head.replace(b"?q=", b"?q=" + b"a" * (size - len(head)))
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: \r\n\r\n"
    return head.replace(b"X-Pad: ", b"X-Pad: " + b"a" * (size - len(head)))


@pytest.mark.parametrize("where", ["query", "header"])
def test_the_head_limit_is_the_same_for_every_size_over_it(server, where):
    """At the limit: served. One byte over it, and anything larger, whole or streamed: the same 431
    JSON, never the parser's plain 400 nor a 200 (the fuzzing found both at 40 and 73 KB)."""
    limit = TIMEOUTS["max_request_head_bytes"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw_head(limit, where))
        assert read_response(sock)[0] == 200
        sock.sendall(raw_head(limit, where))  # keep-alive: the next head is measured afresh
        assert read_response(sock)[0] == 200
    for size in (limit + 1, 2 * limit, 40_000, 65_536, 73_000, 300_000):
        result = exchange(server.port, raw_head(size, where), wait_s=3 * GRACE_S)
        assert result.status == 431 and result.closed, (size, result)
        assert json.loads(result.body)["error"] == {
            "code": "request_head_too_large", "message": f"request line and headers exceed {limit} bytes"}


def test_the_default_head_limit_refuses_the_fuzzed_heads(index, fixture):
    """The two heads the fuzzing found, against the default 32 KiB limit."""
    settings = Settings()
    app = create_app(settings, index=index, encoder=fixture.encoder)
    with LiveServer(app, **server_options(settings)) as live:
        assert httpx.get(f"{live.url}/healthz", params={"q": "a" * 30_000}, timeout=10).status_code == 200
        for size in (40_000, 73_000):
            result = exchange(live.port, raw_head(size, "query"), wait_s=3 * GRACE_S)
            assert result.status == 431, (size, result)
            assert json.loads(result.body)["error"]["code"] == "request_head_too_large"


def test_a_url_the_parser_cannot_split_is_414_when_the_head_limit_allows_it(index, fixture):
    settings = Settings(max_request_head_bytes=256 * 1024)
    app = create_app(settings, index=index, encoder=fixture.encoder)
    with LiveServer(app, **server_options(settings)) as live:
        assert exchange(live.port, raw_head(60_000, "query"), wait_s=GRACE_S).status == 200
        result = exchange(live.port, raw_head(70_000, "query"), wait_s=3 * GRACE_S)
        assert result.status == 414 and json.loads(result.body)["error"]["code"] == "uri_too_long"
        assert exchange(live.port, raw_head(200_000, "header"), wait_s=3 * GRACE_S).status == 200


def test_a_body_that_trickles_in_is_cut_off_at_the_total_deadline(server):
    """One byte every 0.5 s never trips the idle timeout (1 s), but the whole body must come within 2 s."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(post_head("/search/text", "application/json", 100))
        try:
            for _ in range(20):
                sock.sendall(b" ")
                time.sleep(0.5)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _, body = read_response(sock)
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < TIMEOUTS["body_timeout_s"] + GRACE_S + 0.5


def test_idle_keep_alive_connections_are_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(sock)[0] == 200
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server
        assert time.monotonic() - started < TIMEOUTS["keep_alive_timeout_s"] + GRACE_S


@pytest.mark.parametrize("body", [
    {"query": "\ud800 shoes"},
    {"query": "red", "filters": {"\ud800": "x"}},
    {"query": "red", "filters": {"gender": ["Women", "\udfff"]}},
])  # fmt: skip
def test_lone_surrogates_get_a_4xx_and_keep_alive_survives(server, body):
    payload = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as the escape \ud800
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(post_head("/search/text", "application/json", len(payload)) + payload)
        status, headers, error = read_response(sock)
        assert status == 422 and json.loads(error)["error"]["code"] == "validation_error"
        assert headers.get("connection", "").lower() != "close"
        sock.sendall(post_head("/search/text", "application/json", 16) + b'{"query": "red"}')
        status, _, answer = read_response(sock)  # the same connection serves the next request
        assert status == 200 and json.loads(answer)["results"]


def test_connections_beyond_the_limit_get_503(index, fixture):
    settings = Settings(**{**TIMEOUTS, "max_connections": 3, "request_head_timeout_s": 30.0})
    app = create_app(settings, index=index, encoder=fixture.encoder)
    with LiveServer(app, **server_options(settings)) as live:
        idle = [socket.create_connection(("127.0.0.1", live.port), timeout=10) for _ in range(3)]
        try:
            time.sleep(0.2)
            assert httpx.get(f"{live.url}/healthz", timeout=10).status_code == 503
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.2)
        assert httpx.get(f"{live.url}/healthz", timeout=10).status_code == 200


# ---------------------------------------------------------------- thin images


class PixelEncoder(FixtureEncoder):
    """FixtureEncoder that first preprocesses as a bundle does (short side to 224 px)."""

    preprocess = PreprocessSettings(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def encode_images(self, images):
        preprocess_images(images, self.preprocess)
        return super().encode_images(images)


@pytest.mark.parametrize("size", [(1, 10_000), (10_000, 1), (1, 100_000), (100_000, 1)])
def test_thin_images_are_refused_before_the_resize_quickly_and_without_memory(index, fixture, size):
    app = create_app(Settings(), index=index, encoder=PixelEncoder())
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with TestClient(app, raise_server_exceptions=False) as client:
        started = time.perf_counter()
        response = client.post("/search/image", files={"image": ("thin.png", png_bytes(size), "image/png")})
        took = time.perf_counter() - started
    assert response.status_code == 422 and response.json()["error"]["code"] == "image_aspect_ratio", response.text
    assert took < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200 * 1024  # < 200 MB more, not GBs


def test_the_resize_bound_holds_even_when_the_aspect_limit_is_lifted(index, fixture):
    """The preprocessing refuses on its own (a UserError the engine answers with 422), whatever the settings."""
    app = create_app(Settings(max_image_aspect_ratio=1e6), index=index, encoder=PixelEncoder())
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/search/image", files={"image": ("thin.png", png_bytes((1, 10_000)), "image/png")})
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_image", response.text
        assert "elongated" in response.json()["error"]["message"]
        ok = client.post("/search/image", files={"image": ("ok.png", png_bytes((30, 600)), "image/png")})
        assert ok.status_code == 200  # 20:1 resizes to 224 x 4480: allowed


# ---------------------------------------------------------------- headers and docs


def test_security_headers_on_the_page_static_files_api_and_errors(server):
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for response in (http.get("/"), http.get("/static/app.js"), http.get("/filters"), http.get("/nope"),
                         http.post("/search/text", json={"query": ""})):  # fmt: skip
            assert response.headers["x-content-type-options"] == "nosniff", response.url
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["content-security-policy"] == PAGE_CSP
            assert "frame-ancestors 'none'" in PAGE_CSP and "script-src 'self'" in PAGE_CSP


def test_docs_are_served_locally_under_a_strict_policy(server):
    with httpx.Client(base_url=server.url, timeout=10) as http:
        page = http.get("/docs")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "cdn" not in page.text.lower() and "https://" not in page.text
        policy = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "'unsafe-inline'" not in policy.split("script-src")[1].split(";")[0]
        for script in re.findall(r"<script>(.*?)</script>", page.text, re.DOTALL):
            digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
            assert f"'sha256-{digest}'" in policy
        assets = re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', page.text)
        assert {a.rsplit("/", 1)[1] for a in assets} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
        for asset in assets:
            response = http.get(asset)
            assert response.status_code == 200 and len(response.content) > 500, asset
            assert response.headers["x-content-type-options"] == "nosniff"


def test_openapi_states_what_the_server_enforces(index, fixture):
    app = create_app(Settings(max_k=30, max_query_chars=80), index=index, encoder=fixture.encoder)
    with TestClient(app) as client:
        schema = client.get("/openapi.json").json()
    text = schema["components"]["schemas"]["TextSearchRequest"]["properties"]
    assert (text["query"]["minLength"], text["query"]["maxLength"]) == (1, 80) and text["query"]["pattern"]
    assert {"type": "integer", "minimum": 1, "maximum": 30}.items() <= text["k"]["anyOf"][0].items()
    assert {"type": "boolean"} in text["rerank"]["anyOf"] and text["timing"]["type"] == "boolean"
    assert text["filters"]["anyOf"][0]["propertyNames"] == {"minLength": 1, "maxLength": 200}
    image = schema["paths"]["/search/image"]["post"]["requestBody"]["content"]
    base64_field = image["application/json"]["schema"]["properties"]["image_base64"]
    assert base64_field["minLength"] == 1 and base64_field["contentEncoding"] == "base64"
    assert re.fullmatch(base64_field["pattern"][1:-1], "data:image/png;base64,iVBO\nRw0K==")
    assert not re.fullmatch(base64_field["pattern"][1:-1], "   ") and not re.fullmatch(base64_field["pattern"][1:-1], "data:image/png;base64,")
    form = image["multipart/form-data"]
    assert form["schema"]["additionalProperties"] is False and form["schema"]["maxProperties"] == 9  # the photo and 8 text fields
    assert form["schema"]["properties"]["k"]["maximum"] == 30 and "rerank_top_n" in form["schema"]["properties"]
    assert text["facets"]["anyOf"][0]["maxItems"] == 16 and "facets" in form["schema"]["properties"]
    similar = {p["name"]: p["schema"] for p in schema["paths"]["/products/{product_id}/similar"]["get"]["parameters"]}
    assert {"type": "integer", "minimum": 1, "maximum": 30}.items() <= similar["k"]["anyOf"][0].items()
    assert form["encoding"]["image"]["contentType"].startswith("image/jpeg, image/png, image/webp")


def test_openapi_states_the_write_endpoints_keys_and_limits(index, fixture):
    app = create_app(Settings(write_max_rows=7), index=index, encoder=fixture.encoder)
    with TestClient(app) as client:
        schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["ApiKey"]["description"]}
    put = schema["paths"]["/products/{product_id}"]["put"]
    delete = schema["paths"]["/products/{product_id}"]["delete"]
    batch = schema["paths"]["/products:batch"]["post"]
    for operation in (put, delete, batch):
        assert operation["security"] == [{"ApiKey": []}]
        assert {"200", "401", "403", "413", "422", "429", "503"} <= set(operation["responses"])
    assert "404" in delete["responses"] and "security" not in schema["paths"]["/products/{product_id}"]["get"]
    product_id = next(p for p in put["parameters"] if p["name"] == "product_id")["schema"]
    assert product_id["pattern"] == "^[A-Za-z0-9][A-Za-z0-9._:-]*$" and product_id["maxLength"] == 128
    body = put["requestBody"]["content"]
    assert body["application/json"]["schema"]["required"] == ["title", "image_base64"]
    assert body["application/json"]["schema"]["additionalProperties"] is False
    assert body["multipart/form-data"]["schema"]["required"] == ["title", "image"]
    rows = batch["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert rows["upsert"]["maxItems"] == rows["delete"]["maxItems"] == 7 and rows["delete"]["uniqueItems"] is True
    assert "$ref" not in json.dumps(batch["requestBody"])  # inlined: resolvable inside the document


# ---------------------------------------------------------------- index versions


def build(catalog: Path, out: Path, keep_versions: int = 1) -> Path:
    return build_index(read_catalog(catalog), FixtureEncoder(), out, keep_versions=keep_versions, threads=1).version_dir


def test_the_service_leases_the_version_it_serves(tmp_path):
    catalog = make_index_catalog(tmp_path / "catalog", 12)
    out = tmp_path / "index"
    served = build(catalog, out)
    # The app opens the index itself; it does not follow CURRENT here (test_service_live.py: the lease moves).
    app = create_app(Settings(index=out, index_poll_s=0), encoder=FixtureEncoder())
    with TestClient(app) as client:
        assert client.get("/readyz").json()["index"]["version"] == served.name
        build(catalog, out, keep_versions=1)
        newest = build(catalog, out, keep_versions=1)
        assert served.exists() and IndexLayout(out).current() == newest
        response = client.post("/search/text", json={"query": "red tshirts", "k": 3})
        assert response.status_code == 200 and len(response.json()["results"]) == 3
        assert client.get(f"/products/{response.json()['results'][0]['id']}").status_code == 200
    # shut down: the lease is released and the next prune deletes the version
    build(catalog, out, keep_versions=1)
    assert not served.exists()
