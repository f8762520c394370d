"""Attribute backfill on the real catalog (issue 15 part 2, KG-FLIP §5).

1. Heads per view (image, title, both) on the index's stored vectors, trained on train, chosen and
   temperature-calibrated on val, scored on test: accuracy, ECE before/after, R@P90.
2. Backfill: a copy of the index, 30 % of the test products' attribute values hidden (seeded), then
   `backfill_index` with the "both" heads (all predictions, and only those above val's P90 floor).
   Filter recall over the test products, without and with include_predicted, and its precision.

Heads are cached under --runs (delete them to retrain). The index is only read.

    PYTHONPATH=$PWD python bench/attributes.py --catalog ../shared/data/fashion-products --index runs/demo/index
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json, write_markdown_table  # noqa: E402

from indexer.backfill import _share, backfill_index, rewrite_store  # noqa: E402
from indexer.layout import IndexLayout  # noqa: E402
from indexer.manifest import read_manifest  # noqa: E402
from indexer.product_index import ProductIndex  # noqa: E402
from indexer.store import StoredProduct  # noqa: E402
from vitrine.attributes import ATTRIBUTE_FIELDS, VIEWS  # noqa: E402
from vitrine.attributes.data import AttributeData  # noqa: E402
from vitrine.attributes.evaluate import evaluate_heads  # noqa: E402
from vitrine.attributes.heads import AttributeHeads  # noqa: E402
from vitrine.attributes.train import train_heads  # noqa: E402
from vitrine.catalog.registry import read_catalog  # noqa: E402

EXAMPLE_FILTERS = (
    {"gender": "Men"}, {"articleType": "Tshirts"}, {"baseColour": "Black"}, {"usage": "Casual"},
    {"season": "Summer"}, {"gender": "Men", "articleType": "Tshirts"}, {"gender": "Women", "baseColour": "Blue"},
)  # fmt: skip


def copy_live_version(index: Path, target: Path) -> Path:
    """target/ as an index whose only version is `index`'s live one (files shared or copied)."""
    live = IndexLayout(index).resolve()
    if target.exists():
        shutil.rmtree(target)
    version = target / "versions" / live.name
    version.mkdir(parents=True)
    for name in [*read_manifest(live).files.values(), "manifest.json"]:
        _share(live / name, version / name)
    (target / "CURRENT").write_text(live.name + "\n")
    return target


def hide_values(index: Path, ids: list[str], fraction: float, seed: int) -> dict[str, dict[str, str]]:
    """Remove `fraction` of the (product, field) values of `ids` in a new version; returns what was hidden."""
    rng = np.random.default_rng(seed)
    hidden: dict[str, dict[str, str]] = {}

    def edit(store, folder, previous) -> dict:
        hashes = store.content_hashes()
        changed = []
        for record in store.get_many(ids):
            drop = [f for f in ATTRIBUTE_FIELDS if record.attributes.get(f) and rng.random() < fraction]
            if drop:
                hidden[record.id] = {f: record.attributes.pop(f) for f in drop}
                changed.append(StoredProduct(record, store.image_ref(record.id), hashes[record.id]))
        store.put_many(changed)
        return {"replaced": len(changed)}

    rewrite_store(index, edit, operation="update")
    return hidden


def filter_recall(index: ProductIndex, truth: dict[str, dict[str, str]], test_ids: list[str], filters: dict,
                  include_predicted: bool, among: set[str] | None = None) -> tuple[int, int, int]:  # fmt: skip
    """(truly matching, returned, returned and truly matching) over the test products (or `among`)."""
    ids = index.ids()
    mask = index.filter_mask(filters, include_predicted=include_predicted)
    scope = among if among is not None else set(test_ids)
    returned = {ids[i] for i in np.flatnonzero(mask)} & scope
    wanted = {i for i in scope if all(truth[i].get(f, "").lower() == v.lower() for f, v in filters.items())}
    return len(wanted), len(returned), len(returned & wanted)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", type=Path, default=Path("../shared/data/fashion-products"))
    ap.add_argument("--index", type=Path, required=True, help="index of the catalog, built with the bundle (read only)")
    ap.add_argument("--runs", type=Path, default=Path("runs/attributes"))
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/out/attributes"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    products = read_catalog(args.catalog).products
    truth = {p.id: {f: p.attribute(f) for f in ATTRIBUTE_FIELDS} for p in products}
    with ProductIndex.open(args.index) as index:
        title, image = index.vectors([p.id for p in products])
        fingerprint = index.bundle_fingerprint
    data = AttributeData.from_products(products, ATTRIBUTE_FIELDS, title, image)
    test = data.split("test")
    report: dict = {"environment": environment(), "catalog": str(args.catalog), "index": str(args.index), "views": {}}

    # ---- heads per view
    rows = []
    for view in VIEWS:
        folder = args.runs / "heads" / view
        start = time.perf_counter()
        if not (folder / "heads.json").is_file():
            train_heads(data, view=view, fields=ATTRIBUTE_FIELDS, bundle_fingerprint=fingerprint).save(folder)
        heads = AttributeHeads.load(folder)
        scores = evaluate_heads(heads, test)
        report["views"][view] = {"seconds": round(time.perf_counter() - start, 1), "fields": scores,
                                 "heads": {f: h.info for f, h in heads.heads.items()}}  # fmt: skip
        for name, row in scores.items():
            raw, cal = row["raw"], row["calibrated"]
            rows.append([view, name, row["products"], f"{cal['accuracy']:.3f}", f"{cal['r@p90']['recall']:.3f}",
                         f"{cal['r@p90']['coverage']:.3f}", f"{raw['ece']:.4f}", f"{cal['ece']:.4f}",
                         f"{raw['nll']:.3f}", f"{cal['nll']:.3f}", f"{row['temperature']:.2f}"])  # fmt: skip
    headers = ["view", "attribute", "test products", "accuracy", "R@P90", "coverage@P90", "ECE raw", "ECE calibrated",
               "NLL raw", "NLL calibrated", "T"]  # fmt: skip
    write_markdown_table(args.out / "heads.md", headers, rows, title="Attribute heads on test")

    # ---- backfill of hidden test values
    test_ids = list(test.ids)
    work = copy_live_version(args.index, args.runs / "index")
    hidden = hide_values(work, test_ids, args.fraction, args.seed)
    hidden_pairs = sum(len(v) for v in hidden.values())
    heads = AttributeHeads.load(args.runs / "heads" / "both")
    backfill_rows = []
    report["backfill"] = {"hidden_values": hidden_pairs, "test_products": len(test_ids),
                          "products_with_hidden": len(hidden), "runs": {}}  # fmt: skip
    for label, floor in (("all predictions", 0.0), ("val P90 floor", "p90")):
        if floor == "p90":
            floor = {f: (h.info["val_thresholds"]["0.9"] if h.info["val_thresholds"]["0.9"] is not None else float("inf"))
                     for f, h in heads.heads.items()}  # fmt: skip
        result = backfill_index(work, heads, min_confidence=floor)
        run = {"predicted": result.predicted, "missing": result.missing, "filters": {}}
        with ProductIndex.open(work) as index:
            per_field = [{f: v} for f in ATTRIBUTE_FIELDS for v in sorted({truth[i][f] for i in test_ids} - {""})]
            for scope_name, among in (("test", None), ("hidden", {i for i in hidden})):
                for group, filter_list in (("micro (every value of each field)", None), ("examples", EXAMPLE_FILTERS)):
                    if filter_list is None:
                        for field in ATTRIBUTE_FIELDS:
                            tot = np.zeros((2, 3), int)
                            sub = [f for f in per_field if field in f]
                            if among is not None:
                                sub_among = {i for i in among if field in hidden[i]}
                            else:
                                sub_among = None
                            for f in sub:
                                for j, inc in enumerate((False, True)):
                                    tot[j] += filter_recall(index, truth, test_ids, f, inc, sub_among)
                            backfill_rows.append(_row(label, scope_name, f"{field}=* ({len(sub)} values)", tot))
                            run["filters"][f"{scope_name}:{field}=*"] = tot.tolist()
                    else:
                        for f in filter_list:
                            sub_among = None if among is None else {i for i in among if any(k in hidden[i] for k in f)}
                            tot = np.array([filter_recall(index, truth, test_ids, f, inc, sub_among) for inc in (False, True)])
                            name = ", ".join(f"{k}={v}" for k, v in f.items())
                            backfill_rows.append(_row(label, scope_name, name, tot))
                            run["filters"][f"{scope_name}:{name}"] = tot.tolist()
        report["backfill"]["runs"][label] = run
    write_markdown_table(
        args.out / "backfill.md",
        ["predictions", "products", "filter", "truly matching", "recall without", "recall with", "precision without", "precision with"],
        backfill_rows, title=f"Filter recall on test, {args.fraction:.0%} of the values hidden (seed {args.seed})",
    )  # fmt: skip
    write_json(args.out / "attributes.json", report)
    print((args.out / "heads.md").read_text())
    print((args.out / "backfill.md").read_text())
    return 0


def _row(label: str, scope: str, name: str, tot: np.ndarray) -> list:
    (wanted, ret0, hit0), (_, ret1, hit1) = tot.tolist()

    def ratio(a: int, b: int) -> str:
        return f"{a / b:.3f}" if b else "-"

    return [label, scope, name, wanted, ratio(hit0, wanted), ratio(hit1, wanted), ratio(hit0, ret0), ratio(hit1, ret1)]


if __name__ == "__main__":
    sys.exit(main())
