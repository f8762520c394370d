"""Catalog writes over HTTP: a bounded queue in front of the indexer's durable, atomic update.

Routers validate a write completely (fields, photo decoded under the upload limits, ids) and
`submit` it; a full queue is a 429 with Retry-After. One writer thread commits queued writes:
as many as `VITRINE_WRITE_GROUP_MAX` that touch different ids go into one new index version
(`indexer.build.update_index`, strict: all of a write or none of it), since each version copies
the index's files and a burst of single-product writes would otherwise cost a copy each. The
version is then swapped in here and published to the other replicas (`search.service.live`),
and only then is each write answered: an acknowledged write is on disk, fsynced, and served.

A write whose rows the indexer refuses (an id to delete that is gone by now, a photo the model
cannot embed) fails alone: it is taken out of its group, which is committed again without it.
Photos are kept in the index's `uploads/` folder (content-addressed) before the version that
refers to them is written; once a group has committed or failed, the photos no version refers to
any more are removed (`indexer.uploads`): those of failed writes, and those of products replaced or
deleted once the versions holding them are pruned. Every write ends as one line of the audit log
(`search.service.audit`).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from indexer.build import RejectedProductsError, UnknownProductsError, update_index
from indexer.layout import IndexBusyError, IndexLayout
from indexer.uploads import StoredUpload, clean_uploads
from search.service.audit import AuditLog
from search.service.engine import SearchEngine
from search.service.errors import ApiError
from search.service.metrics import ServiceMetrics
from search.service.schemas import ProductFields
from search.service.settings import Settings
from vitrine.catalog.product import FileImage, Product
from vitrine.errors import UserError

log = logging.getLogger(__name__)
BUSY_RETRY_S = 0.2  # another process holds the index's writer lock: try again this often
MAX_UNCLEANED = 10_000  # photos whose clean-up is put off, remembered at most


@dataclass
class ProductUpload:
    """One product to upsert, validated, with its photo's bytes (decoded once already)."""

    id: str
    fields: ProductFields
    image: bytes
    suffix: str  # jpg, png, ... (from the bytes)
    row: int | None = None  # its row in a batch request
    stored: StoredUpload | None = None  # the photo in uploads/, once stored

    def product(self, layout: IndexLayout) -> Product:
        path = layout.store_upload(self.image, self.suffix)
        self.stored = StoredUpload.of(path)
        f = self.fields
        return Product(id=self.id, title=f.title, images=(FileImage(path),), category=f.category,
                       subcategory=f.subcategory, description=f.description, attributes=dict(f.attributes))  # fmt: skip


@dataclass
class WriteJob:
    """One write request: put (one upsert), delete (one id) or batch."""

    action: str
    key_id: str
    upserts: list[ProductUpload] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    future: Future = field(default_factory=Future)
    accepted: float = field(default_factory=time.perf_counter)
    finished: bool = False

    @property
    def ids(self) -> list[str]:
        return [u.id for u in self.upserts] + self.deletes

    def error_for(self, exc: UnknownProductsError | RejectedProductsError) -> ApiError:
        """This write's share of what the indexer refused, in the API's error shape."""
        if isinstance(exc, UnknownProductsError):
            gone = [i for i in self.deletes if i in set(exc.ids)]
            if self.action == "delete":
                return ApiError(404, "product_not_found", f"no product with id {gone[0]!r}")
            rows = {id: row for row, id in enumerate(self.deletes)}
            details = [{"loc": ["body", "delete", rows[i]], "msg": "not in the index", "type": "product_not_found"} for i in gone]
            return ApiError(422, "invalid_rows", f"{len(gone)} id(s) to delete are not in the index; nothing was written", details)
        mine = {u.id: u for u in self.upserts}
        errors = [e for e in exc.errors if e.id in mine]
        if self.action == "put":
            return ApiError(422, "invalid_product", f"product {errors[0].id}: {errors[0].message}")
        details = [{"loc": ["body", "upsert", mine[e.id].row, "image_base64" if e.stage == "image" else "title"],
                    "msg": e.message, "type": "invalid_product"} for e in errors]  # fmt: skip
        return ApiError(422, "invalid_rows", f"{len(errors)} product(s) cannot be indexed; nothing was written", details)


@dataclass
class WriteOutcome:
    version: str
    changes: dict[str, str]  # id -> added | replaced | unchanged | deleted
    seconds: float


class CatalogWriter:
    def __init__(self, engine: SearchEngine, index_dir: Path, settings: Settings, metrics: ServiceMetrics,
                 audit: AuditLog, publish: Callable[[str], None] | None = None) -> None:  # fmt: skip
        """`publish(version)` tells the other replicas about a committed version (`VersionFollower.publish`)."""
        self.engine = engine
        self.layout = IndexLayout(index_dir)
        self.settings = settings
        self.metrics = metrics
        self.audit = audit
        self.publish = publish
        self._jobs: deque[WriteJob] = deque()
        self._accepted = 0  # queued and being committed: what the 429 bounds
        self._commit_s = 1.0  # recent seconds per commit (for Retry-After)
        self._upload_refs: dict[str, frozenset[str]] = {}  # version -> the uploads it refers to (versions never change)
        self._uncleaned: list[StoredUpload] = []  # photos of finished writes whose clean-up was put off (index busy)
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="catalog-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ requests

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, committed a group at a time."""
        groups = math.ceil(max(1, self._accepted) / self.settings.write_group_max)
        return max(1, math.ceil(groups * self._commit_s))

    def submit(self, job: WriteJob) -> Future:
        """Queue `job`; its future gets a WriteOutcome, or an ApiError. 429 when the queue is full."""
        with self._cond:
            if self._closed:
                raise ApiError(503, "shutting_down", "the service is shutting down; send the write to another replica",
                               headers={"Retry-After": "1"})  # fmt: skip
            if self._accepted >= self.settings.write_queue_size:
                after = self.retry_after_s()
                raise ApiError(429, "write_queue_full",
                               f"{self._accepted} writes are waiting to be committed; retry in {after} s",
                               headers={"Retry-After": str(after)})  # fmt: skip
            self._accepted += 1
            self._jobs.append(job)
            self.metrics.write_queue.set(self._accepted)
            self._cond.notify()
        return job.future

    def close(self, timeout_s: float = 60.0) -> None:
        """Refuse new writes, commit the queued ones, stop."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=timeout_s)

    # ------------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                group = self._take_group()
            try:
                self._commit_group(group)
            except Exception:  # a bug: answer every write of the group, keep the thread alive
                log.exception("catalog writer: commit failed")
                self._finish(group, exc=ApiError(500, "internal_error", "internal server error"))
            self._clean_uploads(group)

    def _clean_uploads(self, group: list[WriteJob]) -> None:
        """Remove the photos no version refers to: this group's, if its write failed (or if the product came
        out unchanged under another file), and older orphans (see `indexer.uploads`). Best effort, after
        the answers: a writer elsewhere holding the lock, or a disk error, leaves them to the next group."""
        self._uncleaned += [upload.stored for job in group for upload in job.upserts if upload.stored is not None]
        del self._uncleaned[:-MAX_UNCLEANED]  # an index busy for ever: the oldest are left to the age rule
        try:
            with self.layout.lock():
                clean_uploads(self.layout, own=self._uncleaned, cache=self._upload_refs)
        except IndexBusyError:
            log.debug("uploads not cleaned: another process is writing the index")
        except (OSError, UserError) as exc:
            log.warning("uploads not cleaned: %s", exc)
        else:
            self._uncleaned = []

    def _take_group(self) -> list[WriteJob]:
        """The oldest writes, up to write_group_max, that touch pairwise different ids (order is kept)."""
        group: list[WriteJob] = []
        ids: set[str] = set()
        while self._jobs and len(group) < self.settings.write_group_max:
            job_ids = set(self._jobs[0].ids)
            if ids & job_ids:
                break
            group.append(self._jobs.popleft())
            ids |= job_ids
        return group

    def _commit_group(self, group: list[WriteJob]) -> None:
        while group:
            try:
                outcome = self._commit(group)
            except (UnknownProductsError, RejectedProductsError) as exc:
                bad_ids = set(exc.ids) if isinstance(exc, UnknownProductsError) else {e.id for e in exc.errors}
                failing = [job for job in group if bad_ids & set(job.ids)]
                if not failing:  # cannot happen: the indexer names ids of this group
                    raise
                for job in failing:
                    self._finish([job], exc=job.error_for(exc))
                group = [job for job in group if job not in failing]
                continue
            except IndexBusyError:
                after = max(1, math.ceil(self.settings.write_lock_wait_s))
                self._finish(group, exc=ApiError(503, "index_busy", "another process is writing this index; try again",
                                                 headers={"Retry-After": str(after)}))  # fmt: skip
            except UserError as exc:  # the index cannot take writes (gone, another bundle's): not the client's fault
                log.error("catalog write failed: %s", exc)
                self._finish(group, exc=ApiError(503, "write_failed", f"the index cannot be written: {exc}"))
            else:
                for job in group:
                    changes = {id: outcome.changes.get(id, "unchanged") for id in job.ids}
                    self._finish([job], outcome=WriteOutcome(outcome.version, changes, time.perf_counter() - job.accepted))
            return

    def _commit(self, group: list[WriteJob]) -> WriteOutcome:
        """One new version holding every write of `group` (or no new version when nothing changes)."""
        started = time.perf_counter()
        products = [upload.product(self.layout) for job in group for upload in job.upserts]
        deletes = [id for job in group for id in job.deletes]
        deadline = time.monotonic() + self.settings.write_lock_wait_s
        while True:
            try:
                result = update_index(self.layout.root, upserts=products, deletes=deletes, encoder=self.engine.encoder,
                                      strict=True, threads=1)  # fmt: skip
                break
            except IndexBusyError:  # a CLI upsert, or another replica's writer: wait for it
                if time.monotonic() > deadline:
                    raise
                time.sleep(BUSY_RETRY_S)
        version = result.version_dir.name
        try:
            self.engine.switch_to(version)  # read your writes: this replica serves it before answering
        except UserError as exc:  # durable anyway; the follower keeps trying
            log.error("committed index version %s but cannot serve it: %s", version, exc)
        if self.publish is not None:
            self.publish(version)
        seconds = time.perf_counter() - started
        self._commit_s = 0.7 * self._commit_s + 0.3 * seconds
        self.metrics.write_commit_seconds.observe(seconds)
        log.info("committed %d write(s) (%d upserts, %d deletes) as index version %s in %.2f s",
                 len(group), len(products), len(deletes), version, seconds)  # fmt: skip
        return WriteOutcome(version, result.changes, seconds)

    def _finish(self, jobs: list[WriteJob], *, outcome: WriteOutcome | None = None, exc: ApiError | None = None) -> None:
        jobs = [job for job in jobs if not job.finished]
        for job in jobs:
            job.finished = True
            if outcome is not None:
                result, status = "ok", 200
                self.metrics.write_seconds.labels(job.action).observe(outcome.seconds)
            else:
                result, status = _result_of(exc), exc.status
            self.metrics.writes.labels(job.action, result).inc()
            extra: dict[str, Any] = {"changes": outcome.changes} if outcome else {"error": exc.code}
            self.audit.record(key_id=job.key_id, action=job.action, ids=job.ids, result=result, status=status,
                              version=outcome.version if outcome else None, **extra)  # fmt: skip
            if outcome is not None:
                job.future.set_result(outcome)
            else:
                job.future.set_exception(exc)
        with self._cond:
            self._accepted -= len(jobs)
            self.metrics.write_queue.set(self._accepted)


def _result_of(exc: ApiError) -> str:
    return {404: "not_found", 422: "invalid", 429: "queue_full", 503: "busy"}.get(exc.status, "failed")
