"""The index directory: immutable versions and an atomically switched CURRENT pointer.

    I/
      CURRENT                      the name of the live version, replaced with os.replace
      versions/<name>/             one complete index (manifest, vectors, Faiss indexes, store)
      versions/<name>.partial/     a version being written; never read
      .lock                        held (flock) by whoever writes a new version
      uploads/<sha256>.<ext>       images written over HTTP (`store_upload`), shared by all versions;
                                   those no version refers to are removed by `indexer.uploads`

A build writes a whole new version beside the live one and only then switches
CURRENT, so a build that dies halfway leaves readers on the previous version. A
writer killed halfway leaves its `.partial` folder behind: the next writer removes
it when it takes the lock (no other writer can be filling it then), as does `gc`.

Old versions are pruned after a successful switch, except leased ones: a reader
(`ProductIndex.open`, so every serving process) holds a shared flock on the manifest
of the version it reads for as long as it reads it, and pruning deletes a version
only under an exclusive flock on that manifest. The kernel drops a lease when its
process exits, however it exits, so a dead server holds nothing and nothing goes stale.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vitrine.errors import UserError

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
LOCK_FILE = ".lock"
MANIFEST_FILE = "manifest.json"
PARTIAL_SUFFIX = ".partial"
UPLOADS_DIR = "uploads"
_UPLOAD_SUFFIX = re.compile(r"^[a-z0-9]{1,8}$")
DEFAULT_KEEP_VERSIONS = 2
_VERSION_NAME = re.compile(r"^[0-9]{8}T[0-9]{12}Z(-[0-9]+)?$")
_LEASE_ATTEMPTS = 5  # a version pruned between reading CURRENT and leasing it: read CURRENT again

log = logging.getLogger(__name__)


class IndexNotFoundError(UserError):
    """The path holds no Vitrine index."""


class IndexBusyError(UserError):
    """Another process is writing a new version of this index."""


class VersionLease:
    """A reader's shared flock on a version's manifest: while it is held, prune and gc keep the version.

    Released by `release()`, or by the kernel when the process exits.
    """

    def __init__(self, version: Path, fd: int | None) -> None:
        self.version = version
        self._fd = fd

    @classmethod
    def acquire(cls, version: Path) -> VersionLease | None:
        """A lease on `version`, or None when it was deleted meanwhile (resolve CURRENT again)."""
        try:
            fd = os.open(version / MANIFEST_FILE, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a pruner deletes this version (it holds LOCK_EX)
        except OSError as exc:  # a file system without locks: read unprotected rather than not at all
            log.warning("cannot lease index version %s (%s): pruning may delete it while it is read", version, exc)
            os.close(fd)
            return cls(version, None)
        if os.fstat(fd).st_nlink == 0:  # pruned between open and flock
            os.close(fd)
            return None
        return cls(version, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()


def is_leased(version: Path) -> bool:
    """True while a reader holds a lease on `version` (checked without deleting anything)."""
    fd = _open_for_exclusive_lock(version)
    if fd is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _open_for_exclusive_lock(version: Path) -> int | None:
    path = version / MANIFEST_FILE
    try:
        return os.open(path, os.O_RDWR)  # write access: over NFS an exclusive lock needs it
    except PermissionError:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None


def dir_size(path: Path) -> int:
    """Bytes in the files under `path` (0 when it is gone)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


@dataclass
class Cleanup:
    """What `prune` or `gc` did: folders removed (with their sizes) and old versions kept because they are leased."""

    removed: list[tuple[Path, int]] = field(default_factory=list)
    leased: list[Path] = field(default_factory=list)

    @property
    def removed_paths(self) -> list[Path]:
        return [path for path, _ in self.removed]

    @property
    def removed_bytes(self) -> int:
        return sum(size for _, size in self.removed)


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

    def open_version(self, name: str | None = None) -> tuple[Path, VersionLease]:
        """The version folder to read (as `resolve`, or the finished version `name`), leased: hold the
        lease for as long as it is read."""
        if name is not None:
            if not _VERSION_NAME.match(name):
                raise UserError(f"{name[:60]!r} is not an index version name")
            version = self.versions / name
            lease = VersionLease.acquire(version)
            if lease is None:
                raise IndexNotFoundError(f"index version {version} does not exist (pruned, or not written yet)")
            return version, lease
        for _ in range(_LEASE_ATTEMPTS):
            version = self.resolve()
            lease = VersionLease.acquire(version)
            if lease is not None:
                return version, lease
        raise UserError(f"{self.root}: the live version kept being replaced while opening it; try again")

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

    @property
    def uploads(self) -> Path:
        return self.root / UPLOADS_DIR

    def store_upload(self, data: bytes, suffix: str) -> Path:
        """Keep image bytes sent to the service durably, as `uploads/<sha256>.<suffix>`, before a version refers to them.

        Content-addressed: the same bytes are stored once, and a product upserted again with the same
        photo keeps its content hash (not re-embedded). Versions never copy these files.
        """
        if not _UPLOAD_SUFFIX.match(suffix):
            raise ValueError(f"bad upload suffix {suffix!r}")
        self.uploads.mkdir(parents=True, exist_ok=True)
        path = self.uploads / f"{hashlib.sha256(data).hexdigest()}.{suffix}"
        if path.is_file() and path.stat().st_size == len(data):
            os.utime(path)  # stored again: a fresh mtime keeps it from `indexer.uploads.clean_uploads` meanwhile
            return path
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.uploads)
        return path

    def check_writable_target(self) -> None:
        """Refuse to turn a folder holding other things into an index."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{self.root} exists and is not a folder")
        if self.root.is_dir() and not self.is_index():
            others = [p.name for p in self.root.iterdir() if p.name not in (VERSIONS_DIR, LOCK_FILE, UPLOADS_DIR)]
            if others:
                raise UserError(
                    f"{self.root} is not empty and not a Vitrine index (it holds {', '.join(sorted(others)[:3])}...); "
                    "choose a new or empty folder"
                )

    @contextmanager
    def lock(self) -> Iterator[list[tuple[Path, int]]]:
        """Exclusive writer lock; a second writer fails at once rather than waiting or racing.

        Taking it removes `.partial` folders left by writers that were killed (no writer is filling
        them now); the block gets the list of (folder, bytes) removed.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fh = open(self.root / LOCK_FILE, "a+")
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise IndexBusyError(f"another process is writing to the index {self.root}; try again when it finishes") from None
                raise
            stale = self._remove_partials()
            if stale:
                log.info("removed %d partial version folder(s) left by an interrupted writer: %s",
                         len(stale), ", ".join(path.name for path, _ in stale))  # fmt: skip
            yield stale
        finally:
            fh.close()  # releases the lock

    def _remove_partials(self) -> list[tuple[Path, int]]:
        """Delete every `.partial` folder. Only under `lock()`: then none belongs to a live writer."""
        removed = []
        if self.versions.is_dir():
            for path in sorted(self.versions.glob(f"*{PARTIAL_SUFFIX}")):
                size = dir_size(path)
                shutil.rmtree(path, ignore_errors=True)
                removed.append((path, size))
        return removed

    def _new_name(self) -> str:
        # One clock read for seconds and microseconds: two reads straddling a second boundary gave a
        # name that sorted before the previous version's, and versions are ordered by name.
        now = time.time_ns()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 1_000_000_000)) + f"{now // 1000 % 1_000_000:06d}Z"
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
        """Delete all but the newest `keep` versions (never the live one, nor a leased one) and leftover
        partial folders. Hold `lock()`. Returns the removed folders."""
        return self.collect(keep).removed_paths

    def collect(self, keep: int = DEFAULT_KEEP_VERSIONS) -> Cleanup:
        """`prune`, saying what it removed (and how large it was) and which old versions are leased. Hold `lock()`."""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        current = self.current()
        cleanup = Cleanup()
        finished = self.finished_versions()
        for path in finished[: max(0, len(finished) - keep)]:
            if path == current:
                continue
            size = self._delete_unless_leased(path)
            if size is None:
                cleanup.leased.append(path)
            else:
                cleanup.removed.append((path, size))
        cleanup.removed += self._remove_partials()
        return cleanup

    def gc(self, keep: int = DEFAULT_KEEP_VERSIONS) -> Cleanup:
        """Take the writer lock, then remove partial folders and old versions nobody leases (`vitrine index --gc`)."""
        if not self.is_index():
            raise IndexNotFoundError(f"{self.root} is not a Vitrine index (no {CURRENT_FILE} file)")
        with self.lock() as stale:
            cleanup = self.collect(keep)
            cleanup.removed[:0] = stale
            leftover = self.root / f"{CURRENT_FILE}.tmp"  # a writer killed while switching CURRENT
            if leftover.is_file():
                cleanup.removed.append((leftover, leftover.stat().st_size))
                leftover.unlink()
        return cleanup

    def _delete_unless_leased(self, version: Path) -> int | None:
        """Delete `version` under an exclusive lock on its manifest; its size, or None when a reader leases it."""
        fd = _open_for_exclusive_lock(version)
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return None
            size = dir_size(version)
            shutil.rmtree(version, ignore_errors=True)  # readers waiting for a lease see the manifest unlinked
            return size
        finally:
            if fd is not None:
                os.close(fd)
