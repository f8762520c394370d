"""Live index updates and catalog writes, measured on a real index with two `vitrine serve` replicas.

    python3 bench/live_updates.py --index runs/demo/index --catalog ../shared/data/fashion-products \
        --work /tmp/vitrine-live --out bench/out

Copies the index's live version to --work (the source index is never written), starts a
redis-server and two `vitrine serve` replicas on 127.0.0.1 sharing the copy and the Redis, with a
write key, then, while a bounded read load runs against both replicas (text searches and product
reads, --requests in all):

1. `vitrine index --upsert` of one new product, then `vitrine index --delete` of an indexed one (the
   CLI, another process): seconds from the CURRENT switch to the new product found by its title,
   and the deleted one gone, on each replica;
2. HTTP writes to replica A: --puts sequential `PUT /products/{id}` (a catalog photo, base64),
   a `DELETE`, and a `POST /products:batch` (10 upserts + 5 deletes): seconds to the durable
   acknowledgement, and until replica B serves each;
3. a burst of --burst concurrent PUTs against a write queue of --queue: how many got 429, the
   Retry-After they were told, how fast a 429 came back, and how many versions the accepted ones made.

Every read must answer 200. Writes bench/out/live_updates.json and .md.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import environment, latency_stats, markdown_table, write_json  # noqa: E402
from indexer.layout import IndexLayout  # noqa: E402
from search.service.auth import key_digest  # noqa: E402
from tests.support.load import BoundedLoad, wait_until  # noqa: E402
from tests.support.redis_server import RedisServer, free_port  # noqa: E402

KEY = "bench-live-updates-write-key-0123456789"
SWITCH_LIMIT_S = 5.0


class Replica:
    def __init__(self, name: str, index: Path, redis_url: str, log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "w")  # noqa: SIM115 - held for the process's life
        command = [sys.executable, "-m", "vitrine.cli", "serve", "--index", str(index), "--host", "127.0.0.1",
                   "--port", str(self.port), "--redis-url", redis_url, "--log-level", "info"]  # fmt: skip
        full_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        if wait_until(lambda: self._ready(), timeout_s, poll_s=0.5) is None:
            raise RuntimeError(f"replica {self.name} not ready; see its log")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"replica {self.name} exited with {self.process.returncode}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def version(self) -> str:
        return httpx.get(f"{self.url}/readyz", timeout=10).json()["index"]["version"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def found(url: str, title: str, product_id: str) -> bool:
    response = httpx.post(f"{url}/search/text", json={"query": title, "k": 10, "rerank": False}, timeout=10)
    return product_id in [r["id"] for r in response.json()["results"]]


def gone(url: str, title: str, product_id: str) -> bool:
    return httpx.get(f"{url}/products/{product_id}", timeout=10).status_code == 404 and not found(url, title, product_id)


def seconds_until(condition, since: float, timeout_s: float = 60.0) -> float | None:
    """Seconds from `since` (a time.perf_counter()) until `condition()` holds, or None after `timeout_s`."""
    while time.perf_counter() - since < timeout_s:
        if condition():
            return time.perf_counter() - since
        time.sleep(0.02)
    return None


def on_each(replicas: list[Replica], condition, since: float) -> dict[str, float | None]:
    """`seconds_until` measured on every replica at once (each from the same `since`)."""
    with ThreadPoolExecutor(len(replicas)) as pool:
        futures = {r.name: pool.submit(seconds_until, lambda r=r: condition(r), since) for r in replicas}
        return {name: future.result() for name, future in futures.items()}


def wait_current_change(layout: IndexLayout, before: str, timeout_s: float = 600.0) -> tuple[str, float]:
    """(new CURRENT, time.perf_counter() when it was seen), polled every 5 ms."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        current = layout.current().name
        if current != before:
            return current, time.perf_counter()
        time.sleep(0.005)
    raise RuntimeError("CURRENT never changed")


def cli(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vitrine.cli", "index", *args], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--catalog", type=Path, required=True, help="products.jsonl folder: photos and titles to write")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (the index copy); emptied first")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--requests", type=int, default=3000, help="most reads of the load, all phases together (it stops when they end)")
    parser.add_argument("--puts", type=int, default=5)
    parser.add_argument("--burst", type=int, default=12)
    parser.add_argument("--queue", type=int, default=4)
    args = parser.parse_args()

    source = IndexLayout(args.index).current()
    shutil.rmtree(args.work, ignore_errors=True)
    index = args.work / "index"
    (index / "versions").mkdir(parents=True)
    shutil.copytree(source, index / "versions" / source.name)
    (index / "CURRENT").write_text(source.name + "\n")
    layout = IndexLayout(index)
    rows = [json.loads(line) for line in (args.catalog / "products.jsonl").read_text().splitlines()[:200]]
    photo = {row["id"]: (args.catalog / row["image"]).read_bytes() for row in rows if (args.catalog / row["image"]).is_file()}
    ids = [row["id"] for row in rows if row["id"] in photo]
    env = {"VITRINE_WRITE_KEYS": json.dumps({"bench": key_digest(KEY)}), "VITRINE_INDEX_POLL_S": "1",
           "VITRINE_WRITE_QUEUE_SIZE": str(args.queue), "VITRINE_WRITE_LOCK_WAIT_S": "600"}  # fmt: skip
    redis = RedisServer(workdir=args.work).start()
    replicas = [Replica(name, index, redis.url, args.work / f"replica-{name}.log", env) for name in ("a", "b")]
    report: dict[str, Any] = {"environment": environment(), "index": str(args.index), "version": source.name}
    try:
        for replica in replicas:
            replica.wait_ready()
        a, b = replicas
        report["products"] = httpx.get(f"{a.url}/readyz", timeout=10).json()["index"]["products"]
        loads = [BoundedLoad(r.url, requests=args.requests // 2, clients=2, ids=ids[100:110], max_s=3600, timeout_s=30,
                             pause_s=0.1) for r in replicas]  # fmt: skip
        for load in loads:
            load.start()

        # 1. the CLI writes a version; both replicas follow CURRENT
        new_id, new_title = "live-cli-1", "Zebra quilted vegan leather tote bag live edition"
        jsonl = args.work / "new.jsonl"
        jsonl.write_text(json.dumps({**rows[0], "id": new_id, "title": new_title,
                                     "image": str((args.catalog / rows[0]["image"]).absolute())}) + "\n")  # fmt: skip
        before = layout.current().name
        threading.Thread(target=lambda: report.update(cli_upsert_s=cli("--upsert", "--catalog", str(jsonl), "--out", str(index),
                                                                         "--threads", "1"))).start()  # fmt: skip
        _, switched = wait_current_change(layout, before)
        report["cli_upsert_found_s"] = on_each(replicas, lambda r: found(r.url, new_title, new_id), switched)
        deleted, deleted_title = ids[0], rows[0]["title"]
        before = layout.current().name
        threading.Thread(target=lambda: report.update(cli_delete_s=cli("--delete", deleted, "--out", str(index)))).start()
        _, switched = wait_current_change(layout, before)
        report["cli_delete_gone_s"] = on_each(replicas, lambda r: gone(r.url, deleted_title, deleted), switched)

        # 2. HTTP writes to A; B follows through Redis and CURRENT
        http = httpx.Client(base_url=a.url, timeout=600, headers={"Authorization": f"Bearer {KEY}"})
        put_s, put_seen_b = [], []
        for i in range(args.puts):
            source_id = ids[20 + i]
            title = f"Quilted zebra weekender bag number {i} http edition"
            started = time.perf_counter()
            response = http.put(f"/products/live-http-{i}", json={"title": title, "category": "Accessories",
                                                                  "subcategory": "Bags", "attributes": {"gender": "Women"},
                                                                  "image_base64": base64.b64encode(photo[source_id]).decode()})  # fmt: skip
            acked = time.perf_counter()
            put_s.append(acked - started)
            assert response.status_code == 200, response.text
            assert found(a.url, title, f"live-http-{i}"), "acknowledged but not served by A"
            put_seen_b.append(seconds_until(lambda title=title, i=i: found(b.url, title, f"live-http-{i}"), acked))
        report["http_put_ack_s"] = put_s
        report["http_put_seen_by_b_s"] = put_seen_b
        started = time.perf_counter()
        response = http.delete(f"/products/{ids[1]}")
        acked = time.perf_counter()
        report["http_delete_ack_s"] = acked - started
        assert response.status_code == 200, response.text
        report["http_delete_gone_b_s"] = seconds_until(lambda: gone(b.url, rows[1]["title"], ids[1]), acked)
        batch = {"upsert": [{"id": f"live-batch-{i}", "title": f"Batch zebra scarf {i}", "image_base64":
                             base64.b64encode(photo[ids[40 + i]]).decode()} for i in range(10)],
                 "delete": ids[2:7]}  # fmt: skip
        started = time.perf_counter()
        response = http.post("/products:batch", json=batch)
        report["http_batch_ack_s"] = time.perf_counter() - started
        assert response.status_code == 200, response.text

        # 3. a burst against a small queue
        def put(i: int) -> tuple[int, str | None, float, str | None]:
            started = time.perf_counter()
            answer = http.put(f"/products/live-burst-{i}", json={"title": f"Burst zebra belt {i}",
                                                                "image_base64": base64.b64encode(photo[ids[60 + i]]).decode()})  # fmt: skip
            version = answer.json().get("version") if answer.status_code == 200 else None
            return answer.status_code, answer.headers.get("retry-after"), time.perf_counter() - started, version

        with ThreadPoolExecutor(args.burst) as pool:
            burst = list(pool.map(put, range(args.burst)))
        report["burst"] = {
            "sent": args.burst, "queue": args.queue,
            "ok": sum(s == 200 for s, *_ in burst), "429": sum(s == 429 for s, *_ in burst),
            "other": sorted({s for s, *_ in burst} - {200, 429}),
            "retry_after_s": sorted({int(r) for s, r, *_ in burst if s == 429}),
            "429_answer_ms_max": max((t * 1000 for s, _, t, _ in burst if s == 429), default=None),
            "ok_ack_s_max": max((t for s, _, t, _ in burst if s == 200), default=None),
            "versions_for_ok": len({v for s, _, _, v in burst if s == 200}),
        }  # fmt: skip
        report["load_running_until_the_end"] = all(load.running for load in loads)
        for load in loads:
            load.stop()
        report["load"] = {
            "requests": sum(load.done for load in loads), "failed": sum(len(load.failures) for load in loads),
            "failures": [f for load in loads for f in load.failures][:10], "seconds": max(load.seconds for load in loads),
            "latency": latency_stats([t for load in loads for t in load.latencies_s]).as_dict(),
        }  # fmt: skip
        report["versions_on_disk"] = len(layout.finished_versions())
        metrics = httpx.get(f"{a.url}/metrics", timeout=10).text
        report["switch_seconds_a"] = [line for line in metrics.splitlines() if line.startswith("vitrine_index_switch_seconds_")]
        report["commit_seconds_a"] = [line for line in metrics.splitlines() if line.startswith("vitrine_write_commit_seconds_")]
    finally:
        for replica in replicas:
            replica.stop()
        redis.stop()
    write_json(args.out / "live_updates.json", report)
    rows_md = [
        ("reads under load (2 replicas)", (f"{report['load']['requests']} requests, {report['load']['failed']} failed, "
                                           f"p50 {report['load']['latency']['p50_ms']:.0f} ms, p99 {report['load']['latency']['p99_ms']:.0f} ms")),
        ("CLI upsert: CURRENT switch -> found (A, B)", json.dumps(report["cli_upsert_found_s"])),
        ("CLI delete: CURRENT switch -> gone (A, B)", json.dumps(report["cli_delete_gone_s"])),
        ("HTTP PUT: durable ack (s)", ", ".join(f"{s:.2f}" for s in report["http_put_ack_s"])),
        ("HTTP PUT: ack -> served by B (s)", ", ".join(f"{s:.2f}" for s in report["http_put_seen_by_b_s"])),
        ("HTTP DELETE ack / gone on B (s)", f"{report['http_delete_ack_s']:.2f} / {report['http_delete_gone_b_s']:.2f}"),
        ("HTTP batch (10 upserts + 5 deletes) ack (s)", f"{report['http_batch_ack_s']:.2f}"),
        ("burst", json.dumps(report["burst"])),
    ]  # fmt: skip
    (args.out / "live_updates.md").write_text(markdown_table(["what", "measured"], rows_md))
    print(json.dumps(report, indent=2, default=str))
    return 0 if report["load"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
