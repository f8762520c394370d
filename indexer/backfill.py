"""Attribute backfill (KG-FLIP §5): predicted values for the attributes products lack, into a new index version.

`backfill_index` applies attribute heads (`vitrine.attributes.heads`) to the live version's stored
title and image vectors (no encoding) for every product missing one of the heads' fields, and writes
the predictions, each with its calibrated confidence, into the product store's `predicted_attributes`
table of a new version, switched to atomically as builds are. The catalog's own values are never
overwritten; filters read predictions only when a request sets `include_predicted`.

The new version shares the vector, Faiss and patch files of the previous one (hard links where the
file system allows, else copies): versions never change once written, so sharing is safe.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer.build import FILES, _live, _now, _publish
from indexer.layout import DEFAULT_KEEP_VERSIONS, IndexLayout
from indexer.manifest import MAX_HISTORY, IndexManifest, Operation, read_manifest, write_manifest
from indexer.store import SqliteProductStore
from vitrine.attributes.heads import AttributeHeads
from vitrine.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class BackfillResult:
    version: Path
    manifest: IndexManifest
    predicted: dict[str, int]  # field -> values written
    missing: dict[str, int]  # field -> products without a catalog value
    withheld: dict[str, int] = field(default_factory=dict)  # field -> predictions under the confidence floor

    def summary(self) -> str:
        parts = [f"{name} {self.predicted[name]:,}/{self.missing[name]:,}" for name in self.missing]
        return f"backfilled {sum(self.predicted.values()):,} values (predicted/missing: {', '.join(parts)}) -> {self.version}"


def _share(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def rewrite_store(out: str | Path, edit: Callable[[SqliteProductStore, Path, IndexManifest], dict], *, operation: str,
                  keep_versions: int = DEFAULT_KEEP_VERSIONS) -> tuple[Path, IndexManifest, dict]:  # fmt: skip
    """A new version whose store is the live one's after `edit(writable copy)`; every other file shared.

    `edit(store, folder, previous manifest)` may read the new version's other files in `folder`; it returns what it did (recorded in the manifest's operation). Runs under the index's writer lock."""
    start = time.perf_counter()
    layout = IndexLayout(out)
    _live(layout)
    with layout.lock():
        live = _live(layout)
        previous = read_manifest(live)
        with layout.staging() as staging:
            for role, name in previous.files.items():
                if role != "store":
                    _share(live / name, staging / name)
            with SqliteProductStore(live / FILES["store"]) as old, old.copy_to(staging / FILES["store"]) as store:
                done = edit(store, staging, previous)
            build = Operation(operation=operation, finished_at=_now(), seconds=round(time.perf_counter() - start, 3), **done)
            manifest = previous.model_copy(update={
                "created_at": _now(), "build": build, "errors": [],
                "history": [*previous.history, previous.build][-MAX_HISTORY:],
            })  # fmt: skip
            write_manifest(staging, manifest)
            final = _publish(layout, staging, keep_versions)
    return final, manifest, done


def backfill_index(
    out: str | Path,
    heads: AttributeHeads,
    *,
    min_confidence: float | dict[str, float] = 0.0,
    ids: Collection[str] | None = None,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
) -> BackfillResult:
    """Predict the heads' fields for products (all, or `ids`) that lack them; keep predictions whose
    confidence reaches `min_confidence` (one floor, or one per field). Earlier predictions are replaced."""
    floors = min_confidence if isinstance(min_confidence, dict) else dict.fromkeys(heads.fields, float(min_confidence))
    wanted = None if ids is None else set(ids)
    counts: dict[str, dict[str, int]] = {}

    def edit(store: SqliteProductStore, folder: Path, manifest: IndexManifest) -> dict:
        if manifest.bundle.fingerprint != heads.bundle_fingerprint:
            raise UserError(
                f"the heads were trained on bundle {heads.bundle_fingerprint}'s vectors, the index holds "
                f"{manifest.bundle.fingerprint}'s: train heads for this bundle"
            )
        if manifest.embed_dim != heads.embed_dim:
            raise UserError(f"the heads read {heads.embed_dim}-d vectors, the index holds {manifest.embed_dim}-d")
        store.clear_predicted()
        scanned = list(store.scan())
        labels = np.load(folder / FILES["labels"])
        rows = np.array([i for i, (_, r) in enumerate(scanned) if wanted is None or r.id in wanted], dtype=np.int64)
        missing = {name: [int(i) for i in rows if not scanned[i][1].attribute(name)] for name in heads.fields}
        need = np.array(sorted({i for m in missing.values() for i in m}), dtype=np.int64)
        assert all(int(labels[i]) == scanned[i][0] for i in need), "store and labels.npy disagree"
        predicted: dict[str, int] = {}
        withheld: dict[str, int] = {}
        writes: list[tuple[str, str, str, float]] = []
        if need.size:
            title = np.asarray(np.load(folder / FILES["text_vectors"], mmap_mode="r")[need])
            image = np.asarray(np.load(folder / FILES["image_vectors"], mmap_mode="r")[need])
            where = {int(row): j for j, row in enumerate(need)}
            by_field = heads.predict(title, image)
            for name, wanted_rows in missing.items():
                values, confidence = by_field[name]
                kept = [(scanned[i][1].id, values[where[i]], float(confidence[where[i]])) for i in wanted_rows]
                good = [k for k in kept if k[2] >= floors.get(name, 0.0)]
                writes += [(ident, name, value, conf) for ident, value, conf in good]
                predicted[name], withheld[name] = len(good), len(kept) - len(good)
        else:
            predicted = dict.fromkeys(heads.fields, 0)
            withheld = dict.fromkeys(heads.fields, 0)
        store.put_predicted(writes)
        counts.update(predicted=predicted, missing={k: len(v) for k, v in missing.items()}, withheld=withheld)
        return {"predicted": predicted, "products_in": int(rows.size)}

    final, manifest, _ = rewrite_store(out, edit, operation="backfill", keep_versions=keep_versions)
    return BackfillResult(final, manifest, counts["predicted"], counts["missing"], counts["withheld"])
