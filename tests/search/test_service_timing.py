"""Per-stage timings of a search: the Server-Timing header, timings_ms and the Prometheus histograms."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from indexer import ProductIndex
from search.service import Settings, create_app
from tests.support.indexes import IndexFixture, build_fixture_index
from tests.support.service import jpeg_bytes

ENGINE_STAGES = {"decode", "encode", "search", "scan", "fill_in", "records", "total"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    fixture: IndexFixture = build_fixture_index(tmp_path_factory.mktemp("service-timing"), n=24)
    with ProductIndex.open(fixture.index_dir) as index:
        app = create_app(Settings(default_k=5), index=index, encoder=fixture.encoder)
        with TestClient(app) as test_client:
            yield test_client


def server_timing(header: str) -> dict[str, float]:
    out = {}
    for entry in header.split(","):
        name, _, dur = entry.strip().partition(";dur=")
        out[name] = float(dur)
    return out


def test_text_search_reports_every_stage_in_server_timing(client: TestClient) -> None:
    response = client.post("/search/text", json={"query": "red shirt", "timing": True})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    stages = server_timing(response.headers["server-timing"])
    assert ENGINE_STAGES | {"serialise", "app"} <= set(stages)
    assert all(ms >= 0 for ms in stages.values())
    # The engine's stages nest inside its total, and everything inside the app's time.
    assert stages["scan"] + stages["fill_in"] <= stages["search"] <= stages["total"] <= stages["app"]
    assert stages["total"] + stages["serialise"] <= stages["app"]
    body = response.json()
    assert set(body["timings_ms"]) == set(stages) - {"serialise", "app"} and body["took_ms"] == round(stages["total"], 3)
    assert len(body["results"]) == 5 and body["cache"] == "miss"
    # Without `timing` the body has no timings_ms; the header is there all the same.
    plain = client.post("/search/text", json={"query": "red shirt"})
    assert "timings_ms" not in plain.json() and plain.json()["cache"] == "local"
    assert {"encode", "search", "app"} <= set(server_timing(plain.headers["server-timing"]))


def test_image_search_reports_every_stage_in_server_timing(client: TestClient) -> None:
    response = client.post("/search/image", files={"image": ("a.jpg", jpeg_bytes((200, 30, 30)), "image/jpeg")})
    assert response.status_code == 200
    stages = server_timing(response.headers["server-timing"])
    assert ENGINE_STAGES | {"serialise", "app"} <= set(stages)
    assert stages["decode"] + stages["encode"] + stages["search"] <= stages["total"] <= stages["app"]


def test_errors_and_other_routes_carry_no_server_timing(client: TestClient) -> None:
    assert "server-timing" not in client.post("/search/text", json={"query": ""}).headers
    assert "server-timing" not in client.get("/healthz").headers


def test_stage_histograms_and_batch_sizes_are_exported(client: TestClient) -> None:
    client.post("/search/text", json={"query": "blue jeans for men"})
    metrics = client.get("/metrics").text
    for stage in ("scan", "fill_in", "records", "serialise"):
        assert f'vitrine_stage_seconds_count{{kind="text",stage="{stage}"}}' in metrics, stage
    assert "vitrine_text_batch_size_count" in metrics


def test_records_are_preloaded_into_memory_without_redis(client: TestClient) -> None:
    served = client.app.state.engine.served
    assert served.records_loaded.wait(30)
    assert len(served.disk_records) == served.size == 24
    product_id = served.index.ids()[3]
    assert served.disk_records.get(product_id) == served.index.get(product_id)
