"""Service settings, read from the environment (prefix VITRINE_; Redis from REDIS_URL).

Every field is documented in deploy/settings.md; keep the two in step.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1 << 20
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
KEY_DIGEST = re.compile(r"sha256:[0-9a-fA-F]{64}")
MAX_RERANK_TOP_N = 100  # cross-encoder rows per query: the rerank cost grows linearly with N
MAX_FACET_TOP_N = 100  # facets count over a query's first-stage candidate pool, which holds >= 100 (search/service/facets.py)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VITRINE_", extra="ignore", frozen=True, populate_by_name=True)

    # What to serve.
    index: Path | None = Field(default=None, description="index directory (ProductIndex.open)")
    bundle: Path | None = Field(default=None, description="model bundle; default: the one the index was built with")
    # Requests already run in parallel threads; intra-op threads on top oversubscribe the cores
    # (bench/search_load.py: 8 clients on 2 cores, 1 thread gave ~1.7x the QPS of 2).
    threads: int = Field(default=1, ge=1, description="onnxruntime intra-op threads per encoder session")
    # Concurrent text-query cache misses share encoder calls (search.service.batching): no added wait.
    text_batch_max: int = Field(default=16, ge=1, le=256, description="most texts per text-encoder call (1: none)")
    encode_concurrency: int | None = Field(default=None, ge=1, description="text-encoder calls at once; unset: half the CPUs, at least 1")
    host: str = Field(default="127.0.0.1", description="`vitrine serve` listen address")
    port: int = Field(default=8000, ge=0, le=65535, description="`vitrine serve` listen port")

    # The vector engine (search/service/backends.py): Faiss in process, or Qdrant embedded or at a URL.
    backend: Literal["faiss", "qdrant"] = Field(default="faiss", description="faiss, or qdrant (embedded unless qdrant_url)")
    qdrant_url: str | None = Field(default=None, description="Qdrant server or cluster, http(s)://host:6333; unset: embedded")
    qdrant_path: Path | None = Field(default=None, description="folder of the embedded Qdrant; default <index>/qdrant")
    qdrant_api_key: SecretStr | None = Field(default=None, description="API key of the Qdrant server (never logged)")
    qdrant_collection: str = Field(default="vitrine", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="collection prefix: <prefix>-<version>")

    @model_validator(mode="after")
    def _check_backend(self) -> Settings:
        # With backend faiss the qdrant_* settings are ignored (a deployment can switch engines by one variable).
        if self.backend == "qdrant" and self.qdrant_url and self.qdrant_path:
            raise ValueError("give qdrant_url (a server) or qdrant_path (embedded), not both")
        return self

    # Redis: query-embedding cache and the product store shared by replicas. Unset: in-process LRU + disk store.
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("REDIS_URL", "VITRINE_REDIS_URL"))
    redis_timeout_s: float = Field(default=0.05, gt=0, description="socket connect/read timeout per Redis call")
    redis_retry_s: float = Field(default=2.0, ge=0, description="after a Redis failure, skip Redis this long")
    redis_prefix: str = Field(default="vitrine", min_length=1, description="key prefix, to share one Redis")
    cache_ttl_s: int = Field(default=7 * 24 * 3600, ge=1, description="TTL of cached query embeddings in Redis")
    cache_size: int = Field(default=4096, ge=0, description="in-process LRU entries for query embeddings (0: off)")
    record_cache: int = Field(default=50_000, ge=0, description="product records of the on-disk store kept in memory")

    # Request limits (bad input gets a 4xx, never a 500).
    default_k: int = Field(default=24, ge=1)
    max_k: int = Field(default=100, ge=1)
    max_query_chars: int = Field(default=256, ge=1)
    max_image_bytes: int = Field(default=8 * MIB, ge=1, description="decoded upload size limit")
    max_body_bytes: int = Field(default=12 * MIB, ge=1, description="request body limit (base64 adds 4/3)")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="decompression-bomb limit, width*height")
    # The encoder resizes the short side to its input size (224 px), so a 1x10000 image would grow to
    # 224x2,240,000 px: the aspect ratio bounds that work before any pixel is decoded.
    max_image_aspect_ratio: float = Field(default=20.0, ge=1.0, description="longest side / shortest side of an upload")

    # Connections (`vitrine serve`): slow or stalled clients must not hold connections for ever.
    request_head_timeout_s: float = Field(default=10.0, gt=0, description="time to receive a request's line and headers")
    max_request_head_bytes: int = Field(default=32 * 1024, ge=1024, description="request line + headers size limit (431 above)")
    body_idle_timeout_s: float = Field(default=10.0, gt=0, description="longest wait for the next chunk of a request body (408)")
    body_timeout_s: float = Field(default=60.0, gt=0, description="time to receive a whole request body (408)")
    keep_alive_timeout_s: int = Field(default=5, ge=1, description="idle keep-alive connections are closed after this")
    max_connections: int = Field(default=256, ge=1, description="open connections and in-flight requests; beyond: 503")

    # Reranking queries with the bundle's cross-encoder (when it has one; photo queries when it is aligned).
    rerank_default: bool = Field(
        default=True,
        description="rerank queries that do not say, when the bundle has a reranker that reads them (photo queries: an aligned one)",
    )
    rerank_top_n: int | None = Field(
        default=None, ge=1, le=MAX_RERANK_TOP_N, description="first-stage hits reranked by default; unset: the reranker's default_top_n"
    )

    facet_top_n: int = Field(default=MAX_FACET_TOP_N, ge=1, le=MAX_FACET_TOP_N,
                             description="first-stage candidates that facet counts are over")  # fmt: skip

    # Thumbnails served by GET /products/{id}/image.
    thumbnail_px: int = Field(default=256, ge=16, le=2048)
    thumbnail_quality: int = Field(default=85, ge=1, le=95)
    thumbnail_cache: int = Field(default=2048, ge=0, description="in-process thumbnail LRU entries")

    docs: bool = Field(default=True, description="serve OpenAPI docs at /docs and /openapi.json")

    # Live index versions: follow the index's CURRENT switch, and the other replicas' through Redis.
    index_poll_s: float = Field(default=1.0, ge=0, description="how often CURRENT (and Redis) is checked for a new version; 0: never")
    redis_old_store_ttl_s: int = Field(default=600, ge=1, description="TTL put on a replaced version's Redis product store")

    # Catalog writes over HTTP (PUT/DELETE /products/{id}, POST /products:batch), with API keys.
    write_keys: dict[str, str] = Field(default_factory=dict, description="key id -> 'sha256:<hex digest>' of an API key that may write")
    read_keys: dict[str, str] = Field(default_factory=dict, description="key id -> digest of a key that may read; empty: reads are open")
    audit_log: Path | None = Field(default=None, description="append-only JSON-lines log of writes; default <index>/audit.jsonl")
    write_queue_size: int = Field(default=32, ge=1, description="writes accepted and not yet answered; beyond: 429")
    write_group_max: int = Field(default=16, ge=1, description="queued writes committed together as one index version")
    write_max_rows: int = Field(default=100, ge=1, description="rows (upserts + deletes) in one POST /products:batch")
    write_lock_wait_s: float = Field(default=30.0, ge=0, description="wait for another writer of the index before 503")

    @field_validator("write_keys", "read_keys")
    @classmethod
    def _check_keys(cls, keys: dict[str, str]) -> dict[str, str]:
        for key_id, digest in keys.items():
            if not KEY_ID.fullmatch(key_id):
                raise ValueError(f"API key id {key_id[:40]!r}: use 1-64 letters, digits, '.', '_' or '-'")
            if not KEY_DIGEST.fullmatch(digest):
                raise ValueError(f"API key {key_id!r}: store 'sha256:' and the key's 64-hex-digit SHA-256, never the key")
        return {key_id: digest.lower() for key_id, digest in keys.items()}

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k {self.default_k} exceeds max_k {self.max_k}")
        if self.max_body_bytes < self.max_image_bytes:
            raise ValueError("max_body_bytes must be at least max_image_bytes")
        if self.body_timeout_s < self.body_idle_timeout_s:
            raise ValueError("body_timeout_s must be at least body_idle_timeout_s")
        return self
