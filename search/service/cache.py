"""Query-embedding cache: an in-process LRU, backed by Redis when configured.

Keys are the bundle fingerprint plus the normalised query text, so a new model never
reads another model's vectors. Values are the raw float32 bytes of the (D,) embedding.
"""
from __future__ import annotations

import hashlib
import threading
import unicodedata
from collections import OrderedDict
from typing import Generic, Protocol, TypeVar

import numpy as np

from search.service.redis_store import RedisLink

V = TypeVar("V")


def normalise_query(text: str) -> str:
    """NFKC, whitespace collapsed and trimmed: the text the encoder sees and the cache keys on."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


class EmbeddingCache(Protocol):
    def get(self, text: str) -> np.ndarray | None: ...
    def put(self, text: str, emb: np.ndarray) -> None: ...


class LRU(Generic[V]):
    """A thread-safe in-process LRU map (capacity 0 disables it). Values are shared: never mutate them."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: V) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class LRUEmbeddingCache(LRU[np.ndarray]):
    """In-process LRU of query embeddings: float32 (dim,), read-only."""

    def __init__(self, capacity: int, dim: int) -> None:
        super().__init__(capacity)
        self.dim = dim

    def put(self, text: str, emb: np.ndarray) -> None:
        assert emb.shape == (self.dim,) and emb.dtype == np.float32, (emb.shape, emb.dtype)
        emb = emb.copy()
        emb.flags.writeable = False  # shared between requests
        super().put(text, emb)


class RedisEmbeddingCache:
    """Redis tier: float32 bytes under <prefix>:qemb:<fingerprint>:<sha256(text)>, with a TTL.

    Reads and writes go through RedisLink, so a lost Redis is a miss, not an error.
    """

    def __init__(self, link: RedisLink, fingerprint: str, dim: int, ttl_s: int) -> None:
        self.link = link
        self.fingerprint = fingerprint
        self.dim = dim
        self.ttl_s = ttl_s

    def key(self, text: str) -> str:
        return self.link.key("qemb", self.fingerprint, hashlib.sha256(text.encode("utf-8")).hexdigest())

    def get(self, text: str) -> np.ndarray | None:
        raw = self.link.call(lambda c: c.get(self.key(text)), None)
        if raw is None or len(raw) != 4 * self.dim:
            return None  # absent, or written by something else: recompute
        emb = np.frombuffer(raw, dtype=np.float32)
        return emb if np.isfinite(emb).all() else None

    def put(self, text: str, emb: np.ndarray) -> None:
        assert emb.shape == (self.dim,) and emb.dtype == np.float32, (emb.shape, emb.dtype)
        data = emb.tobytes()
        self.link.call(lambda c: c.set(self.key(text), data, ex=self.ttl_s), None)


class TieredEmbeddingCache:
    """LRU first, then Redis; a Redis hit is kept in the LRU. `last_tier` says where a get hit."""

    def __init__(self, local: LRUEmbeddingCache, remote: RedisEmbeddingCache | None = None) -> None:
        self.local = local
        self.remote = remote

    def lookup(self, text: str) -> tuple[np.ndarray | None, str]:
        """(embedding or None, tier: "local" | "redis" | "miss")."""
        emb = self.local.get(text)
        if emb is not None:
            return emb, "local"
        if self.remote is not None:
            emb = self.remote.get(text)
            if emb is not None:
                self.local.put(text, emb)
                return emb, "redis"
        return None, "miss"

    def get(self, text: str) -> np.ndarray | None:
        return self.lookup(text)[0]

    def put(self, text: str, emb: np.ndarray) -> None:
        self.local.put(text, emb)
        if self.remote is not None:
            self.remote.put(text, emb)
