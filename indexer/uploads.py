"""Photos written over HTTP (`uploads/<sha256>.<ext>`, see `IndexLayout.store_upload`): which ones the
versions on disk refer to, and removing the others.

Versions never copy these files, and several versions share one, so a photo can go only once no
version on disk refers to it: its write failed, or the versions that held it were pruned (the
product was replaced or deleted). A photo is stored before the version that refers to it is
written, and the writer lock is only taken then, so an unreferenced photo may also belong to a
write in progress, in this process or another: such photos are removed only when they were not
touched for `min_age_s` (storing the same bytes again touches the file). A writer's own photos, those
of a write that has just committed or failed, are removed at once when no version refers to them
and nobody stored them again since.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from indexer.layout import UPLOADS_DIR, IndexLayout
from indexer.manifest import read_manifest
from indexer.store import SqliteProductStore

log = logging.getLogger(__name__)
DEFAULT_MIN_AGE_S = 3600.0  # far longer than a write waits for the writer lock and commits


@dataclass(frozen=True)
class StoredUpload:
    """A photo a writer stored, and its modification time just after: changed means stored again since."""

    path: Path
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> StoredUpload:
        return cls(path, path.stat().st_mtime_ns)


def referenced_uploads(layout: IndexLayout, cache: dict[str, frozenset[str]] | None = None) -> set[str]:
    """File names in `uploads/` that some version on disk refers to. Versions never change, so `cache`
    (version name -> names) spares reading a version's store twice; entries of pruned versions are dropped."""
    names: set[str] = set()
    versions = layout.finished_versions()
    for version in versions:
        if cache is None or version.name not in cache:
            # By name (content-addressed) in any folder called uploads: a copied or moved index keeps
            # the photos its versions name, rather than lose them to a path that differs.
            with SqliteProductStore(version / read_manifest(version).files["store"]) as store:
                found = frozenset(Path(p).name for p in store.file_image_paths(UPLOADS_DIR))
            if cache is None:
                names |= found
                continue
            cache[version.name] = found
        names |= cache[version.name]
    if cache is not None:
        for name in set(cache) - {v.name for v in versions}:
            del cache[name]
    return names


def clean_uploads(layout: IndexLayout, *, min_age_s: float = DEFAULT_MIN_AGE_S, own: Iterable[StoredUpload] = (),
                  cache: dict[str, frozenset[str]] | None = None) -> list[tuple[Path, int]]:  # fmt: skip
    """Remove the photos (and leftover temporary files) in `uploads/` that no version refers to and that
    are older than `min_age_s`, or are among `own` and unchanged since. Hold `layout.lock()`, so that no
    version is being written meanwhile. Returns (path, bytes) of each removed file."""
    if not layout.uploads.is_dir():
        return []
    keep = referenced_uploads(layout, cache)
    own_mtimes = {upload.path.name: upload.mtime_ns for upload in own}
    oldest_ns = time.time_ns() - int(min_age_s * 1e9)
    removed = []
    for entry in os.scandir(layout.uploads):
        if entry.name in keep or not entry.is_file(follow_symlinks=False):
            continue
        try:
            stat = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if own_mtimes.get(entry.name) == stat.st_mtime_ns or stat.st_mtime_ns < oldest_ns:
            Path(entry.path).unlink(missing_ok=True)
            removed.append((Path(entry.path), stat.st_size))
    if removed:
        log.info("removed %d upload(s) no index version refers to (%d bytes)", len(removed), sum(size for _, size in removed))
    return removed
