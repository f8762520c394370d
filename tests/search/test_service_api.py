"""The HTTP API in-process (TestClient) over a real ProductIndex built with the fixture encoder."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import random

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer import ProductIndex
from indexer.layout import IndexLayout
from search.service import Settings, create_app
from search.service.deps import get_settings
from search.service.errors import ApiError
from search.service.images import decode_upload
from tests.support.indexes import FIXTURE_ALPHA, IndexFixture, build_fixture_index
from tests.support.service import jpeg_bytes, noisy_jpeg, png_bytes

RED = (200, 30, 30)
BLUE = (40, 90, 200)
LIMITS = dict(max_k=20, default_k=10, max_query_chars=64, max_image_bytes=64 * 1024, max_body_bytes=256 * 1024,
              max_image_pixels=1_000_000)  # fmt: skip
WRITE_KEY = "api-test-write-key-0123456789"
WRITE_DIGEST = "sha256:" + hashlib.sha256(WRITE_KEY.encode()).hexdigest()


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> IndexFixture:
    return build_fixture_index(tmp_path_factory.mktemp("service-api"), n=32)


@pytest.fixture(scope="module")
def index(fixture: IndexFixture) -> ProductIndex:
    with ProductIndex.open(fixture.index_dir) as opened:
        yield opened


@pytest.fixture(scope="module")
def client(index: ProductIndex, fixture: IndexFixture) -> TestClient:
    # Writes are on (with a key), so the bad-input table reaches their validation; the table never writes.
    app = create_app(Settings(**LIMITS, write_keys={"api-test": WRITE_DIGEST}, write_max_rows=10), index=index, encoder=fixture.encoder)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def metric_lines(client: TestClient, prefix: str) -> list[str]:
    return [line for line in client.get("/metrics").text.splitlines() if line.startswith(prefix)]


# ---------------------------------------------------------------- search


def test_text_search_scores_are_the_fused_formula_from_the_index(client, index, fixture):
    body = client.post("/search/text", json={"query": "red tshirts", "k": 5}).json()
    assert body["k"] == 5 and body["alpha"] == pytest.approx(FIXTURE_ALPHA) and body["took_ms"] > 0
    expected = index.search(fixture.encoder.encode_texts(["red tshirts"])[0], k=5)
    assert [r["id"] for r in body["results"]] == [h.id for h in expected]
    for result in body["results"]:
        t2t, t2i = result["parts"]["t2t"], result["parts"]["t2i"]
        assert set(result["parts"]) == {"t2t", "t2i"}
        assert result["score"] == pytest.approx(FIXTURE_ALPHA * t2t + (1 - FIXTURE_ALPHA) * t2i, abs=1e-6)
        assert result["image_url"] == f"/products/{result['id']}/image"
        record = index.get(result["id"])
        assert (result["title"], result["category"], result["attributes"]) == (record.title, record.category, record.attributes)
    assert "red" in body["results"][0]["title"].lower()
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_alpha_override_and_default_k(client):
    body = client.post("/search/text", json={"query": "blue jeans", "alpha": 1.0}).json()
    assert body["alpha"] == 1.0 and len(body["results"]) == LIMITS["default_k"]
    for result in body["results"]:
        assert result["score"] == pytest.approx(result["parts"]["t2t"], abs=1e-6)


def test_filters_restrict_results_case_insensitively(client):
    body = client.post("/search/text", json={"query": "shoes", "k": 20, "filters": {"gender": "women", "baseColour": ["RED", "blue"]}}).json()
    assert body["results"]
    for result in body["results"]:
        assert result["attributes"]["gender"] == "Women" and result["attributes"]["baseColour"] in ("Red", "Blue")


def test_query_cache_normalises_whitespace(client):
    first = client.post("/search/text", json={"query": "green   handbags pz", "k": 3}).json()
    second = client.post("/search/text", json={"query": "  green handbags pz ", "k": 3}).json()
    assert first["cache"] == "miss" and second["cache"] == "local"
    assert [r["id"] for r in first["results"]] == [r["id"] for r in second["results"]]


def test_image_search_multipart_and_base64_agree(client, index, fixture):
    photo = jpeg_bytes(RED)
    upload = client.post("/search/image", files={"image": ("shot.jpg", photo, "image/jpeg")}, data={"k": "4"})
    assert upload.status_code == 200, upload.text
    by_json = client.post("/search/image", json={"image_base64": base64.b64encode(photo).decode(), "k": 4})
    data_url = client.post("/search/image", json={"image_base64": "data:image/jpeg;base64," + base64.b64encode(photo).decode(), "k": 4})
    ids = [r["id"] for r in upload.json()["results"]]
    assert ids == [r["id"] for r in by_json.json()["results"]] == [r["id"] for r in data_url.json()["results"]]
    expected = index.search(fixture.encoder.encode_images([Image.open(io.BytesIO(photo)).convert("RGB")])[0], k=4)
    assert ids == [h.id for h in expected]
    top = upload.json()["results"][0]
    assert set(top["parts"]) == {"i2t", "i2i"} and top["attributes"]["baseColour"] == "Red"


def test_image_search_form_fields(client):
    response = client.post(
        "/search/image", files={"image": ("shot.png", png_bytes((40, 40), BLUE), "image/png")},
        data={"k": "3", "alpha": "0", "filters": json.dumps({"gender": "Men"})},
    )  # fmt: skip
    body = response.json()
    assert response.status_code == 200 and body["alpha"] == 0.0 and len(body["results"]) == 3
    for result in body["results"]:
        assert result["attributes"]["gender"] == "Men"
        assert result["score"] == pytest.approx(result["parts"]["i2i"], abs=1e-6)


def test_rerank_is_refused_with_a_clear_message(client):
    response = client.post("/search/text", json={"query": "red", "rerank": True})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "rerank_unavailable" and "reranker" in response.json()["error"]["message"]
    assert client.post("/search/text", json={"query": "red", "rerank": False}).status_code == 200


# ---------------------------------------------------------------- products, filters, health


def test_product_and_thumbnail(client, index):
    product_id = index.ids()[3]
    body = client.get(f"/products/{product_id}").json()
    assert body["id"] == product_id and body["title"] == index.get(product_id).title
    response = client.get(body["image_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(response.content))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    again = client.get(body["image_url"], headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304


def test_filters_endpoint_lists_the_index_fields(client, index):
    assert client.get("/filters").json()["fields"] == index.filter_fields()


def test_health_and_readiness_without_redis(client, index):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and body["redis"] is None
    assert body["index"]["products"] == len(index) and body["index"]["version"] == index.version


def test_not_ready_until_the_index_is_loaded(index, fixture):
    app = create_app(Settings(), index=index, encoder=fixture.encoder)
    client = TestClient(app)  # not entered: the lifespan (which loads the index) has not run
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
    search = client.post("/search/text", json={"query": "red"})
    assert search.status_code == 503 and search.json()["error"]["code"] == "not_ready"


def test_metrics_count_routes_and_time_every_stage(client):
    client.post("/search/text", json={"query": "black bags", "k": 2})
    client.post("/search/image", files={"image": ("a.jpg", jpeg_bytes(BLUE), "image/jpeg")})
    client.get("/products/does-not-exist")
    requests = metric_lines(client, "vitrine_requests_total")
    assert any('route="/search/text"' in line and 'status="200"' in line for line in requests)
    assert any('route="/products/{product_id}"' in line and 'status="404"' in line for line in requests)
    stages = "\n".join(metric_lines(client, "vitrine_stage_seconds_count"))
    for kind in ("text", "image"):
        for stage in ("decode", "encode", "search", "scan", "fill_in", "records", "total", "serialise"):
            assert f'kind="{kind}",stage="{stage}"' in stages, (kind, stage)


def test_openapi_docs(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search/text", "/search/image", "/products/{product_id}", "/readyz", "/filters"} <= set(paths)
    assert "multipart/form-data" in paths["/search/image"]["post"]["requestBody"]["content"]


def test_web_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200


def test_settings_are_an_overridable_dependency(index, fixture):
    app = create_app(Settings(), index=index, encoder=fixture.encoder)
    app.dependency_overrides[get_settings] = lambda: Settings(max_k=3, default_k=2)
    with TestClient(app) as test_client:
        assert test_client.post("/search/text", json={"query": "red", "k": 4}).status_code == 422
        assert len(test_client.post("/search/text", json={"query": "red"}).json()["results"]) == 2


def test_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VITRINE_MAX_K", "7")
    monkeypatch.setenv("VITRINE_DEFAULT_K", "5")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("VITRINE_INDEX", str(tmp_path))
    settings = Settings()
    assert (settings.max_k, settings.default_k, settings.redis_url, settings.index) == (7, 5, "redis://127.0.0.1:1/0", tmp_path)
    monkeypatch.setenv("VITRINE_DEFAULT_K", "9")
    with pytest.raises(ValueError, match="default_k"):
        Settings()


# ---------------------------------------------------------------- bad input: always 4xx + JSON, never 500


def _multipart(**files_and_fields):
    files = {k: v for k, v in files_and_fields.items() if isinstance(v, tuple)}
    data = {k: v for k, v in files_and_fields.items() if not isinstance(v, tuple)}
    return {"files": files or None, "data": data or None}


def _truncated_jpeg() -> bytes:
    data = noisy_jpeg((96, 96))
    return data[: len(data) // 2]


def _json_text(body: object) -> dict:
    """A JSON body as raw bytes: json.dumps escapes a lone surrogate as \\ud800 (httpx's json= cannot send one)."""
    return {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}


def _form(**fields: str) -> dict:
    """A multipart search with a good photo and these text fields."""
    return _multipart(image=("a.jpg", jpeg_bytes(), "image/jpeg"), **fields)


def _keyed(kwargs: dict | None = None, key: str | None = WRITE_KEY, scheme: str = "Bearer") -> dict:
    """A write request's kwargs with an Authorization header (the test client's write key by default)."""
    kwargs = dict(kwargs or {})
    headers = dict(kwargs.pop("headers", None) or {})
    if key is not None:
        headers["Authorization"] = f"{scheme} {key}"
    return {**kwargs, "headers": headers}


def _put(**fields) -> dict:
    """A keyed PUT /products/{id} JSON body: a good product with these fields changed (None: left out)."""
    body = {"title": "Red zebra top", "image_base64": GOOD_B64, **fields}
    return _keyed({"json": {k: v for k, v in body.items() if v is not None}})


def _batch(body: object) -> dict:
    return _keyed({"json": body})


BIG_JPEG = noisy_jpeg((320, 320), seed=1)  # > max_image_bytes (64 KiB), < max_body_bytes (256 KiB)
BOMB_PNG = png_bytes((2000, 2000))  # 4 Mpx declared in a few KiB; the limit is 1 Mpx
THIN_PNG = png_bytes((1, 10_000))  # ~100 bytes; resized to a 224 px short side it would be 224 x 2,240,000 px
GOOD_B64 = base64.b64encode(jpeg_bytes()).decode()
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"

# (name, method, path, request kwargs, status, error code)
BAD_INPUTS = [
    ("empty query", "post", "/search/text", {"json": {"query": ""}}, 422, "validation_error"),
    ("whitespace query", "post", "/search/text", {"json": {"query": " \t\n "}}, 422, "validation_error"),
    ("query too long", "post", "/search/text", {"json": {"query": "red " * 20}}, 422, "validation_error"),
    ("query not a string", "post", "/search/text", {"json": {"query": 42}}, 422, "validation_error"),
    ("missing query", "post", "/search/text", {"json": {"k": 3}}, 422, "validation_error"),
    ("k zero", "post", "/search/text", {"json": {"query": "red", "k": 0}}, 422, "validation_error"),
    ("k over max_k", "post", "/search/text", {"json": {"query": "red", "k": 21}}, 422, "validation_error"),
    ("k as a string", "post", "/search/text", {"json": {"query": "red", "k": "5"}}, 422, "validation_error"),
    ("k fractional", "post", "/search/text", {"json": {"query": "red", "k": 2.5}}, 422, "validation_error"),
    ("k boolean", "post", "/search/text", {"json": {"query": "red", "k": True}}, 422, "validation_error"),
    ("alpha above 1", "post", "/search/text", {"json": {"query": "red", "alpha": 1.5}}, 422, "validation_error"),
    ("alpha below 0", "post", "/search/text", {"json": {"query": "red", "alpha": -0.1}}, 422, "validation_error"),
    ("unknown filter field", "post", "/search/text", {"json": {"query": "red", "filters": {"fabric": "silk"}}}, 422, "unknown_filter"),
    ("filter value a number", "post", "/search/text", {"json": {"query": "red", "filters": {"gender": 5}}}, 422, "validation_error"),
    ("filter empty list", "post", "/search/text", {"json": {"query": "red", "filters": {"gender": []}}}, 422, "validation_error"),
    ("filters not an object", "post", "/search/text", {"json": {"query": "red", "filters": ["gender"]}}, 422, "validation_error"),
    ("unknown body field", "post", "/search/text", {"json": {"query": "red", "colour": "red"}}, 422, "validation_error"),
    ("body is a list", "post", "/search/text", {"json": ["red"]}, 422, "validation_error"),
    ("malformed JSON", "post", "/search/text", {"content": b'{"query": "red"', "headers": {"content-type": "application/json"}}, 400, "malformed_json"),
    ("empty body", "post", "/search/text", {"content": b"", "headers": {"content-type": "application/json"}}, 422, "validation_error"),
    ("text search as form data", "post", "/search/text", {"data": {"query": "red"}}, 415, "unsupported_media_type"),
    ("text search without content type", "post", "/search/text", {"content": b'{"query": "red"}'}, 415, "unsupported_media_type"),
    ("filter value null", "post", "/search/text", {"json": {"query": "red", "filters": {"gender": None}}}, 422, "validation_error"),
    ("filter value blank", "post", "/search/text", {"json": {"query": "red", "filters": {"gender": " "}}}, 422, "validation_error"),
    ("rerank requested", "post", "/search/text", {"json": {"query": "red", "rerank": True}}, 422, "rerank_unavailable"),
    ("body over the limit", "post", "/search/text", {"json": {"query": "x" * 300_000}}, 413, "payload_too_large"),
    ("upload not an image", "post", "/search/image", _multipart(image=("a.jpg", b"hello, not a photo", "image/jpeg")), 415, "unsupported_image"),
    ("upload truncated", "post", "/search/image", _multipart(image=("a.jpg", _truncated_jpeg(), "image/jpeg")), 422, "invalid_image"),
    ("upload empty", "post", "/search/image", _multipart(image=("a.jpg", b"", "image/jpeg")), 422, "empty_image"),
    ("decompression bomb", "post", "/search/image", _multipart(image=("bomb.png", BOMB_PNG, "image/png")), 413, "image_too_many_pixels"),
    ("image too many bytes", "post", "/search/image", _multipart(image=("big.jpg", BIG_JPEG, "image/jpeg")), 413, "image_too_large"),
    ("missing image field", "post", "/search/image", _multipart(photo=("a.jpg", jpeg_bytes(), "image/jpeg")), 422, "validation_error"),
    ("only form fields", "post", "/search/image", {"files": {"k": (None, "3")}}, 422, "validation_error"),
    ("image sent as text", "post", "/search/image", {"files": {"image": (None, "not a file")}}, 422, "validation_error"),
    ("form k not a number", "post", "/search/image", _multipart(image=("a.jpg", jpeg_bytes(), "image/jpeg"), k="abc"), 422, "validation_error"),
    ("form alpha out of range", "post", "/search/image", _multipart(image=("a.jpg", jpeg_bytes(), "image/jpeg"), alpha="2"), 422, "validation_error"),
    ("form filters not JSON", "post", "/search/image", _multipart(image=("a.jpg", jpeg_bytes(), "image/jpeg"), filters="{gender"), 400, "malformed_json"),
    ("form unknown filter", "post", "/search/image", _multipart(image=("a.jpg", jpeg_bytes(), "image/jpeg"), filters='{"fabric": "silk"}'), 422, "unknown_filter"),
    ("bad base64", "post", "/search/image", {"json": {"image_base64": "not base64 at all!!"}}, 400, "invalid_base64"),
    ("base64 of text", "post", "/search/image", {"json": {"image_base64": base64.b64encode(b"plain text").decode()}}, 415, "unsupported_image"),
    ("base64 missing", "post", "/search/image", {"json": {"k": 3}}, 422, "validation_error"),
    ("base64 k over max", "post", "/search/image", {"json": {"image_base64": GOOD_B64, "k": 500}}, 422, "validation_error"),
    ("image JSON malformed", "post", "/search/image", {"content": b"{", "headers": {"content-type": "application/json"}}, 400, "malformed_json"),
    ("image wrong content type", "post", "/search/image", {"content": jpeg_bytes(), "headers": {"content-type": "image/jpeg"}}, 415, "unsupported_media_type"),
    ("image no content type", "post", "/search/image", {"content": b"abc"}, 415, "unsupported_media_type"),
    ("multipart without boundary", "post", "/search/image", {"content": b"--x--", "headers": {"content-type": "multipart/form-data"}}, 400, "malformed_multipart"),
    # issue 14: thin images (the resize would allocate GBs), lone surrogates, lax booleans, schema gaps
    ("thin image 1x10000", "post", "/search/image", _multipart(image=("t.png", THIN_PNG, "image/png")), 422, "image_aspect_ratio"),
    ("thin image 10000x1", "post", "/search/image", _multipart(image=("t.png", png_bytes((10_000, 1)), "image/png")), 422, "image_aspect_ratio"),
    ("thin image 1x100000", "post", "/search/image", _multipart(image=("t.png", png_bytes((1, 100_000)), "image/png")), 422, "image_aspect_ratio"),
    ("thin image 100000x1", "post", "/search/image", _multipart(image=("t.png", png_bytes((100_000, 1)), "image/png")), 422, "image_aspect_ratio"),
    ("thin image as base64", "post", "/search/image", {"json": {"image_base64": base64.b64encode(THIN_PNG).decode()}}, 422, "image_aspect_ratio"),
    ("lone surrogate in query", "post", "/search/text", _json_text({"query": "\ud800 shoes"}), 422, "validation_error"),
    ("lone low surrogate in query", "post", "/search/text", _json_text({"query": "shoes \udc00"}), 422, "validation_error"),
    ("lone surrogate in filter field name", "post", "/search/text", _json_text({"query": "red", "filters": {"\ud800": "x"}}), 422, "validation_error"),
    ("lone surrogate in filter value", "post", "/search/text", _json_text({"query": "red", "filters": {"gender": "\ud800"}}), 422, "validation_error"),
    ("lone surrogate in a filter value list", "post", "/search/text", _json_text({"query": "red", "filters": {"gender": ["Men", "\udfff"]}}), 422, "validation_error"),
    ("lone surrogate in form filters", "post", "/search/image", _form(filters=json.dumps({"\ud800": "x"})), 422, "validation_error"),
    # pydantic's own JSON parser (the image route reads JSON with it) calls a lone surrogate escape malformed
    ("lone surrogate in image search filters", "post", "/search/image", _json_text({"image_base64": GOOD_B64, "filters": {"gender": "\ud800"}}), 400, "malformed_json"),
    ("unknown filter with odd unicode", "post", "/search/text", {"json": {"query": "red", "filters": {"\u202e\u0000é": "x"}}}, 422, "unknown_filter"),
    ("rerank yes", "post", "/search/text", {"json": {"query": "red", "rerank": "yes"}}, 422, "validation_error"),
    ("rerank 1", "post", "/search/text", {"json": {"query": "red", "rerank": 1}}, 422, "validation_error"),
    ("rerank 0", "post", "/search/text", {"json": {"query": "red", "rerank": 0}}, 422, "validation_error"),
    ("rerank string false", "post", "/search/text", {"json": {"query": "red", "rerank": "false"}}, 422, "validation_error"),
    ("timing 1", "post", "/search/text", {"json": {"query": "red", "timing": 1}}, 422, "validation_error"),
    ("image rerank 0", "post", "/search/image", {"json": {"image_base64": GOOD_B64, "rerank": 0}}, 422, "validation_error"),
    ("form rerank yes", "post", "/search/image", _form(rerank="yes"), 422, "validation_error"),
    ("form rerank 1", "post", "/search/image", _form(rerank="1"), 422, "validation_error"),
    ("form rerank 0", "post", "/search/image", _form(rerank="0"), 422, "validation_error"),
    ("form timing on", "post", "/search/image", _form(timing="on"), 422, "validation_error"),
    ("query padded past the limit", "post", "/search/text", {"json": {"query": " " * 70 + "red"}}, 422, "validation_error"),
    ("image_base64 empty", "post", "/search/image", {"json": {"image_base64": ""}}, 422, "validation_error"),
    ("image_base64 blank", "post", "/search/image", {"json": {"image_base64": " \n "}}, 400, "invalid_base64"),
    ("image_base64 only a data URL prefix", "post", "/search/image", {"json": {"image_base64": "data:image/png;base64,"}}, 400, "invalid_base64"),
    ("image_base64 bad padding", "post", "/search/image", {"json": {"image_base64": "AAAAA"}}, 400, "invalid_base64"),
    ("PDF upload", "post", "/search/image", _multipart(image=("a.pdf", PDF, "application/pdf")), 415, "unsupported_media_type"),
    ("photo declared as a PDF", "post", "/search/image", _multipart(image=("a.pdf", jpeg_bytes(), "application/pdf")), 415, "unsupported_media_type"),
    ("PDF bytes declared as a JPEG", "post", "/search/image", _multipart(image=("a.jpg", PDF, "image/jpeg")), 415, "unsupported_image"),
    ("multipart with too many fields", "post", "/search/image",
     _form(k="3", alpha="0.5", filters="{}", rerank="false", rerank_top_n="5", timing="false", facets="[]", include_predicted="false", extra="1"), 400, "malformed_multipart"),
    ("form field not in the schema", "post", "/search/image", _form(colour="red"), 422, "validation_error"),
    # issue 14, part 3: catalog writes (keys first, then every field, the photo and the batch rows)
    ("write without a key", "put", "/products/new1", {"json": {"title": "Red top", "image_base64": GOOD_B64}}, 401, "missing_api_key"),
    ("write with a wrong key", "put", "/products/new1", _keyed({"json": {"title": "Red top"}}, key="wrong"), 403, "invalid_api_key"),
    ("write with basic auth", "put", "/products/new1", _keyed({"json": {"title": "Red top"}}, scheme="Basic"), 401, "missing_api_key"),
    ("write with an empty bearer", "put", "/products/new1", _keyed(key=""), 401, "missing_api_key"),
    ("write key as the digest", "delete", "/products/100", _keyed(key=WRITE_DIGEST), 403, "invalid_api_key"),
    ("delete without a key", "delete", "/products/100", {}, 401, "missing_api_key"),
    ("batch without a key", "post", "/products:batch", {"json": {"delete": ["100"]}}, 401, "missing_api_key"),
    ("write id with a space", "put", "/products/a%20b", _put(), 422, "validation_error"),
    ("write id over 128 chars", "put", "/products/" + "a" * 129, _put(), 422, "validation_error"),
    ("write id starting with a dot", "put", "/products/.hidden", _put(), 422, "validation_error"),
    ("write id with a lone surrogate", "put", "/products/%ED%A0%80", _put(), 422, "validation_error"),
    ("write title missing", "put", "/products/new1", _put(title=None), 422, "validation_error"),
    ("write title blank", "put", "/products/new1", _put(title=" \t "), 422, "validation_error"),
    ("write title too long", "put", "/products/new1", _put(title="x" * 301), 422, "validation_error"),
    ("write title a number", "put", "/products/new1", _put(title=5), 422, "validation_error"),
    ("write title lone surrogate", "put", "/products/new1",
     _keyed(_json_text({"title": "\ud800 top", "image_base64": GOOD_B64})), 400, "malformed_json"),
    ("write unknown field", "put", "/products/new1", _put(price=10), 422, "validation_error"),
    ("write id in the body", "put", "/products/new1", _put(id="other"), 422, "validation_error"),
    ("write attributes a list", "put", "/products/new1", _put(attributes=["gender"]), 422, "validation_error"),
    ("write attribute value a number", "put", "/products/new1", _put(attributes={"gender": 5}), 422, "validation_error"),
    ("write attribute named category", "put", "/products/new1", _put(attributes={"category": "Bags"}), 422, "validation_error"),
    ("write attribute name with a space", "put", "/products/new1", _put(attributes={"base colour": "Red"}), 422, "validation_error"),
    ("write too many attributes", "put", "/products/new1", _put(attributes={f"a{i}": "x" for i in range(65)}), 422, "validation_error"),
    ("write description too long", "put", "/products/new1", _put(description="x" * 5001), 422, "validation_error"),
    ("write photo missing", "put", "/products/new1", _put(image_base64=None), 422, "validation_error"),
    ("write photo empty", "put", "/products/new1", _put(image_base64=""), 422, "validation_error"),
    ("write photo bad base64", "put", "/products/new1", _put(image_base64="not base64!!"), 400, "invalid_base64"),
    ("write photo base64 of text", "put", "/products/new1", _put(image_base64=base64.b64encode(b"plain text").decode()), 415, "unsupported_image"),
    ("write photo a PDF", "put", "/products/new1", _put(image_base64=base64.b64encode(PDF).decode()), 415, "unsupported_image"),
    ("write photo truncated", "put", "/products/new1", _put(image_base64=base64.b64encode(_truncated_jpeg()).decode()), 422, "invalid_image"),
    ("write photo thin", "put", "/products/new1", _put(image_base64=base64.b64encode(THIN_PNG).decode()), 422, "image_aspect_ratio"),
    ("write photo a pixel bomb", "put", "/products/new1", _put(image_base64=base64.b64encode(BOMB_PNG).decode()), 413, "image_too_many_pixels"),
    ("write photo too many bytes", "put", "/products/new1", _put(image_base64=base64.b64encode(BIG_JPEG).decode()), 413, "image_too_large"),
    ("write body over the limit", "put", "/products/new1", _put(description="x" * 300_000), 413, "payload_too_large"),
    ("write malformed JSON", "put", "/products/new1", _keyed(_json_text("x") | {"content": b'{"title": '}), 400, "malformed_json"),
    ("write body a list", "put", "/products/new1", _keyed({"json": ["Red top"]}), 422, "validation_error"),
    ("write as text/plain", "put", "/products/new1", _keyed({"content": b"title=x", "headers": {"content-type": "text/plain"}}), 415, "unsupported_media_type"),
    ("write without a content type", "put", "/products/new1", _keyed({"content": b"{}"}), 415, "unsupported_media_type"),
    ("write form without the photo", "put", "/products/new1", _keyed({"files": {"title": (None, "Red top")}}), 422, "validation_error"),
    ("write form photo as text", "put", "/products/new1", _keyed({"files": {"image": (None, "x"), "title": (None, "Red top")}}), 422, "validation_error"),
    ("write form without a title", "put", "/products/new1", _keyed(_multipart(image=("a.jpg", jpeg_bytes(), "image/jpeg"))), 422, "validation_error"),
    ("write form PDF part", "put", "/products/new1", _keyed(_multipart(image=("a.pdf", PDF, "application/pdf"), title="Red top")), 415, "unsupported_media_type"),
    ("write form attributes not JSON", "put", "/products/new1", _keyed(_form(title="Red top", attributes="{gender")), 400, "malformed_json"),
    ("write form attributes nested too deep", "put", "/products/new1", _keyed(_form(title="Red top", attributes="[" * 60_000)), 400, "malformed_json"),
    ("form filters nested too deep", "post", "/search/image", _form(filters="[" * 60_000), 400, "malformed_json"),
    ("write form unknown field", "put", "/products/new1", _keyed(_form(title="Red top", price="10")), 422, "validation_error"),
    ("write form lone surrogate in attributes", "put", "/products/new1",
     _keyed(_form(title="Red top", attributes=json.dumps({"gender": "\ud800"}))), 422, "validation_error"),
    ("write form too many parts", "put", "/products/new1",
     _keyed(_form(title="a", category="b", subcategory="c", description="d", attributes="{}", extra="1")), 400, "malformed_multipart"),
    ("delete unknown id", "delete", "/products/no-such-id", _keyed(), 404, "product_not_found"),
    ("delete id over 200 chars", "delete", "/products/" + "a" * 201, _keyed(), 422, "validation_error"),
    ("batch as a form", "post", "/products:batch", _keyed({"data": {"delete": "100"}}), 415, "unsupported_media_type"),
    ("batch body a list", "post", "/products:batch", _batch([{"delete": ["100"]}]), 422, "validation_error"),
    ("batch unknown key", "post", "/products:batch", _batch({"remove": ["100"]}), 422, "validation_error"),
    ("batch upsert not a list", "post", "/products:batch", _batch({"upsert": {"id": "x"}}), 422, "validation_error"),
    ("batch row not an object", "post", "/products:batch", _batch({"upsert": ["x"]}), 422, "invalid_rows"),
    ("batch row without an id", "post", "/products:batch", _batch({"upsert": [{"title": "Red top", "image_base64": GOOD_B64}]}), 422, "invalid_rows"),
    ("batch row with a bad id", "post", "/products:batch", _batch({"upsert": [{"id": "a/b", "title": "Red top", "image_base64": GOOD_B64}]}), 422, "invalid_rows"),
    ("batch row with a bad photo", "post", "/products:batch", _batch({"upsert": [{"id": "n1", "title": "Red top", "image_base64": "QUJD"}]}), 422, "invalid_rows"),
    ("batch row with a thin photo", "post", "/products:batch",
     _batch({"upsert": [{"id": "n1", "title": "Red top", "image_base64": base64.b64encode(THIN_PNG).decode()}]}), 422, "invalid_rows"),
    ("batch repeats an id", "post", "/products:batch",
     _batch({"upsert": [{"id": "n1", "title": "Red top", "image_base64": GOOD_B64}], "delete": ["n1"]}), 422, "invalid_rows"),
    ("batch deletes an id twice", "post", "/products:batch", _batch({"delete": ["100", "100"]}), 422, "invalid_rows"),
    ("batch deletes an unknown id", "post", "/products:batch", _batch({"delete": ["100", "no-such-id"]}), 422, "invalid_rows"),
    ("batch delete id not a string", "post", "/products:batch", _batch({"delete": [100]}), 422, "validation_error"),
    ("batch over the row limit", "post", "/products:batch", _batch({"delete": [str(i) for i in range(11)]}), 422, "validation_error"),
    ("batch lone surrogate", "post", "/products:batch", _keyed(_json_text({"delete": ["\udfff"]})), 400, "malformed_json"),
    ("batch wrong method", "get", "/products:batch", {}, 405, "method_not_allowed"),
    ("unknown product", "get", "/products/no-such-id", {}, 404, "product_not_found"),
    ("unknown product image", "get", "/products/no-such-id/image", {}, 404, "product_not_found"),
    ("unknown route", "get", "/nope", {}, 404, "not_found"),
    ("wrong method", "get", "/search/text", {}, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(("name", "method", "path", "kwargs", "status", "code"), BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_a_4xx_json_error(client, name, method, path, kwargs, status, code):
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error


def test_bad_inputs_are_at_least_twenty_and_never_500(client, index):
    assert len(BAD_INPUTS) >= 20
    assert len(BIG_JPEG) > LIMITS["max_image_bytes"] and len(BIG_JPEG) * 4 // 3 < LIMITS["max_body_bytes"]
    assert len(BOMB_PNG) < LIMITS["max_image_bytes"]
    for _, method, path, kwargs, *_ in BAD_INPUTS:
        getattr(client, method)(path, **kwargs)
    statuses = {line.split('status="')[1].split('"')[0] for line in metric_lines(client, "vitrine_requests_total{")}
    assert statuses and not any(s.startswith("5") for s in statuses), statuses
    assert IndexLayout(index.index_dir).current().name == index.version  # no bad write was committed


def test_pillow_decompression_bomb_error_is_a_413(client, monkeypatch):
    # Beyond twice Image.MAX_IMAGE_PIXELS Pillow refuses in open() itself; that is a 413 too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    response = client.post("/search/image", files={"image": ("a.png", png_bytes((100, 100)), "image/png")})
    assert response.status_code == 413 and response.json()["error"]["code"] == "image_too_many_pixels"


@pytest.mark.filterwarnings("ignore:.*(EXIF|Skipping tag).*:UserWarning")  # Pillow on mangled EXIF
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "WEBP"])
def test_corrupted_uploads_only_ever_raise_api_errors(fmt):
    """Seeded byte flips and truncations of a real file (with EXIF where the format has it)."""
    source = Image.open(io.BytesIO(noisy_jpeg((40, 30)))).convert("P" if fmt == "GIF" else "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated, so exif_transpose has work to do
    out = io.BytesIO()
    source.save(out, fmt, **({"exif": exif.tobytes()} if fmt in ("JPEG", "PNG", "WEBP") else {}))
    original = out.getvalue()
    rng = random.Random(fmt)
    outcomes = set()
    for _ in range(150):
        data = bytearray(original)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(1, len(data))]
        try:
            image = decode_upload(bytes(data), max_bytes=1 << 20, max_pixels=1_000_000, max_aspect_ratio=20)
            assert image.mode == "RGB"
            outcomes.add("decoded")
        except ApiError as exc:  # anything else would be a 500
            assert 400 <= exc.status < 500
            outcomes.add(exc.code)
    assert len(outcomes) >= 2, outcomes  # the mutations really did break some files


def test_genuine_bugs_get_a_json_500(index, fixture):
    class BrokenEncoder(type(fixture.encoder)):
        def encode_texts(self, texts):
            raise RuntimeError("boom")

    app = create_app(Settings(), index=index, encoder=BrokenEncoder())
    with TestClient(app, raise_server_exceptions=False) as test_client:
        response = test_client.post("/search/text", json={"query": "red"})
    assert response.status_code == 500
    assert response.json() == {"error": {"code": "internal_error", "message": "internal server error"}}


def test_text_and_photo_queries_use_their_own_tuned_alpha(tmp_path):
    from tests.support.indexes import FixtureEncoder

    class PerKind(FixtureEncoder):
        alpha_t2p, alpha_i2p = 0.9, 0.1

    built = build_fixture_index(tmp_path, n=12, encoder=PerKind())
    with ProductIndex.open(built.index_dir) as index:
        assert (index.alphas.for_kind("text"), index.alphas.for_kind("image")) == (0.9, 0.1)
        app = create_app(Settings(**LIMITS), index=index, encoder=built.encoder)
        with TestClient(app) as client:
            assert client.post("/search/text", json={"query": "red tshirts", "k": 3}).json()["alpha"] == 0.9
            files = {"image": ("p.jpg", jpeg_bytes(), "image/jpeg")}
            assert client.post("/search/image", files=files, data={"k": "3"}).json()["alpha"] == 0.1
            ready = client.get("/readyz").json()["index"]
            assert (ready["alpha_text"], ready["alpha_image"]) == (0.9, 0.1)
