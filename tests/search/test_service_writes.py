"""Catalog writes over HTTP (issue 14, part 3): keys, durable acknowledgements, batches, the audit log,
the bounded write queue, and writes under load on two replicas sharing a Redis.

Bad input of every kind is in the bad-input table of test_service_api.py; here are the behaviours.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from indexer import ProductIndex
from indexer.layout import IndexLayout
from search.service import Settings, create_app
from search.service.auth import key_digest
from search.service.auth import main as new_key
from tests.support.indexes import FixtureEncoder, build_fixture_index
from tests.support.load import BoundedLoad, wait_until
from tests.support.service import LiveServer, jpeg_bytes

KEY = "test-write-key-0123456789abcdef"
READ_KEY = "test-read-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
RED, GREEN, BLUE = (200, 30, 30), (40, 140, 60), (40, 90, 200)


def b64(colour=RED) -> str:
    return base64.b64encode(jpeg_bytes(colour)).decode()


def product(title: str, colour=RED, **fields) -> dict:
    return {"title": title, "image_base64": b64(colour), **fields}


def settings_for(index_dir: Path, **overrides) -> Settings:
    return Settings(**{"index": index_dir, "write_keys": {"ci": key_digest(KEY)}, "index_poll_s": 0.5, **overrides})


@pytest.fixture
def index_dir(tmp_path: Path) -> Path:
    return build_fixture_index(tmp_path, n=16).index_dir


@pytest.fixture
def client(index_dir: Path):
    with TestClient(create_app(settings_for(index_dir), encoder=FixtureEncoder()), raise_server_exceptions=False) as test_client:
        yield test_client


def audit_lines(index_dir: Path) -> list[dict]:
    path = index_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def current(index_dir: Path) -> str:
    return IndexLayout(index_dir).current().name


# ---------------------------------------------------------------- keys


def test_writes_need_a_key_missing_is_401_wrong_is_403_and_reads_stay_open(client, index_dir):
    for method, path, kwargs in [("put", "/products/new1", {"json": product("Red top")}), ("delete", "/products/100", {}),
                                 ("post", "/products:batch", {"json": {"delete": ["100"]}})]:  # fmt: skip
        missing = getattr(client, method)(path, **kwargs)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key", missing.text
        assert missing.headers["www-authenticate"] == "Bearer"
        for header in (f"Bearer {KEY}x", "Bearer ", f"Basic {KEY}", KEY):
            wrong = getattr(client, method)(path, headers={"Authorization": header}, **kwargs)
            assert wrong.status_code in (401, 403) and wrong.headers["content-type"] == "application/json", (header, wrong.text)
        wrong = getattr(client, method)(path, headers={"Authorization": "Bearer not-the-key"}, **kwargs)
        assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert client.post("/search/text", json={"query": "red"}).status_code == 200  # reads need no key
    assert client.get("/products/100").status_code == 200 and client.get("/filters").status_code == 200
    assert "100" in ProductIndex.open(index_dir)  # nothing was written
    refused = audit_lines(index_dir)
    assert len(refused) == 3 * 2 and all(line["result"] == "forbidden" and line["key_id"] is None for line in refused)
    assert KEY not in (index_dir / "audit.jsonl").read_text() and "not-the-key" not in (index_dir / "audit.jsonl").read_text()


def test_reads_need_a_read_or_write_key_when_read_keys_are_set(index_dir):
    settings = settings_for(index_dir, read_keys={"shop": key_digest(READ_KEY)})
    with TestClient(create_app(settings, encoder=FixtureEncoder())) as client:
        assert client.post("/search/text", json={"query": "red"}).status_code == 401
        assert client.get("/products/100", headers={"Authorization": "Bearer nope"}).status_code == 403
        for key in (READ_KEY, KEY):
            headers = {"Authorization": f"Bearer {key}"}
            assert client.post("/search/text", json={"query": "red"}, headers=headers).status_code == 200
            assert client.get("/products/100/image", headers=headers).status_code == 200
        read_only = client.delete("/products/100", headers={"Authorization": f"Bearer {READ_KEY}"})
        assert read_only.status_code == 403  # a read key may not write
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200  # probes stay open
        security = client.get("/openapi.json").json()["paths"]["/search/text"]["post"]["security"]
        assert security == [{"ApiKey": []}]


def test_settings_store_digests_never_keys(capsys):
    with pytest.raises(ValueError, match="never the key"):
        Settings(write_keys={"ci": KEY})
    with pytest.raises(ValueError, match="API key id"):
        Settings(write_keys={"bad id!": key_digest(KEY)})
    assert new_key(["deploy"]) == 0
    out = capsys.readouterr().out
    key = out.split("): ")[1].split()[0]
    entry = json.loads(out.split("VITRINE_WRITE_KEYS='")[1].split("'")[0])
    assert Settings(write_keys=entry).write_keys == {"deploy": key_digest(key)}


# ---------------------------------------------------------------- writes


def test_put_json_and_multipart_and_delete_are_durable_when_acknowledged(client, index_dir):
    before = current(index_dir)
    added = client.put("/products/new-1", json=product("Women zebra quilted Handbags", RED, category="Bags",
                                                       attributes={"gender": "Women", "baseColour": "Red"}), headers=AUTH)  # fmt: skip
    assert added.status_code == 200, added.text
    body = added.json()
    assert body["results"] == [{"id": "new-1", "result": "added"}] and body["version"] != before
    assert body["version"] == current(index_dir)  # committed: CURRENT names it
    with ProductIndex.open(index_dir) as on_disk:  # a fresh reader sees it
        assert on_disk.get("new-1").title == "Women zebra quilted Handbags" and on_disk.get("new-1").category == "Bags"
    assert client.get("/readyz").json()["index"]["version"] == body["version"]  # and this replica serves it
    assert client.get("/products/new-1").json()["attributes"] == {"gender": "Women", "baseColour": "Red"}
    assert client.post("/search/text", json={"query": "zebra quilted handbags", "k": 1}).json()["results"][0]["id"] == "new-1"
    assert client.get("/products/new-1/image").headers["content-type"] == "image/jpeg"
    assert len(list((index_dir / "uploads").iterdir())) == 1

    same = client.put("/products/new-1", json=product("Women zebra quilted Handbags", RED, category="Bags",
                                                      attributes={"gender": "Women", "baseColour": "Red"}), headers=AUTH)  # fmt: skip
    assert same.json()["results"][0]["result"] == "unchanged" and same.json()["version"] == body["version"]  # no new version

    form = client.put("/products/new-1", headers=AUTH, files={"image": ("p.png", jpeg_bytes(BLUE), "image/jpeg")},
                      data={"title": "Women zebra quilted Handbags in blue", "attributes": '{"gender": "Women"}'})  # fmt: skip
    assert form.status_code == 200 and form.json()["results"][0]["result"] == "replaced", form.text
    assert client.get("/products/new-1").json()["title"].endswith("in blue")

    gone = client.delete("/products/new-1", headers=AUTH)
    assert gone.status_code == 200 and gone.json()["results"] == [{"id": "new-1", "result": "deleted"}]
    assert client.get("/products/new-1").status_code == 404 and "new-1" not in ProductIndex.open(index_dir)
    again = client.delete("/products/new-1", headers=AUTH)
    assert again.status_code == 404 and again.json()["error"]["code"] == "product_not_found"
    assert [(line["action"], line["result"], line["key_id"]) for line in audit_lines(index_dir)] == [
        ("put", "ok", "ci"), ("put", "ok", "ci"), ("put", "ok", "ci"), ("delete", "ok", "ci"), ("delete", "not_found", "ci")
    ]  # fmt: skip
    first = audit_lines(index_dir)[0]
    assert first["ids"] == ["new-1"] and first["changes"] == {"new-1": "added"} and first["version"] == body["version"]
    assert first["status"] == 200 and first["time"].endswith("+00:00")


def test_a_batch_is_one_version_and_a_bad_row_refuses_it_with_row_level_reasons(client, index_dir):
    before = current(index_dir)
    bad = client.post("/products:batch", headers=AUTH, json={
        "upsert": [product("Green zebra scarf", GREEN) | {"id": "g1"}, {"id": "g2", "title": " ", "image_base64": b64()},
                   {"id": "g3", "title": "Not a photo", "image_base64": base64.b64encode(b"plain text").decode()},
                   product("Twice", BLUE) | {"id": "g1"}, "not an object"],
        "delete": ["100", "no-such-id"],
    })  # fmt: skip
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_rows", bad.text
    locs = {tuple(d["loc"]): d["type"] for d in bad.json()["error"]["details"]}
    assert locs[("body", "upsert", 1, "title")] == "value_error"
    assert locs[("body", "upsert", 2, "image_base64")] == "unsupported_image"
    assert locs[("body", "upsert", 0, "id")] == locs[("body", "upsert", 3, "id")] == "duplicate_id"
    assert ("body", "upsert", 4) in locs
    assert current(index_dir) == before and "100" in ProductIndex.open(index_dir)  # nothing written, nothing lost

    unknown = client.post("/products:batch", headers=AUTH, json={"upsert": [product("Green zebra scarf", GREEN) | {"id": "g1"}],
                                                                  "delete": ["100", "no-such-id"]})  # fmt: skip
    assert unknown.status_code == 422 and unknown.json()["error"]["details"][0]["loc"] == ["body", "delete", 1]
    assert current(index_dir) == before and "g1" not in ProductIndex.open(index_dir)

    good = client.post("/products:batch", headers=AUTH, json={
        "upsert": [product("Green zebra scarf", GREEN) | {"id": "g1"}, product("Blue zebra cap", BLUE) | {"id": "g2"}],
        "delete": ["100", "101"],
    })  # fmt: skip
    assert good.status_code == 200, good.text
    assert good.json()["results"] == [{"id": "g1", "result": "added"}, {"id": "g2", "result": "added"},
                                      {"id": "100", "result": "deleted"}, {"id": "101", "result": "deleted"}]  # fmt: skip
    versions = [p.name for p in IndexLayout(index_dir).finished_versions()]
    assert good.json()["version"] == current(index_dir) and versions[-2] == before  # one new version for the whole batch
    with ProductIndex.open(index_dir) as after:
        assert len(after) == 16 and {"g1", "g2"} <= set(after.ids()) and "100" not in after
        assert after.manifest["build"]["operation"] == "update"
    empty = client.post("/products:batch", headers=AUTH, json={})
    assert empty.status_code == 200 and empty.json()["results"] == [] and empty.json()["version"] == current(index_dir)


def hold_writer_lock(index_dir: Path) -> tuple[threading.Event, threading.Thread]:
    """Another process's writer (a CLI upsert) holding the index's lock until the event is set."""
    release, held = threading.Event(), threading.Event()

    def hold() -> None:
        with IndexLayout(index_dir).lock():
            held.set()
            release.wait(60)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert held.wait(10)
    return release, thread


def test_a_full_write_queue_answers_429_with_retry_after_and_the_queued_writes_then_commit_together(index_dir):
    settings = settings_for(index_dir, write_queue_size=3, write_lock_wait_s=60)
    app = create_app(settings, encoder=FixtureEncoder())
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as http:
        before = current(index_dir)
        release, holder = hold_writer_lock(index_dir)
        with ThreadPoolExecutor(3) as pool:
            queued = [pool.submit(http.put, f"/products/q{i}", json=product(f"Queued zebra item {i}")) for i in range(3)]
            assert wait_until(lambda: 'vitrine_write_queue 3.0' in http.get("/metrics").text, 10.0) is not None
            started = time.perf_counter()
            full = http.put("/products/q9", json=product("One too many"))
            refused_s = time.perf_counter() - started
            assert full.status_code == 429 and full.json()["error"]["code"] == "write_queue_full", full.text
            assert int(full.headers["retry-after"]) >= 1
            assert http.delete("/products/100").status_code == 429
            release.set()
            answers = [future.result(timeout=60) for future in queued]
        holder.join(10)
        assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
        versions = {a.json()["version"] for a in answers}
        # Queued writes are committed together: three writes make two versions (the first one was taken
        # alone while the others were still on their way) or one.
        assert len(versions) <= 2 and before not in versions
        assert http.put("/products/q9", json=product("One too many")).status_code == 200  # room again
    print(f"\n429 answered in {refused_s * 1000:.1f} ms with Retry-After {full.headers['retry-after']} s")
    assert refused_s < 1.0
    assert [line["result"] for line in audit_lines(index_dir)].count("queue_full") == 2


def test_another_writer_holding_the_index_too_long_gives_503_and_changes_nothing(index_dir):
    with TestClient(create_app(settings_for(index_dir, write_lock_wait_s=0.5), encoder=FixtureEncoder())) as client:
        release, holder = hold_writer_lock(index_dir)
        try:
            busy = client.put("/products/b1", json=product("Busy zebra"), headers=AUTH)
        finally:
            release.set()
            holder.join(10)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "index_busy" and busy.headers["retry-after"]
        assert "b1" not in ProductIndex.open(index_dir)
        assert client.put("/products/b1", json=product("Busy zebra"), headers=AUTH).status_code == 200


def test_a_write_the_indexer_refuses_fails_alone_and_the_rest_of_its_group_commits(index_dir):
    """Writes queued behind a busy index are committed as one group; the indexer refuses one of them
    (an id to delete that is not there): that write gets 404, the others are committed without it."""
    app = create_app(settings_for(index_dir, write_lock_wait_s=60), encoder=FixtureEncoder())
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as http:
        release, holder = hold_writer_lock(index_dir)
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(http.put, "/products/ok0", json=product("First zebra"))  # taken alone, waits for the lock
            assert wait_until(lambda: 'vitrine_write_queue 1.0' in http.get("/metrics").text, 10.0) is not None
            group = [pool.submit(http.put, "/products/ok1", json=product("Fine zebra")),
                     pool.submit(http.delete, "/products/no-such-id"), pool.submit(http.delete, "/products/103")]  # fmt: skip
            assert wait_until(lambda: 'vitrine_write_queue 4.0' in http.get("/metrics").text, 10.0) is not None
            release.set()
            holder.join(10)
            answers = [first.result(60)] + [w.result(60) for w in group]
    assert [a.status_code for a in answers] == [200, 200, 404, 200], [a.text for a in answers]
    assert answers[1].json()["version"] == answers[3].json()["version"] != answers[0].json()["version"]
    with ProductIndex.open(index_dir) as after:
        assert {"ok0", "ok1"} <= set(after.ids()) and "103" not in after and len(after) == 17


# ---------------------------------------------------------------- under load, two replicas


def test_writes_under_load_on_two_replicas_sharing_redis(tmp_path, redis_server):
    index_dir = build_fixture_index(tmp_path, n=24).index_dir
    common = {"redis_url": redis_server.url, "redis_timeout_s": 0.2, "redis_retry_s": 0.2}
    a = LiveServer(create_app(settings_for(index_dir, **common), encoder=FixtureEncoder()))
    b = LiveServer(create_app(settings_for(index_dir, **common), encoder=FixtureEncoder()))
    with a, b, httpx.Client(base_url=a.url, timeout=30, headers=AUTH) as writer, \
            httpx.Client(base_url=b.url, timeout=30) as reader:  # fmt: skip
        loads = [BoundedLoad(a.url, requests=150, clients=2, ids=["110", "111"], pause_s=0.02),
                 BoundedLoad(b.url, requests=150, clients=2, ids=["112", "113"], pause_s=0.02)]  # fmt: skip
        for load in loads:
            load.start()
        time.sleep(0.3)
        started = time.perf_counter()
        put = writer.put("/products/live-1", json=product("Women zebra quilted Handbags", RED))
        put_ms = (time.perf_counter() - started) * 1000
        assert put.status_code == 200, put.text
        assert writer.post("/search/text", json={"query": "zebra quilted handbags", "k": 1}).json()["results"][0]["id"] == "live-1"
        seen_b = wait_until(lambda: reader.get("/products/live-1").status_code == 200, 5.0)
        started = time.perf_counter()
        deleted = writer.delete("/products/105")
        delete_ms = (time.perf_counter() - started) * 1000
        assert deleted.status_code == 200, deleted.text
        gone_b = wait_until(lambda: reader.get("/products/105").status_code == 404, 5.0)
        assert all(load.running for load in loads)
        for load in loads:
            load.wait()
    done, failed = sum(load.done for load in loads), [f for load in loads for f in load.failures]
    print(f"\nwrites under load: {done} reads on 2 replicas, {len(failed)} failed; PUT acked in {put_ms:.0f} ms, "
          f"DELETE in {delete_ms:.0f} ms; replica B served the PUT {seen_b} s and the DELETE {gone_b} s after the ack")  # fmt: skip
    assert failed == [] and done == 300
    assert seen_b is not None and gone_b is not None


# ---------------------------------------------------------------- uploads/


def upload_names(index_dir: Path) -> set[str]:
    return {path.name for path in (index_dir / "uploads").iterdir()}


def photo_name(colour) -> str:
    return hashlib.sha256(jpeg_bytes(colour)).hexdigest() + ".jpg"


def test_photos_of_failed_writes_are_removed_and_committed_ones_kept(index_dir):
    """A write that fails (the index busy) leaves no photo behind, whether its clean-up ran at once or
    was put off to the next write (the lock was still held); the committed write's photo stays."""
    with TestClient(create_app(settings_for(index_dir, write_lock_wait_s=0.5), encoder=FixtureEncoder())) as client:
        release, holder = hold_writer_lock(index_dir)
        try:
            busy = client.put("/products/b1", json=product("Busy zebra", GREEN), headers=AUTH)
        finally:
            release.set()
            holder.join(10)
        assert busy.status_code == 503
        assert client.put("/products/b2", json=product("Fine zebra", RED), headers=AUTH).status_code == 200
        assert wait_until(lambda: upload_names(index_dir) == {photo_name(RED)}, 10.0) is not None, upload_names(index_dir)
        assert client.get("/products/b2/image").status_code == 200


def test_photos_of_replaced_products_go_once_no_version_holds_them_and_young_orphans_stay(index_dir):
    """A replaced product's photo stays while a kept version refers to it; once pruned away it goes after
    the age limit (an unreferenced young photo may be another writer's, still on its way)."""
    uploads = index_dir / "uploads"
    with TestClient(create_app(settings_for(index_dir), encoder=FixtureEncoder())) as client:
        def put(id, colour):
            answer = client.put(f"/products/{id}", json=product(f"Zebra {id}", colour), headers=AUTH)
            assert answer.status_code == 200, answer.text

        put("p1", RED)
        put("p1", BLUE)  # the version before still refers to the red photo
        assert upload_names(index_dir) == {photo_name(RED), photo_name(BLUE)}
        put("p2", GREEN)  # the red version is pruned (2 are kept), but its photo is young
        assert photo_name(RED) in upload_names(index_dir)
        hour_ago = time.time() - 2 * 3600
        os.utime(uploads / photo_name(RED), (hour_ago, hour_ago))
        (uploads / "another-writers-photo.jpg").write_bytes(b"on its way")
        (uploads / "killed.jpg.123.456.tmp").write_bytes(b"half")
        os.utime(uploads / "killed.jpg.123.456.tmp", (hour_ago, hour_ago))
        gone = client.delete("/products/p2", headers=AUTH)
        assert gone.status_code == 200
        expected = {photo_name(BLUE), photo_name(GREEN), "another-writers-photo.jpg"}  # green: the version before
        assert wait_until(lambda: upload_names(index_dir) == expected, 10.0) is not None, upload_names(index_dir)
        assert client.get("/products/p1/image").status_code == 200
