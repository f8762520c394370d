"""Redis for the service: a connection that fails soft, and the product store replicas share.

Redis is an accelerator, never a dependency of a request: every call has a short
socket timeout, a failure marks the link down for `retry_s` (so requests stop paying
the timeout) and callers fall back (cache miss, disk store). The next call after
`retry_s`, or a readiness probe, tries again, so the link recovers by itself.

Redis holds data anyone with access can write: a product record that is not a valid
record reads as a miss (the service then serves and repairs it from the disk store).
Passwords in Redis URLs never reach logs or /readyz (`masked_url`).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

from indexer.store import ProductRecord

log = logging.getLogger(__name__)
T = TypeVar("T")
# What a lost, restarted or misbehaving Redis raises; anything else is a bug and propagates.
REDIS_ERRORS = (redis.RedisError, OSError)
WRITE_CHUNK = 500
BULK_TIMEOUT_S = 10.0  # populating the product store writes megabytes: not the request-path timeout
MASK = "***"


def masked_url(url: str | None) -> str:
    """The URL with its password (redis://user:PASSWORD@host, or ?password=...) replaced by ***."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            credentials, _, host = netloc.rpartition("@")
            user = credentials.partition(":")[0]
            netloc = f"{user}:{MASK}@{host}"
        query = parts.query
        if "password" in query.lower():
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, MASK if k.lower() == "password" else v) for k, v in pairs], safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # not parseable: show nothing of it
        return f"<unparseable redis url, {MASK}>"


def _secrets(url: str) -> list[str]:
    """The password(s) a URL carries, to scrub from error messages."""
    try:
        parts = urlsplit(url)
        found = [parts.password or ""] + [v for k, v in parse_qsl(parts.query) if k.lower() == "password"]
    except ValueError:
        return []
    return [secret for secret in found if secret]


class RedisLink:
    """A redis client behind a circuit breaker: `call(fn, default)` never raises Redis errors."""

    def __init__(self, url: str, *, timeout_s: float = 0.05, retry_s: float = 2.0, prefix: str = "vitrine") -> None:
        self.url = url
        self.display_url = masked_url(url)  # for logs and /readyz
        self._secrets = _secrets(url)
        self.prefix = prefix
        self.retry_s = retry_s
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            retry=None,
            health_check_interval=0,
        )
        self._bulk_timeout_s = max(BULK_TIMEOUT_S, timeout_s)
        self._bulk: redis.Redis | None = None
        self._lock = threading.Lock()
        self._down_until = 0.0  # monotonic time before which calls are skipped
        self.up = True
        self.last_error: str | None = None
        self.on_state_change: Callable[[bool], None] | None = None

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def call(self, fn: Callable[[redis.Redis], T], default: T, *, force: bool = False) -> T:
        """fn(client), or `default` when Redis is down or fails (the failure opens the breaker)."""
        if not force and time.monotonic() < self._down_until:
            return default
        try:
            result = fn(self.client)
        except REDIS_ERRORS as exc:
            self._failed(exc)
            return default
        self._succeeded()
        return result

    @property
    def bulk_client(self) -> redis.Redis:
        """A second client with a long read timeout, for background bulk writes only."""
        if self._bulk is None:
            self._bulk = redis.Redis.from_url(
                self.url, socket_timeout=self._bulk_timeout_s, socket_connect_timeout=self._bulk_timeout_s,
                retry_on_timeout=False, retry=None,
            )  # fmt: skip
        return self._bulk

    def ping(self) -> bool:
        """Try Redis now, whatever the breaker says (readiness probes)."""
        return self.call(lambda c: bool(c.ping()), False, force=True)

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self.retry_s
            self.last_error = self._scrub(f"{type(exc).__name__}: {exc}")
            was_up, self.up = self.up, False
        if was_up:
            log.warning("redis %s unreachable, serving without it: %s", self.display_url, self.last_error)
            if self.on_state_change:
                self.on_state_change(False)

    def _succeeded(self) -> None:
        if self.up:
            return
        with self._lock:
            was_up, self.up = self.up, True
            self._down_until = 0.0
        if not was_up:
            log.warning("redis %s reachable again", self.display_url)
            if self.on_state_change:
                self.on_state_change(True)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    def close(self) -> None:
        for client in (self.client, self._bulk):
            try:
                if client is not None:
                    client.close()
            except REDIS_ERRORS:
                pass


def record_to_json(record: ProductRecord) -> bytes:
    return json.dumps(record.to_dict(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


_RECORD_FIELDS = {f.name for f in fields(ProductRecord)}


def record_from_json(raw: bytes) -> ProductRecord | None:
    """The record `record_to_json` wrote, or None for anything else (not JSON, missing or mistyped fields)."""
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    data.setdefault("predicted", {})  # written before records carried backfilled values
    if set(data) != _RECORD_FIELDS:
        return None
    attributes, predicted = data["attributes"], data["predicted"]
    if not all(isinstance(data[name], str) for name in _RECORD_FIELDS - {"attributes", "predicted"}):
        return None
    if not isinstance(attributes, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()):
        return None
    if not isinstance(predicted, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("value"), str) and isinstance(v.get("confidence"), (int, float))
        for k, v in predicted.items()
    ):
        return None
    return ProductRecord(**data)


class RedisStore:
    """The indexer's ProductStore protocol (indexer.store) on a Redis hash per index version.

    One hash `<prefix>:products:<version>` maps id -> the record as JSON; a marker key
    `<prefix>:products:<version>:complete` holds the count once fully written, so a
    replica knows whether the store is usable or must be (re)populated. Methods raise
    Redis errors; the service calls them through RedisLink so failures fall back.
    """

    def __init__(self, client: redis.Redis, version: str, *, prefix: str = "vitrine") -> None:
        self.client = client
        self.version = version
        self.hash_key = f"{prefix}:products:{version}"
        self.marker_key = f"{self.hash_key}:complete"

    def _decode(self, id: str, raw: bytes | None) -> ProductRecord | None:
        """The stored record, or None when it is absent, damaged, or another product's (a miss either way)."""
        if raw is None:
            return None
        record = record_from_json(raw)
        if record is None or record.id != id:
            log.warning("redis product store %s: the record of %r is damaged; reading it from disk", self.hash_key, id)
            return None
        return record

    def get(self, id: str) -> ProductRecord | None:
        return self._decode(id, self.client.hget(self.hash_key, id))

    def get_many(self, ids: Sequence[str]) -> list[ProductRecord | None]:
        ids = list(ids)
        if not ids:
            return []
        return [self._decode(id, raw) for id, raw in zip(ids, self.client.hmget(self.hash_key, ids))]

    def put_many(self, records: Iterable[ProductRecord]) -> int:
        """Write records in pipelined chunks; returns how many."""
        count = 0
        batch: dict[str, bytes] = {}
        for record in records:
            batch[record.id] = record_to_json(record)
            if len(batch) >= WRITE_CHUNK:
                count += self._write(batch)
                batch = {}
        if batch:
            count += self._write(batch)
        return count

    def _write(self, batch: dict[str, bytes]) -> int:
        self.client.hset(self.hash_key, mapping=batch)
        return len(batch)

    def delete(self, ids: Iterable[str]) -> int:
        """Remove these ids; returns how many were present."""
        ids = list(dict.fromkeys(ids))
        return int(self.client.hdel(self.hash_key, *ids)) if ids else 0

    def __len__(self) -> int:
        return int(self.client.hlen(self.hash_key))

    def __contains__(self, id: object) -> bool:
        return isinstance(id, str) and bool(self.client.hexists(self.hash_key, id))

    def expire(self, seconds: int) -> None:
        """Let Redis drop this version's store (and marker) after `seconds`: a newer version is served."""
        self.client.expire(self.hash_key, seconds)
        self.client.expire(self.marker_key, seconds)

    # -- population from the index's own store

    def is_complete(self, expected: int) -> bool:
        marker = self.client.get(self.marker_key)
        return marker is not None and int(marker) == expected and len(self) == expected

    def populate(self, records: Iterable[ProductRecord], expected: int) -> int:
        """Write every record, then the marker. Idempotent: replicas racing write the same data."""
        self.client.delete(self.marker_key)
        written = self.put_many(records)
        if written != expected:
            raise ValueError(f"wrote {written} products to redis, the index holds {expected}")
        self.client.set(self.marker_key, str(expected))
        return written
