"""The index directory: immutable versions and an atomically switched CURRENT pointer.

    I/
      CURRENT                      the name of the live version, replaced with os.replace
      versions/<name>/             one complete index (manifest, vectors, Faiss indexes, store)
      versions/<name>.partial/     a version being written; never read
      .lock                        held (flock) by whoever writes a new version

A build writes a whole new version beside the live one and only then switches
CURRENT, so a build that dies halfway leaves readers on the previous version.
Old versions are pruned after a successful switch (the previous one is kept, so a
reader that resolved CURRENT just before the switch can still open it).
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vitrine.errors import UserError

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
LOCK_FILE = ".lock"
MANIFEST_FILE = "manifest.json"
PARTIAL_SUFFIX = ".partial"
DEFAULT_KEEP_VERSIONS = 2
_VERSION_NAME = re.compile(r"^[0-9]{8}T[0-9]{12}Z(-[0-9]+)?$")


class IndexNotFoundError(UserError):
    """The path holds no Vitrine index."""


class IndexBusyError(UserError):
    """Another process is writing a new version of this index."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` and the folders themselves, so a crash cannot leave a torn version."""
    for child in sorted(path.rglob("*")):
        if child.is_file():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
    for folder in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        _fsync_dir(folder)


class IndexLayout:
    """Where the versions of one index live, and how the live one is chosen."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()

    @property
    def versions(self) -> Path:
        return self.root / VERSIONS_DIR

    def is_index(self) -> bool:
        return (self.root / CURRENT_FILE).is_file()

    def current(self) -> Path | None:
        """The live version folder, or None when CURRENT does not exist yet."""
        pointer = self.root / CURRENT_FILE
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if not _VERSION_NAME.match(name):
            raise UserError(f"{pointer} is damaged: {name[:60]!r} is not a version name")
        path = self.versions / name
        if not (path / MANIFEST_FILE).is_file():
            raise UserError(f"{pointer} names version {name}, which is missing or incomplete")
        return path

    def resolve(self) -> Path:
        """The version folder to read: CURRENT's, or the folder itself when it is a bare version."""
        current = self.current()
        if current is not None:
            return current
        if (self.root / MANIFEST_FILE).is_file():
            return self.root
        if not self.root.exists():
            raise IndexNotFoundError(f"index not found: {self.root}")
        raise IndexNotFoundError(f"{self.root} is not a Vitrine index (no {CURRENT_FILE} file); build one with `vitrine index`")

    def finished_versions(self) -> list[Path]:
        """Complete version folders, oldest first (names sort by time)."""
        if not self.versions.is_dir():
            return []
        return sorted(p for p in self.versions.iterdir() if p.is_dir() and _VERSION_NAME.match(p.name))

    # ------------------------------------------------------------ writing

    def check_writable_target(self) -> None:
        """Refuse to turn a folder holding other things into an index."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{self.root} exists and is not a folder")
        if self.root.is_dir() and not self.is_index():
            others = [p.name for p in self.root.iterdir() if p.name not in (VERSIONS_DIR, LOCK_FILE)]
            if others:
                raise UserError(
                    f"{self.root} is not empty and not a Vitrine index (it holds {', '.join(sorted(others)[:3])}...); "
                    "choose a new or empty folder"
                )

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive writer lock; a second writer fails at once rather than waiting or racing."""
        self.root.mkdir(parents=True, exist_ok=True)
        fh = open(self.root / LOCK_FILE, "a+")
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise IndexBusyError(f"another process is writing to the index {self.root}; try again when it finishes") from None
                raise
            yield
        finally:
            fh.close()  # releases the lock

    def _new_name(self) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time_ns() // 1000 % 1_000_000:06d}Z"
        name, n = stamp, 0
        while (self.versions / name).exists() or (self.versions / f"{name}{PARTIAL_SUFFIX}").exists():
            n += 1
            name = f"{stamp}-{n}"
        return name

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh `versions/<name>.partial` folder to write into; removed if the block raises.

        Call `commit` with it inside the block to publish it. Hold `lock()` around both.
        """
        self.versions.mkdir(parents=True, exist_ok=True)
        path = self.versions / f"{self._new_name()}{PARTIAL_SUFFIX}"
        path.mkdir()
        try:
            yield path
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise

    def commit(self, staging: Path) -> Path:
        """Publish a fully written staging folder: rename it final, then switch CURRENT to it atomically."""
        assert staging.name.endswith(PARTIAL_SUFFIX) and staging.parent == self.versions, staging
        final = staging.with_name(staging.name[: -len(PARTIAL_SUFFIX)])
        fsync_tree(staging)
        os.rename(staging, final)
        _fsync_dir(self.versions)
        tmp = self.root / f"{CURRENT_FILE}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(final.name + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / CURRENT_FILE)
        _fsync_dir(self.root)
        return final

    def prune(self, keep: int = DEFAULT_KEEP_VERSIONS) -> list[Path]:
        """Delete all but the newest `keep` versions (never the live one) and leftover partial folders."""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        current = self.current()
        removed = []
        finished = self.finished_versions()
        for path in finished[: max(0, len(finished) - keep)]:
            if path != current:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        if self.versions.is_dir():
            for path in self.versions.glob(f"*{PARTIAL_SUFFIX}"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed
