"""Redis behind the service, on a real redis-server: shared cache and product store, and losing it mid-run."""
from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from indexer import ProductIndex, ProductRecord, ProductStore
from search.service import Settings, create_app
from search.service.redis_store import RedisLink, RedisStore, record_to_json
from tests.support.indexes import IndexFixture, build_fixture_index
from tests.support.redis_server import RedisServer
from tests.support.service import LiveServer, jpeg_bytes


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> IndexFixture:
    return build_fixture_index(tmp_path_factory.mktemp("service-redis"), n=24)


@pytest.fixture(scope="module")
def index(fixture: IndexFixture) -> ProductIndex:
    with ProductIndex.open(fixture.index_dir) as opened:
        yield opened


def settings_for(server: RedisServer, **overrides) -> Settings:
    return Settings(redis_url=server.url, redis_timeout_s=0.2, redis_retry_s=0.2, **overrides)


def wait_for(condition, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_redis_store_implements_the_product_store_protocol(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    store = RedisStore(client, "v1", prefix="test")
    assert isinstance(store, ProductStore)
    records = [ProductRecord(str(i), f"Title {i}", "Apparel", "Tops", "", {"gender": "Women", "note": "é"}, f"{i}.jpg") for i in range(5)]
    assert store.put_many(records) == 5 and len(store) == 5
    assert store.get("3") == records[3] and store.get("nope") is None
    assert store.get_many(["4", "x", "0"]) == [records[4], None, records[0]]
    assert "2" in store and "x" not in store and 2 not in store
    assert store.delete(["2", "2", "x"]) == 1 and len(store) == 4
    assert not store.is_complete(4)
    assert store.populate(records, 5) == 5 and store.is_complete(5)
    assert RedisStore(client, "v2", prefix="test").get("1") is None  # versions never mix


def test_redis_link_breaker_skips_calls_while_down_and_recovers(redis_server):
    link = RedisLink(redis_server.url, timeout_s=0.2, retry_s=0.3)
    states = []
    link.on_state_change = states.append
    assert link.call(lambda c: c.set("a", "1"), None) and link.up
    redis_server.kill()
    assert link.call(lambda c: c.get("a"), "fallback") == "fallback" and not link.up
    calls = []
    assert link.call(lambda c: calls.append(1), "skipped") == "skipped" and not calls  # breaker open
    redis_server.start()
    assert link.ping() and link.up
    assert states == [False, True]


def test_cache_and_product_store_are_shared_between_replicas(redis_server, index, fixture):
    first = create_app(settings_for(redis_server), index=index, encoder=fixture.encoder)
    with TestClient(first) as client:
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready"
        assert ready["redis"] == {"configured": True, "url": redis_server.url, "reachable": True, "product_store_synced": True}
        body = client.post("/search/text", json={"query": "yellow soft jeans", "k": 3}).json()
        assert body["cache"] == "miss"
    raw = redis.Redis.from_url(redis_server.url)
    keys = [k for k in raw.scan_iter("vitrine:qemb:*")]
    assert len(keys) == 1 and keys[0].decode().startswith(f"vitrine:qemb:{index.bundle_fingerprint}:")
    assert len(raw.get(keys[0])) == 4 * index.embed_dim and 0 < raw.ttl(keys[0]) <= Settings().cache_ttl_s
    store_key = f"vitrine:products:{index.version}"
    assert raw.hlen(store_key) == len(index) and int(raw.get(f"{store_key}:complete")) == len(index)

    # A second replica (fresh in-process cache) reads the embedding and the products from Redis.
    product_id = body["results"][0]["id"]
    record = index.get(product_id)
    record.title = "Title as the shared store has it"
    raw.hset(store_key, product_id, record_to_json(record))
    second = create_app(settings_for(redis_server), index=index, encoder=fixture.encoder)
    with TestClient(second) as client:
        again = client.post("/search/text", json={"query": "yellow soft jeans", "k": 3}).json()
        assert again["cache"] == "redis"
        assert [r["id"] for r in again["results"]] == [r["id"] for r in body["results"]]
        assert again["results"][0]["title"] == "Title as the shared store has it"
        assert client.get(f"/products/{product_id}").json()["title"] == "Title as the shared store has it"


def test_killing_redis_mid_run_degrades_without_failing_requests(redis_server, index, fixture):
    app = create_app(settings_for(redis_server), index=index, encoder=fixture.encoder)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/readyz").json()["status"] == "ready"
        assert http.post("/search/text", json={"query": "red tshirts"}).status_code == 200

        redis_server.kill()
        started = time.perf_counter()
        for i in range(12):  # new queries: every one misses the local cache and needs Redis
            response = http.post("/search/text", json={"query": f"blue bold shoes {i}", "k": 5})
            assert response.status_code == 200, response.text
            assert response.json()["cache"] == "miss" and len(response.json()["results"]) == 5
        assert (time.perf_counter() - started) / 12 < 0.5  # the breaker spares requests the timeout
        image = http.post("/search/image", files={"image": ("a.jpg", jpeg_bytes((40, 140, 60)), "image/jpeg")})
        assert image.status_code == 200 and image.json()["results"]
        product_id = index.ids()[0]
        assert http.get(f"/products/{product_id}").json()["title"] == index.get(product_id).title  # disk store
        assert http.get(f"/products/{product_id}/image").status_code == 200
        ready = http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded" and ready.json()["redis"]["reachable"] is False
        assert ready.json()["redis"]["error"]
        assert "vitrine_redis_up 0.0" in http.get("/metrics").text

        redis_server.start()  # same port, empty: the service reconnects and refills the product store
        wait_for(lambda: http.get("/readyz").json()["status"] == "ready", what="ready again")
        wait_for(lambda: http.get("/readyz").json()["redis"]["product_store_synced"], what="store re-synced")
        raw = redis.Redis.from_url(redis_server.url)
        assert raw.hlen(f"vitrine:products:{index.version}") == len(index)
        response = http.post("/search/text", json={"query": "pink retro handbags"})
        assert response.status_code == 200 and response.json()["cache"] == "miss"
        assert len(list(raw.scan_iter("vitrine:qemb:*"))) == 1  # caching into Redis again
        assert "vitrine_redis_up 1.0" in http.get("/metrics").text
        statuses = [line for line in http.get("/metrics").text.splitlines() if line.startswith("vitrine_requests_total{")]
        assert not any('status="5' in line for line in statuses), statuses


def test_a_hung_redis_costs_requests_one_short_timeout(redis_server, index, fixture):
    app = create_app(settings_for(redis_server), index=index, encoder=fixture.encoder)
    with TestClient(app) as client:
        assert client.get("/readyz").json()["status"] == "ready"
        redis_server.pause()
        try:
            latencies = []
            for i in range(8):
                started = time.perf_counter()
                response = client.post("/search/text", json={"query": f"brown slim jeans {i}", "k": 3})
                latencies.append(time.perf_counter() - started)
                assert response.status_code == 200 and response.json()["cache"] == "miss"
            assert max(latencies) < 2.0 and sorted(latencies)[len(latencies) // 2] < 0.2, latencies
            assert client.get("/readyz").json()["status"] == "degraded"
        finally:
            redis_server.resume()
        wait_for(lambda: client.get("/readyz").json()["status"] == "ready", what="ready after SIGCONT")


def test_redis_down_at_start_up_serves_degraded(tmp_path, index, fixture):
    gone = RedisServer()  # never started: nothing listens on its port
    app = create_app(Settings(redis_url=gone.url, redis_timeout_s=0.1), index=index, encoder=fixture.encoder)
    with TestClient(app) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert ready.json()["redis"]["product_store_synced"] is False
        body = client.post("/search/text", json={"query": "white urban tshirts", "k": 4}).json()
        assert len(body["results"]) == 4
        assert np.isclose(body["results"][0]["score"], max(r["score"] for r in body["results"]))


DAMAGED_RECORDS = {
    "not JSON": b"\x00garbage{",
    "JSON but not an object": b"[1, 2, 3]",
    "fields missing": b'{"id": "%s", "title": "only a title"}',
    "a field of the wrong type": None,  # filled in below: the real record with title 5
    "another product's record": None,
}


def test_damaged_redis_records_are_misses_served_from_disk_and_repaired(redis_server, index, fixture):
    app = create_app(settings_for(redis_server), index=index, encoder=fixture.encoder)
    raw = redis.Redis.from_url(redis_server.url)
    store_key = f"vitrine:products:{index.version}"
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/readyz").json()["redis"]["product_store_synced"]
        ids = index.ids()[: len(DAMAGED_RECORDS)]
        for (what, value), product_id in zip(DAMAGED_RECORDS.items(), ids):
            record = index.get(product_id).to_dict()
            if what == "a field of the wrong type":
                value = json.dumps({**record, "title": 5}).encode()
            elif what == "another product's record":
                value = record_to_json(index.get(index.ids()[-1]))
            elif b"%s" in value:
                value = value % product_id.encode()
            raw.hset(store_key, product_id, value)

        for product_id in ids:
            response = client.get(f"/products/{product_id}")
            assert response.status_code == 200, response.text
            assert response.json()["title"] == index.get(product_id).title
            assert raw.hget(store_key, product_id) == record_to_json(index.get(product_id))  # repaired

        for product_id in ids:  # damage them again: a search that returns them answers from disk too
            raw.hset(store_key, product_id, b"not json")
        query = fixture.encoder.encode_texts([index.get(ids[0]).title])[0]
        expected = [hit.id for hit in index.search(query, k=len(index))]
        response = client.post("/search/text", json={"query": index.get(ids[0]).title, "k": 20})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["id"] for r in results] == expected[:20]
        assert all(r["title"] == index.get(r["id"]).title for r in results)
        assert all(raw.hget(store_key, i) == record_to_json(index.get(i)) for i in ids if i in expected[:20])
        statuses = [line for line in client.get("/metrics").text.splitlines() if line.startswith("vitrine_requests_total{")]
        assert not any('status="5' in line for line in statuses), statuses


def test_redis_passwords_are_masked_in_logs_and_readiness(index, fixture, caplog):
    from search.service.redis_store import masked_url

    assert masked_url("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert masked_url("rediss://app:s3cret@cache/1?password=s3cret&ssl_cert_reqs=none").count("s3cret") == 0
    assert masked_url("redis://cache:6379/0") == "redis://cache:6379/0"
    gone = RedisServer()  # nothing listens: the link goes down at once and says so in the log
    url = f"redis://app:s3cret-pw@127.0.0.1:{gone.port}/0"
    app = create_app(Settings(redis_url=url, redis_timeout_s=0.1), index=index, encoder=fixture.encoder)
    with caplog.at_level("INFO"), TestClient(app) as client:
        ready = client.get("/readyz").json()
        client.post("/search/text", json={"query": "red"})
    assert ready["status"] == "degraded" and ready["redis"]["url"] == f"redis://app:***@127.0.0.1:{gone.port}/0"
    assert "s3cret-pw" not in json.dumps(ready)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "redis://app:***@" in logged and "s3cret-pw" not in logged
