"""Live index versions: a running service follows its index without a restart.

A `VersionFollower` thread checks, every `VITRINE_INDEX_POLL_S` (1 s):

* the index's CURRENT file (a read of a few bytes), which every build, upsert, delete and HTTP
  write switches atomically (`indexer.layout`);
* with Redis, the key `<prefix>:index:current`, where every replica publishes the version it
  saw CURRENT switch to (or committed itself).

A change of either names the version to serve. It is opened in this thread (leased, checked
against the bundle) while requests keep being answered from the old one, then swapped in
(`SearchEngine.switch_to`); requests in flight finish on the version they pinned, and the old
version's lease is released after them, so `prune` keeps exactly what is served. Both sources
are edge-triggered: whichever changed last wins, so a rollback of CURRENT propagates too. At
start-up CURRENT is the truth, and the replica publishes it when Redis names another version.

Replicas on one shared index folder each see CURRENT change; Redis makes them switch within one
poll of each other, and serves replicas that see the folder late (a copy synced from elsewhere:
a named version that is not there yet is retried until it appears).
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from indexer.layout import IndexLayout
from search.service.engine import SearchEngine
from vitrine.errors import UserError

log = logging.getLogger(__name__)
RETRY_MAX_S = 10.0  # a version that cannot be opened (yet) is retried with backoff up to this


def current_key(prefix: str) -> str:
    return f"{prefix}:index:current"


class VersionFollower:
    def __init__(self, engine: SearchEngine, index_dir: Path, poll_s: float) -> None:
        self.engine = engine
        self.layout = IndexLayout(index_dir)
        self.poll_s = poll_s
        self._disk_seen: str | None = engine.version  # what CURRENT named when the engine opened it
        self._remote_seen: str | None = None
        self._pending: str | None = None  # the version to switch to, until it is served
        self._attempts = 0
        self._next_try = 0.0  # monotonic; a version that failed to open is retried with backoff
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="index-follower", daemon=True)

    # ------------------------------------------------------------------ sources

    def publish(self, version: str) -> None:
        """Tell the replicas sharing Redis to serve `version` (no-op without Redis)."""
        link = self.engine.link
        if link is not None:
            key = current_key(self.engine.settings.redis_prefix)
            link.call(lambda c: c.set(key, version), None)
        self._remote_seen = version  # our own news: nothing to follow

    def _remote(self) -> str | None:
        link = self.engine.link
        if link is None:
            return None
        key = current_key(self.engine.settings.redis_prefix)
        raw = link.call(lambda c: c.get(key), None)
        try:
            return raw.decode("ascii") if raw else None
        except UnicodeDecodeError:
            return None  # not ours; CURRENT still works

    def _disk(self) -> str | None:
        try:
            current = self.layout.current()
        except (UserError, OSError) as exc:  # CURRENT damaged or unreadable: keep serving, say so once
            self._warn_once("CURRENT", f"cannot read {self.layout.root}/CURRENT: {exc}")
            return None
        return current.name if current is not None else None

    # ------------------------------------------------------------------ the loop

    def start(self) -> VersionFollower:
        if self._remote() != self.engine.version:
            self.publish(self.engine.version)  # at start-up CURRENT is the truth
        self._remote_seen = self.engine.version
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # never let the follower die: the next poll tries again
                log.exception("index follower: unexpected error")

    def poll(self) -> str | None:
        """One check of CURRENT and Redis, and a switch when either named a new version; the version switched to."""
        disk = self._disk()
        if disk is not None and disk != self._disk_seen:
            self._disk_seen = disk
            self.publish(disk)
            self._want(disk)
        remote = self._remote()
        if remote is not None and remote != self._remote_seen:
            self._remote_seen = remote
            self._want(remote)
        return self._switch()

    def _want(self, version: str) -> None:
        if version != self._pending:
            self._pending, self._attempts, self._next_try = version, 0, 0.0

    def _switch(self) -> str | None:
        target = self._pending
        if target is None or target == self.engine.version:
            self._pending = None
            return None
        if time.monotonic() < self._next_try:
            return None
        try:
            self.engine.switch_to(target)
        except UserError as exc:  # not there yet (a synced copy), pruned, or another bundle's
            self._attempts += 1
            self._next_try = time.monotonic() + min(RETRY_MAX_S, self.poll_s * 2**self._attempts)
            (log.warning if self._attempts == 1 else log.debug)(
                "cannot serve index version %s yet (attempt %d): %s", target, self._attempts, exc
            )
            return None
        self._pending = None
        return target

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("%s", message)
