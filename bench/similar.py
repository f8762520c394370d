"""Latency of "more like this" (GET /products/{id}/similar) and of facet counts, side by side.

    python3 bench/similar.py --index runs/demo/index [--bundle runs/demo/bundle] [--n 200] [--out bench/out]

The service runs in this process (FastAPI TestClient, one client, sequential requests), so the
figures are the app's own latency without a network hop. Every phase takes turns on the same inputs
(`bench.common.time_interleaved`), which spreads a shared machine's background load evenly:

- similar: GET /products/{id}/similar?k=K for random catalog products; with a filter (the product's
  own gender); with facets;
- photo: the same products' photos uploaded to POST /search/image (JPEG, as a shopper's upload),
  i.e. what "more like this" would cost if it re-encoded the photo instead of reading the stored vector;
- text and text+facets: POST /search/text with other products' titles, rerank off, and the
  query-embedding cache off (VITRINE_CACHE_SIZE=0) so both phases encode every query.

Facets are the catalog's filter fields (--facets). Writes bench/out/similar.json and similar.md.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import environment, latency_stats, markdown_table, time_interleaved, write_json  # noqa: E402

DEFAULT_FACETS = ["baseColour", "gender", "articleType", "usage", "season"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, default=None, help="default: the bundle the index records")
    parser.add_argument("--n", type=int, default=200, help="products (and text queries) per phase")
    parser.add_argument("--k", type=int, default=24)
    parser.add_argument("--facets", nargs="+", default=DEFAULT_FACETS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args(argv)

    from fastapi.testclient import TestClient

    from search.service import Settings, create_app

    settings = Settings(index=args.index, bundle=args.bundle, cache_size=0, rerank_default=False, index_poll_s=0)
    app = create_app(settings)
    with TestClient(app) as client:
        engine = app.state.engine
        ids = engine.index.ids()
        rng = random.Random(args.seed)
        products = rng.sample(ids, args.n)
        queries = [record.title for record in engine.index.get_many(rng.sample(ids, args.n))]
        records = {r.id: r for r in engine.index.get_many(products)}
        photos = {}
        for pid in products:
            out = io.BytesIO()
            engine.index.open_image(pid).convert("RGB").save(out, "JPEG", quality=90)
            photos[pid] = out.getvalue()
        facets = args.facets
        server_ms: dict[str, list[float]] = {}
        stages: dict[str, list[dict[str, float]]] = {}

        def call(name: str, send):
            response = send()
            assert response.status_code == 200, (name, response.status_code, response.text[:300])
            body = response.json()
            server_ms.setdefault(name, []).append(body["took_ms"])
            stages.setdefault(name, []).append(body["timings_ms"])
            return body

        def similar(pid: str, **params):
            return lambda: client.get(f"/products/{pid}/similar", params={"k": args.k, "timing": "true", **params})

        phases = {
            "similar": lambda i: call("similar", similar(products[i])),
            "similar + filter": lambda i: call("similar + filter", similar(
                products[i], filters=json.dumps({"gender": records[products[i]].attribute("gender") or "Women"}))),
            "similar + facets": lambda i: call("similar + facets", similar(products[i], facets=facets)),
            "photo upload (re-encodes)": lambda i: call("photo upload (re-encodes)", lambda: client.post(
                "/search/image", files={"image": ("q.jpg", photos[products[i]], "image/jpeg")}, data={"k": str(args.k), "timing": "true"})),
            "text": lambda i: call("text", lambda: client.post("/search/text", json={"query": queries[i], "k": args.k, "timing": True})),
            "text + facets": lambda i: call("text + facets", lambda: client.post(
                "/search/text", json={"query": queries[i], "k": args.k, "facets": facets, "timing": True})),
        }  # fmt: skip
        # How close "more like this" is to uploading the product's photo (a JPEG re-encoding of it, so
        # the embedding differs a little from the stored one): overlap of the top k, the product left out.
        overlaps = []
        checked = min(50, args.n)
        for pid in products[:checked]:
            got = {r["id"] for r in similar(pid)().json()["results"]}
            photo = client.post("/search/image", files={"image": ("q.jpg", photos[pid], "image/jpeg")}, data={"k": str(args.k + 1)})
            expected = {r["id"] for r in photo.json()["results"] if r["id"] != pid}
            overlaps.append(len(got & expected) / args.k)
        overlap = float(np.mean(overlaps))
        times = time_interleaved(phases, range(args.n), warmup=3)
        facet_sizes = [sum(len(v) for v in phases["similar + facets"](i)["facets"].values()) for i in range(3)]

    rows, report = [], {}
    for name, seconds in times.items():
        stats = latency_stats(seconds)
        server = float(np.mean(server_ms[name][-args.n :]))
        timed = stages[name][-args.n :]
        stage_means = {stage: float(np.mean([t.get(stage, 0.0) for t in timed])) for stage in timed[0] if stage != "total"}
        report[name] = {"client": stats.as_dict(), "server_mean_ms": server, "stages_mean_ms": stage_means}
        breakdown = ", ".join(f"{stage} {ms:.2f}" for stage, ms in stage_means.items())
        rows.append([name, stats.n, stats.p50_ms, stats.p90_ms, stats.p99_ms, server, breakdown])
    p50 = {name: report[name]["client"]["p50_ms"] for name in report}
    ratios = {
        "similar / photo upload": p50["similar"] / p50["photo upload (re-encodes)"],
        "similar + facets / similar": p50["similar + facets"] / p50["similar"],
        "text + facets / text": p50["text + facets"] / p50["text"],
    }
    result = {
        "environment": environment(), "index": str(args.index), "products": len(ids), "k": args.k, "n": args.n,
        "facets": facets, "facet_top_n": settings.facet_top_n, "phases": report, "p50_ratios": ratios,
        "similar_overlap_with_photo_upload_at_k": overlap, "overlap_checked": checked, "facet_values_returned": facet_sizes,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "similar.json", result)
    table = markdown_table(["phase", "requests", "p50 ms", "p90 ms", "p99 ms", "server took_ms (mean)", "server stages (mean ms)"], rows)
    ratio_table = markdown_table(["p50 ratio (same run, interleaved)", "value"], [[k, v] for k, v in ratios.items()])
    (args.out / "similar.md").write_text(
        f"{table}\n{ratio_table}\n- top-{args.k} overlap of \"more like this\" with uploading the product's photo "
        f"(JPEG, minus the product), {checked} products: {overlap:.3f}\n",
        encoding="utf-8",
    )
    print(table + "\n" + ratio_table)
    print(f"top-{args.k} overlap with the photo upload: {overlap:.3f} over {checked} products")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
