"""Live index updates without a restart (issue 14, part 2), on real uvicorn servers on 127.0.0.1.

An upsert and a delete (the indexer's own path, as `vitrine index --upsert/--delete` runs it)
while a bounded load runs: no request fails, the new product is found and the deleted one is gone
within 5 s. Queries in flight finish on the version they started on; the version lease moves to
the version served; replicas sharing a Redis switch together, even one that does not see the
index folder change (Redis names the version).
"""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from indexer import ProductIndex
from indexer.build import build_index, delete_from_index, upsert_index
from indexer.layout import IndexLayout, is_leased
from search.service import Settings, create_app
from search.service.live import current_key
from tests.support.catalogs import write_jsonl
from tests.support.indexes import FixtureEncoder, fixture_product, make_index_catalog
from tests.support.load import BoundedLoad, wait_until
from tests.support.service import LiveServer
from vitrine.catalog import read_catalog

SWITCH_LIMIT_S = 5.0  # the bound
POLL_S = 0.5
NEW_TITLE = "Women zebra quilted Handbags no 77"
NEW_ID = "177"


def build(root: Path, n: int = 24) -> Path:
    catalog = make_index_catalog(root / "catalog", n)
    build_index(read_catalog(catalog), FixtureEncoder(), root / "index", threads=1)
    return root / "index"


def new_product_catalog(root: Path) -> Path:
    """A catalog with one new product, whose title no other product shares a word with."""
    make_index_catalog(root / "catalog", records=[fixture_product(77, title=NEW_TITLE)])
    return write_jsonl(root / "catalog" / "new.jsonl", [fixture_product(77, title=NEW_TITLE)])


def top_ids(http: httpx.Client, query: str, k: int = 3) -> list[str]:
    response = http.post("/search/text", json={"query": query, "k": k})
    assert response.status_code == 200, response.text
    return [r["id"] for r in response.json()["results"]]


def serve(index_dir: Path, **settings) -> LiveServer:
    """A server that opens the index itself, as `vitrine serve` does."""
    return LiveServer(create_app(Settings(**{"index": index_dir, "index_poll_s": POLL_S, **settings}), encoder=FixtureEncoder()))


def test_an_upsert_and_a_delete_under_load_are_served_within_5_s_with_no_failed_request(tmp_path):
    index_dir = build(tmp_path)
    catalog = new_product_catalog(tmp_path)
    with serve(index_dir) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        first = http.get("/readyz").json()["index"]["version"]
        assert NEW_ID not in top_ids(http, NEW_TITLE) and "105" in top_ids(http, http.get("/products/105").json()["title"])
        with BoundedLoad(server.url, requests=300, clients=4, ids=["110", "111", "112"], pause_s=0.02) as load:
            time.sleep(0.3)  # the load is running
            upserted = upsert_index(index_dir, read_catalog(catalog), FixtureEncoder(), threads=1).version_dir.name
            found_s = wait_until(lambda: top_ids(http, NEW_TITLE)[:1] == [NEW_ID], SWITCH_LIMIT_S)
            deleted_title = http.get("/products/105").json()["title"]
            delete_from_index(index_dir, ["105"])
            gone_s = wait_until(lambda: http.get("/products/105").status_code == 404
                                and "105" not in top_ids(http, deleted_title, k=10), SWITCH_LIMIT_S)  # fmt: skip
            assert load.running, "the load must still be running while the index changes"
        ready = http.get("/readyz").json()["index"]
        switches = [line for line in http.get("/metrics").text.splitlines() if line.startswith("vitrine_index_switches_total")]
    print(f"\nlive: {load.done} requests in {load.seconds:.1f} s, {len(load.failures)} failed, p50 {load.p(0.5):.0f} ms, "
          f"p99 {load.p(0.99):.0f} ms; new product found {found_s} s after the upsert, deleted one gone {gone_s} s after the delete")  # fmt: skip
    assert load.failures == [] and load.done == 300
    assert found_s is not None and gone_s is not None, (found_s, gone_s)
    assert ready["version"] == IndexLayout(index_dir).current().name != upserted != first
    assert ready["products"] == 24 and 'vitrine_index_switches_total{result="ok"} 2.0' in switches


def test_queries_in_flight_finish_on_the_version_they_started_on(tmp_path):
    index_dir = build(tmp_path)
    started, release = threading.Event(), threading.Event()

    class SlowEncoder(FixtureEncoder):
        def encode_texts(self, texts):
            if texts == ["slow red tshirts"]:
                started.set()
                release.wait(10)
            return super().encode_texts(texts)

    app = create_app(Settings(index=index_dir, index_poll_s=POLL_S, cache_size=0), encoder=SlowEncoder())
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=20) as http:
        old = IndexLayout(index_dir).current()
        answer: dict = {}
        slow = threading.Thread(target=lambda: answer.update(http.post("/search/text", json={"query": "slow red tshirts", "k": 30}).json()))
        slow.start()
        assert started.wait(10)
        delete_from_index(index_dir, ["100", "108"], keep_versions=1)  # both red tshirts-ish; the old version is leased
        assert wait_until(lambda: http.get("/products/100").status_code == 404, SWITCH_LIMIT_S) is not None
        assert is_leased(old) and old.exists()  # the query in flight still holds it
        release.set()
        slow.join(10)
        assert {"100", "108"} <= {r["id"] for r in answer["results"]}, "answered from the version it started on"
        assert wait_until(lambda: not is_leased(old), 5.0) is not None  # closed after its last request
        new = IndexLayout(index_dir).current()
        assert is_leased(new)
        delete_from_index(index_dir, ["101"], keep_versions=1)  # prunes the old version now; the served one is kept
        assert not old.exists()


def test_the_served_version_keeps_its_lease_and_the_old_one_is_released(tmp_path):
    index_dir = build(tmp_path)
    with serve(index_dir, index_poll_s=0.2) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        first = IndexLayout(index_dir).current()
        second = delete_from_index(index_dir, ["100"], keep_versions=1).version_dir
        assert first.exists() and is_leased(first)  # served until the follower switches
        assert wait_until(lambda: http.get("/readyz").json()["index"]["version"] == second.name, SWITCH_LIMIT_S)
        assert wait_until(lambda: not is_leased(first), 5.0) is not None and is_leased(second)
        third = delete_from_index(index_dir, ["101"], keep_versions=1).version_dir
        assert not first.exists() and second.exists()  # pruning keeps what is served
        assert wait_until(lambda: http.get("/readyz").json()["index"]["version"] == third.name, SWITCH_LIMIT_S)


def test_a_version_that_cannot_be_served_leaves_the_current_one_serving(tmp_path, caplog):
    index_dir = build(tmp_path)

    class OtherModel(FixtureEncoder):
        fingerprint = "another-bundle"

    with serve(index_dir, index_poll_s=0.2) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        served = http.get("/readyz").json()["index"]["version"]
        build_index(read_catalog(tmp_path / "catalog"), OtherModel(), index_dir, threads=1)  # CURRENT -> another model's
        time.sleep(1.0)
        assert http.get("/readyz").json()["index"]["version"] == served
        assert http.post("/search/text", json={"query": "red tshirts"}).status_code == 200
        failed = [line for line in http.get("/metrics").text.splitlines() if line.startswith('vitrine_index_switches_total{result="failed"}')]
        assert failed and float(failed[0].split()[-1]) >= 1
    assert any("cannot serve index version" in r.getMessage() and "another-bundle" in r.getMessage() for r in caplog.records)


def test_replicas_sharing_redis_switch_together_even_one_that_does_not_see_the_folder(tmp_path, redis_server):
    """Replica A serves the index folder; replica B serves a copy of it (as if synced from elsewhere) and
    never sees its own CURRENT change: Redis tells it which version to serve."""
    index_dir = build(tmp_path)
    copy = tmp_path / "replica-b"
    shutil.copytree(index_dir, copy)
    catalog = new_product_catalog(tmp_path)
    common = {"redis_url": redis_server.url, "redis_timeout_s": 0.2, "redis_retry_s": 0.2}
    with serve(index_dir, **common) as a, serve(copy, **common) as b, \
            httpx.Client(base_url=a.url, timeout=10) as http_a, httpx.Client(base_url=b.url, timeout=10) as http_b:  # fmt: skip
        key = current_key("vitrine")
        raw = redis.Redis.from_url(redis_server.url)
        first = raw.get(key).decode()
        assert first == IndexLayout(index_dir).current().name == IndexLayout(copy).current().name
        new = upsert_index(index_dir, read_catalog(catalog), FixtureEncoder(), threads=1).version_dir
        # A sees CURRENT change and publishes it; B has not got the version yet, and keeps trying.
        assert wait_until(lambda: raw.get(key) == new.name.encode(), SWITCH_LIMIT_S) is not None
        time.sleep(2 * POLL_S)
        assert http_b.get("/readyz").json()["index"]["version"] == first
        shutil.copytree(new, copy / "versions" / new.name)  # the sync arrives; B's CURRENT still names the old one
        started = time.perf_counter()
        assert wait_until(lambda: http_b.get("/readyz").json()["index"]["version"] == new.name, 10.0) is not None
        print(f"\nreplica B switched {time.perf_counter() - started:.2f} s after the version reached its disk")
        for http in (http_a, http_b):
            assert top_ids(http, NEW_TITLE)[:1] == [NEW_ID]
        assert IndexLayout(copy).current().name == first  # B followed Redis, not its folder
        # Redis product stores: the new version's is filled, the old one's is on its way out.
        assert wait_until(lambda: raw.exists(f"vitrine:products:{new.name}:complete"), 10.0) is not None
        assert 0 < raw.ttl(f"vitrine:products:{first}") <= Settings().redis_old_store_ttl_s


def test_two_replicas_on_one_folder_and_one_redis_serve_a_cli_delete_within_5_s(tmp_path, redis_server):
    index_dir = build(tmp_path)
    common = {"redis_url": redis_server.url, "redis_timeout_s": 0.2, "redis_retry_s": 0.2}
    with serve(index_dir, **common) as a, serve(index_dir, **common) as b:
        urls = [a.url, b.url]
        for url in urls:
            assert httpx.get(f"{url}/products/103", timeout=10).status_code == 200
        started = time.perf_counter()
        version = delete_from_index(index_dir, ["103"]).version_dir.name
        for url in urls:
            assert wait_until(lambda url=url: httpx.get(f"{url}/products/103", timeout=10).status_code == 404, SWITCH_LIMIT_S) is not None
            assert httpx.get(f"{url}/readyz", timeout=10).json()["index"]["version"] == version
        print(f"\nboth replicas serve the delete {time.perf_counter() - started:.2f} s after it committed")


def test_without_polling_the_service_stays_on_its_version(tmp_path):
    index_dir = build(tmp_path)
    with serve(index_dir, index_poll_s=0) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        served = http.get("/readyz").json()["index"]["version"]
        delete_from_index(index_dir, ["100"])
        time.sleep(1.0)
        assert http.get("/readyz").json()["index"]["version"] == served and http.get("/products/100").status_code == 200


def test_an_injected_index_is_followed_but_never_closed_by_the_app(tmp_path):
    index_dir = build(tmp_path)
    with ProductIndex.open(index_dir) as injected:
        app = create_app(Settings(index_poll_s=0.2), index=injected, encoder=FixtureEncoder())
        with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=10) as http:
            delete_from_index(index_dir, ["100"])
            assert wait_until(lambda: http.get("/products/100").status_code == 404, SWITCH_LIMIT_S) is not None
        assert is_leased(injected.version_dir) and injected.get("100") is not None  # still the caller's to close


@pytest.mark.parametrize("keep", [1])
def test_the_follower_never_serves_a_damaged_current(tmp_path, keep):
    index_dir = build(tmp_path)
    with serve(index_dir, index_poll_s=0.2) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        served = http.get("/readyz").json()["index"]["version"]
        (index_dir / "CURRENT").write_text("../../etc/passwd\n")
        time.sleep(0.8)
        assert http.get("/readyz").json()["index"]["version"] == served
        assert http.post("/search/text", json={"query": "red tshirts"}).status_code == 200
        (index_dir / "CURRENT").write_text(served + "\n")
