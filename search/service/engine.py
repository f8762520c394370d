"""What the HTTP layer calls: encode a query, search the index, attach product records, rerank.

One `SearchEngine` per app, shared by all requests (thread-safe: onnxruntime sessions,
the Faiss indexes and the caches all are). Routers validate input and shape responses;
everything here raises ApiError for expected failures.

The engine serves one index version at a time (`ServedVersion`); `switch_to` swaps in another
(`search.service.live` calls it when the index's CURRENT changes, the catalog writer after a
commit). Each query pins the version it started on until it is answered.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image

from indexer.filters import FilterError, UnknownFilterError
from indexer.product_index import default_fetch_k
from search.service.batching import TextBatcher
from search.service.cache import LRU, LRUEmbeddingCache, RedisEmbeddingCache, TieredEmbeddingCache, normalise_query
from search.service.errors import ApiError
from search.service.facets import count_facets, resolve_facets
from search.service.images import jpeg_thumbnail
from search.service.metrics import ServiceMetrics
from search.service.redis_store import REDIS_ERRORS, RedisLink, RedisStore
from search.service.settings import MAX_RERANK_TOP_N, Settings
from vitrine.catalog.record import ProductRecord
from vitrine.errors import UserError
from vitrine.fusion import DEFAULT_FUSION, DEFAULT_LEXICAL_WEIGHT, FusionMethod, SearchMode, fuse_lists, hybrid_depth
from vitrine.protocols import Reranker, SearchIndex, ServingEncoder, StoredVectors
from vitrine.runtime.reranker import RerankerSpec
from vitrine.scoring import Hit, QueryKind
from vitrine.timing import recording

log = logging.getLogger(__name__)

TEXT_PARTS = ("t2t", "t2i")
IMAGE_PARTS = ("i2t", "i2i")
SYNC_CHUNK = 2000


@dataclass
class SearchOutcome:
    hits: list[Hit]
    records: list[ProductRecord | None]  # per hit (None only if the store lost it)
    alpha: float
    timings_ms: dict[str, float] = field(default_factory=dict)
    cache: str | None = None
    rerank_top_n: int | None = None  # N when reranked, else None
    rerank_scores: list[float | None] | None = None  # per hit; None for hits after the top N
    facets: dict[str, list[dict[str, object]]] | None = None  # field -> [{value, count}] when asked for
    facet_top_n: int | None = None  # first-stage candidates the facets counted
    mode: SearchMode = "vector"
    # lexical / hybrid: per hit, the vector parts, the vector score (the reranker's prior) and BM25's
    parts: list[dict[str, float]] | None = None


def check_reranker_fits_index(spec: RerankerSpec, index: SearchIndex) -> None:
    """UserError unless the index stores what the reranker reads: patch features on a grid it accepts, and
    for an aligned reranker, stored vectors of the dimension it reads."""
    stored, where = index.patch_spec, index.index_dir
    if stored is None:
        raise UserError(
            f"the bundle has a reranker but index {where} stores no image patch features: "
            "rebuild the index with this bundle"
        )
    have = (tuple(int(x) for x in stored.grid), int(stored.dim))
    # Patches on the bundle's image-encoder grid (input_grid: the reranker pools them per query) or already
    # pooled to the reranker's own grid (patch_grid) are both read; any other grid is another bundle's.
    readable = [(tuple(int(x) for x in spec.input_grid), int(spec.patch_dim)), (tuple(int(x) for x in spec.patch_grid), int(spec.patch_dim))]
    if have not in readable:
        raise UserError(
            f"the bundle's reranker reads {_reranker_patches_text(spec)}, index {where} stores {_patches_text(*have)}: "
            "rebuild the index with this bundle"
        )
    if spec.aligned_dim:
        if int(spec.aligned_dim) != int(index.embed_dim):
            raise UserError(
                f"the bundle's reranker reads {spec.aligned_dim}-d dual-encoder embeddings, index {where} holds "
                f"{index.embed_dim}-d vectors: rebuild the index with this bundle"
            )
        if not isinstance(index, StoredVectors):
            raise UserError(f"the bundle's reranker reads the candidates' stored vectors, which index {where} cannot look up")


def _patches_text(grid: tuple[int, ...], dim: int) -> str:
    return f"a {grid[0]}x{grid[1]} grid of {dim}-d patches"


def _reranker_patches_text(spec: RerankerSpec) -> str:
    own, source = tuple(spec.patch_grid), tuple(spec.input_grid)
    if own == source:
        return _patches_text(own, spec.patch_dim)
    return f"{_patches_text(source, spec.patch_dim)} (pooled to {own[0]}x{own[1]}) or {_patches_text(own, spec.patch_dim)}"


def open_reranker(settings: Settings, index: SearchIndex, encoder: ServingEncoder) -> Reranker | None:
    """The served bundle's Reranker (checked against the index's patches), or None when it has none."""
    from vitrine.runtime.reranker import Reranker as BundleReranker

    spec = encoder.reranker_spec
    if spec is None:
        return None
    check_reranker_fits_index(spec, index)  # before loading: a mismatch fails fast
    if encoder.path is None:
        raise UserError("the encoder lists a reranker but has no bundle directory to load it from")
    return BundleReranker.load(encoder.path, spec, threads=settings.threads)


def product_image_url(product_id: str) -> str:
    return f"/products/{quote(product_id, safe='')}/image"


class ServedVersion:
    """One index version as the service serves it: the index, and what derives from it (product records
    and thumbnails kept in memory, its Redis product store).

    Requests pin one (`SearchEngine.pinned`) for their whole life, so a query finishes on the version
    it started on. When a newer version is swapped in, the old one is retired: closed (its lease
    released, so pruning may delete it) as soon as no request holds it.
    """

    def __init__(self, index: SearchIndex, settings: Settings, link: RedisLink | None, *, owned: bool) -> None:
        self.index = index
        self.version = index.version
        self.size = len(index)
        self.filter_fields: dict[str, list[str]] = index.filter_fields()
        self.redis_store = RedisStore(link.client, self.version, prefix=settings.redis_prefix) if link else None
        self.store_synced = threading.Event()
        self.sync_lock = threading.Lock()
        self.thumbs: LRU[bytes] = LRU(settings.thumbnail_cache)
        # Records of the on-disk store, kept in memory (an index version never changes); Redis reads are not.
        self.disk_records: LRU[ProductRecord] = LRU(settings.record_cache)
        self.records_loaded = threading.Event()  # set when preload_records has finished (or given up)
        self._owned = owned  # opened by the engine (or handed to it to own): closed when retired
        self._pins = 0
        self._retired = False
        self._lock = threading.Lock()

    def pin(self) -> None:
        with self._lock:
            assert not (self._retired and self._pins == 0), f"version {self.version} is closed"
            self._pins += 1

    def try_pin(self) -> bool:
        """Pin unless retired (background work on a replaced version is not worth starting)."""
        with self._lock:
            if self._retired:
                return False
            self._pins += 1
            return True

    def unpin(self) -> None:
        with self._lock:
            self._pins -= 1
            close = self._retired and self._pins == 0
        if close:
            self._close()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            close = self._pins == 0
        if close:
            self._close()

    def preload_records(self) -> None:
        """Read the version's records into `disk_records` (up to its capacity), so a query's records stage
        is a memory lookup rather than SQLite reads under the store's lock. Run in the background."""
        if not self.try_pin():
            self.records_loaded.set()
            return
        try:
            ids = self.index.ids()[: self.disk_records.capacity]
            for start in range(0, len(ids), SYNC_CHUNK):
                if self._retired:
                    return
                chunk = ids[start : start + SYNC_CHUNK]
                for product_id, record in zip(chunk, self.index.get_many(chunk)):
                    if record is not None:
                        self.disk_records.put(product_id, record)
        except Exception as exc:  # noqa: BLE001 - an optimisation: queries read the store as before
            log.warning("preloading the records of version %s stopped: %s", self.version, exc)
        finally:
            self.records_loaded.set()
            self.unpin()

    def _close(self) -> None:
        if self._owned and hasattr(self.index, "close"):
            self.index.close()
            log.info("index version %s closed (its lease released)", self.version)


def check_index_fits(index: SearchIndex, encoder: ServingEncoder, reranker: Reranker | None) -> None:
    """UserError unless `index` was embedded by `encoder`'s model (and stores what the reranker reads)."""
    expected = index.bundle_fingerprint
    if expected and encoder.fingerprint and expected not in (encoder.fingerprint, encoder.embeds_like):
        raise UserError(f"index version {index.version} was built with bundle {expected}, the service runs {encoder.fingerprint}")
    if int(index.embed_dim) != int(encoder.embed_dim):
        raise UserError(f"index version {index.version} holds {index.embed_dim}-d vectors, the encoder gives {encoder.embed_dim}-d")
    if reranker is not None:
        check_reranker_fits_index(reranker.spec, index)


class SearchEngine:
    def __init__(
        self,
        settings: Settings,
        index: SearchIndex,
        encoder: ServingEncoder,
        metrics: ServiceMetrics,
        reranker: Reranker | None = None,
        *,
        owns_index: bool = False,
        open_version: Callable[[str], SearchIndex] | None = None,
    ) -> None:
        """`owns_index`: close `index` once a newer version replaces it (or at `close`).
        `open_version(name)` opens another version of the same index, for `switch_to`; None: no switching."""
        if reranker is not None:
            check_reranker_fits_index(reranker.spec, index)
            metrics.stage_seconds.labels("text", "rerank")  # the series exists before the first reranked query
            if reranker.spec.aligned_dim:
                metrics.stage_seconds.labels("image", "rerank")
        self.settings = settings
        self.encoder = encoder
        self.metrics = metrics
        self.reranker = reranker
        self.embed_dim = int(index.embed_dim)
        # Cached query embeddings are keyed by the model that computed them (an int8 copy's differ slightly).
        self.fingerprint = encoder.fingerprint or index.bundle_fingerprint or "unknown"
        self.open_version = open_version

        self.link: RedisLink | None = None
        remote = None
        if settings.redis_url:
            self.link = RedisLink(
                settings.redis_url, timeout_s=settings.redis_timeout_s, retry_s=settings.redis_retry_s,
                prefix=settings.redis_prefix,
            )  # fmt: skip
            self.link.on_state_change = self._redis_state_changed
            remote = RedisEmbeddingCache(self.link, self.fingerprint, self.embed_dim, settings.cache_ttl_s)
        self.cache = TieredEmbeddingCache(LRUEmbeddingCache(settings.cache_size, self.embed_dim), remote)
        # Concurrent cache misses share encoder calls (search.service.batching).
        # One call at a time per two cores: on 2 cores that gave larger batches and less CPU per query than
        # two at a time (docs/RESULTS.md, “Per-query cost”), while the other core serves HTTP and searches.
        concurrency = settings.encode_concurrency or max(1, (os.cpu_count() or 2) // 2)
        self.text_batcher = TextBatcher(encoder.encode_texts, max_batch=settings.text_batch_max, max_concurrent=concurrency)
        self._served = ServedVersion(index, settings, self.link, owned=owns_index)
        self._pin_lock = threading.Lock()  # pinning and swapping never interleave
        self._switch_lock = threading.Lock()  # one switch at a time
        metrics.index_products.set(self._served.size)

    # ------------------------------------------------------------------ the served version

    @contextmanager
    def pinned(self) -> Iterator[ServedVersion]:
        """The served version, held for the block: a switch meanwhile does not close it."""
        with self._pin_lock:
            served = self._served
            served.pin()
        try:
            yield served
        finally:
            served.unpin()

    @property
    def served(self) -> ServedVersion:
        return self._served

    @property
    def index(self) -> SearchIndex:
        return self._served.index

    @property
    def version(self) -> str:
        return self._served.version

    @property
    def size(self) -> int:
        return self._served.size

    @property
    def filter_fields(self) -> dict[str, list[str]]:
        return self._served.filter_fields

    @property
    def alphas(self):
        return self._served.index.alphas

    @property
    def redis_store(self) -> RedisStore | None:
        return self._served.redis_store

    def switch_to(self, version: str) -> bool:
        """Serve index version `version` from now on (False when already serving it).

        The version is opened and checked before the swap, so a version that cannot be served
        (missing, another bundle's) raises UserError and the current one stays. Requests already
        running finish on the version they pinned; the old version is closed after them.
        """
        if self.open_version is None:
            raise UserError("this service cannot switch index versions (the index was not opened from an index folder)")
        with self._switch_lock:
            if version == self.version:
                return False
            started = time.perf_counter()
            try:
                index = self.open_version(version)
            except UserError:
                self.metrics.index_switches.labels("failed").inc()
                raise
            try:
                check_index_fits(index, self.encoder, self.reranker)
                served = ServedVersion(index, self.settings, self.link, owned=True)
            except BaseException:
                self.metrics.index_switches.labels("failed").inc()
                if hasattr(index, "close"):
                    index.close()
                raise
            with self._pin_lock:
                old, self._served = self._served, served
            old.retire()
            seconds = time.perf_counter() - started
            self.metrics.index_switches.labels("ok").inc()
            self.metrics.index_switch_seconds.observe(seconds)
            self.metrics.index_products.set(served.size)
            log.info("now serving index version %s (%d products; was %s with %d), opened in %.2f s",
                     served.version, served.size, old.version, old.size, seconds)  # fmt: skip
        self._preload_records(served)
        if self.link is not None:
            threading.Thread(target=self.sync_product_store, args=(served,), name="redis-store-sync", daemon=True).start()
            if old.redis_store is not None:  # replicas still on it read it a little longer; then Redis drops it
                stale = old.redis_store
                self.link.call(lambda c: stale.expire(self.settings.redis_old_store_ttl_s), None)
        return True

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Populate the shared product store if Redis is there (else retried when it comes back); without
        Redis, read the records into memory in the background."""
        self._preload_records(self._served)
        if self.link is not None:
            self.metrics.redis_up.set(1 if self.link.ping() else 0)
            self.sync_product_store()

    def _preload_records(self, served: ServedVersion) -> None:
        if self.link is None and self.settings.record_cache > 0:  # with Redis, records come from there
            threading.Thread(target=served.preload_records, name="record-preload", daemon=True).start()
        else:
            served.records_loaded.set()

    def close(self) -> None:
        self._served.retire()
        if self.link is not None:
            self.link.close()

    def _redis_state_changed(self, up: bool) -> None:
        self.metrics.redis_up.set(1 if up else 0)
        served = self._served
        served.store_synced.clear()
        if up:
            # Redis may have restarted empty: re-check the store off the request path.
            threading.Thread(target=self.sync_product_store, args=(served,), name="redis-store-sync", daemon=True).start()

    def sync_product_store(self, served: ServedVersion | None = None) -> bool:
        """Make Redis hold the products of `served` (default: the served version); False when Redis is unreachable."""
        served = served or self._served
        if self.link is None or served.redis_store is None:
            return False
        if not served.try_pin():
            return False  # replaced meanwhile
        if not served.sync_lock.acquire(blocking=False):
            served.unpin()
            return False  # another thread is at it
        try:
            store = served.redis_store
            if self.link.call(lambda c: store.is_complete(served.size), False, force=True):
                served.store_synced.set()
                return True
            started = time.perf_counter()
            bulk = RedisStore(self.link.bulk_client, served.version, prefix=self.settings.redis_prefix)
            try:
                written = bulk.populate(self._all_records(served.index), served.size)
            except REDIS_ERRORS as exc:
                log.warning("redis product store %s not filled (reads use the disk store): %s", store.hash_key, exc)
                return False
            log.info("redis product store %s: wrote %d products in %.1fs", store.hash_key, written,
                     time.perf_counter() - started)  # fmt: skip
            served.store_synced.set()
            return True
        finally:
            served.sync_lock.release()
            served.unpin()

    @staticmethod
    def _all_records(index: SearchIndex):
        ids = index.ids()
        for start in range(0, len(ids), SYNC_CHUNK):
            for record in index.get_many(ids[start : start + SYNC_CHUNK]):
                if record is not None:
                    yield record

    @property
    def store_synced(self) -> bool:
        return self._served.store_synced.is_set()

    # ------------------------------------------------------------------ products

    def records(self, ids: list[str], served: ServedVersion | None = None) -> list[ProductRecord | None]:
        """Records for ids from the shared Redis store when it is usable, else (or for misses) the disk store.

        A miss in a synced Redis store (a record deleted, or damaged: not JSON, fields missing) is
        served from disk and written back, so the store repairs itself."""
        if served is None:
            with self.pinned() as pinned:
                return self.records(ids, pinned)
        found: list[ProductRecord | None] = [None] * len(ids)
        store = served.redis_store
        use_redis = store is not None and self.link is not None and served.store_synced.is_set() and bool(ids)
        if use_redis:
            found = self.link.call(lambda c: store.get_many(ids), [None] * len(ids))
        redis_misses = [i for i, record in enumerate(found) if record is None] if use_redis and self.link.up else []
        missing = []
        for i, record in enumerate(found):
            if record is None:
                found[i] = served.disk_records.get(ids[i])
                if found[i] is None:
                    missing.append(i)
        if missing:
            for i, record in zip(missing, served.index.get_many([ids[i] for i in missing])):
                found[i] = record
                if record is not None:
                    served.disk_records.put(ids[i], record)
        repairs = [found[i] for i in redis_misses if found[i] is not None]
        if repairs:
            self.link.call(lambda c: store.put_many(repairs), 0)
        return found

    def product(self, product_id: str, served: ServedVersion | None = None) -> ProductRecord:
        record = self.records([product_id], served)[0]
        if record is None:
            raise ApiError(404, "product_not_found", f"no product with id {product_id!r}")
        return record

    def thumbnail(self, product_id: str, served: ServedVersion | None = None) -> bytes:
        if served is None:
            with self.pinned() as pinned:
                return self.thumbnail(product_id, pinned)
        data = served.thumbs.get(product_id)
        if data is not None:
            return data
        if served.index.get(product_id) is None:
            raise ApiError(404, "product_not_found", f"no product with id {product_id!r}")
        try:
            image = served.index.open_image(product_id)
        except (OSError, ValueError, LookupError) as exc:
            log.warning("image of product %s unreadable: %s", product_id, exc)
            raise ApiError(404, "image_unavailable", f"the image of product {product_id!r} cannot be read") from exc
        data = jpeg_thumbnail(image, max_px=self.settings.thumbnail_px, quality=self.settings.thumbnail_quality)
        served.thumbs.put(product_id, data)
        return data

    # ------------------------------------------------------------------ rerank

    @property
    def default_rerank_top_n(self) -> int | None:
        """N used when a request gives none (None without a reranker)."""
        if self.reranker is None:
            return None
        return self.settings.rerank_top_n or min(int(self.reranker.spec.default_top_n), MAX_RERANK_TOP_N)

    @property
    def reranks_images(self) -> bool:
        """Photo queries can be reranked: the reranker reads the dual encoder's embeddings (aligned), so the
        photo's embedding stands for the query; a plain reranker has only a text query to read."""
        return self.reranker is not None and self.reranker.spec.aligned_dim > 0

    def rerank_plan(self, rerank: bool | None, top_n: int | None, kind: QueryKind = "text") -> int | None:
        """How many first-stage hits a query of `kind` reranks (None: no rerank).

        rerank omitted follows VITRINE_RERANK_DEFAULT, but giving rerank_top_n asks for it;
        asking when the bundle has no reranker (or, for a photo query, a reranker that reads text
        queries only) is a 422, never a silent plain answer.
        """
        wanted = rerank if rerank is not None else (top_n is not None or self.settings.rerank_default)
        if not wanted:
            return None
        loc = "rerank" if rerank is not None else "rerank_top_n"
        if self.reranker is None:
            if rerank is None and top_n is None:
                return None  # the default, with nothing to rerank with
            raise ApiError(
                422, "rerank_unavailable",
                "rerank was requested but the served bundle has no reranker; omit rerank or set it to false",
                [{"loc": ["body", loc], "msg": "no reranker in the bundle"}],
            )  # fmt: skip
        if kind == "image" and not self.reranks_images:
            if rerank is None and top_n is None:
                return None  # the default, with nothing the reranker can read
            raise ApiError(
                422, "rerank_unsupported",
                "photo queries cannot be reranked by this bundle's reranker: it reads a text query (it is not aligned "
                "with the dual encoder); omit rerank or set it to false",
                [{"loc": ["body", loc], "msg": "this reranker reranks text queries only"}],
            )  # fmt: skip
        return top_n or self.default_rerank_top_n

    def reranker_info(self) -> dict[str, Any]:
        if self.reranker is None:
            return {"loaded": False}
        spec = self.reranker.spec
        return {"loaded": True, "layers": int(self.reranker.layers), "model": spec.model, "hidden_size": spec.hidden_size,
                "patch_grid": list(spec.patch_grid), "input_grid": list(spec.input_grid), "patch_dim": spec.patch_dim,
                "aligned_dim": int(spec.aligned_dim), "image_queries": self.reranks_images,
                "prior_weight": spec.prior_weight, "precision": spec.precision,
                "default_on": self.settings.rerank_default, "top_n": self.default_rerank_top_n}  # fmt: skip

    def _rerank(self, text: str, query_emb: np.ndarray, outcome: SearchOutcome, top_n: int, served: ServedVersion) -> None:
        """Reorder the first `top_n` hits of `outcome` by the reranker's scores (stable on ties); the rest stay after them.

        `text` is the query segment ("" for a photo query), `query_emb` the first stage's query vector (the
        text's or the photo's): an aligned reranker reads it beside the candidates' stored vectors."""
        from vitrine.runtime.reranker import rerank_order

        n = min(top_n, len(outcome.hits))
        outcome.rerank_top_n = top_n
        if n == 0:  # the filters left nothing
            outcome.rerank_scores = []
            return
        head = outcome.hits[:n]
        ids = [h.id for h in head]
        titles = [record.title if record is not None else "" for record in outcome.records[:n]]
        patches = served.index.patches(ids)
        aligned = self._aligned_rows(query_emb, ids, titles, served) if self.reranker.spec.aligned_dim else None
        try:
            first_stage = [h.score for h in head] if outcome.parts is None else [p["vector"] for p in outcome.parts[:n]]
            scores = self.reranker.score(text, titles, patches, first_stage=np.array(first_stage, np.float32), aligned=aligned)
        except UserError as exc:  # e.g. a query the reranker's tokenizer cannot read
            raise ApiError(422, "invalid_query", str(exc)) from exc
        assert scores.shape == (n,), (scores.shape, n)
        order = [int(i) for i in rerank_order(np.arange(n), scores)]
        outcome.hits = [head[i] for i in order] + outcome.hits[n:]
        outcome.records = [outcome.records[i] for i in order] + outcome.records[n:]
        if outcome.parts is not None:
            outcome.parts = [outcome.parts[i] for i in order] + outcome.parts[n:]
        outcome.rerank_scores = [float(scores[i]) for i in order] + [None] * (len(outcome.hits) - n)

    @staticmethod
    def _aligned_rows(query_emb: np.ndarray, ids: list[str], titles: list[str], served: ServedVersion) -> np.ndarray:
        """[K, 3, D] (query, title, image) dual-encoder embeddings of the candidates `ids`, from the index's
        stored vectors (check_reranker_fits_index made sure it has them). A row without a title (its
        record's title is empty) gets a zero title slot, as the reranker was trained on such rows."""
        from vitrine.runtime.rerank_inputs import aligned_rows

        assert isinstance(served.index, StoredVectors)
        title_vecs, image_vecs = served.index.vectors(ids)
        has_title = np.array([bool(t) for t in titles])[:, None]
        return aligned_rows(query_emb, np.where(has_title, title_vecs, np.float32(0.0)), image_vecs)

    # ------------------------------------------------------------------ search

    def search_text(
        self, query: str, *, k: int, alpha: float | None, filters: dict | None, rerank_top_n: int | None = None,
        mode: SearchMode = "vector", fusion: FusionMethod | None = None, facets: list[str] | None = None,
        include_predicted: bool = False,
    ) -> SearchOutcome:
        """Top k for a text query; with `rerank_top_n` (see rerank_plan) the first-stage top N are reranked.
        `mode`: rank by the embeddings (vector), by BM25 (lexical), or both fused (hybrid, by `fusion`);
        with `facets`, value counts over the first-stage top N (search/service/facets.py)."""
        if rerank_top_n is not None and (self.reranker is None or not 1 <= rerank_top_n <= MAX_RERANK_TOP_N):
            raise ValueError(f"rerank_top_n={rerank_top_n!r} needs a reranker and 1..{MAX_RERANK_TOP_N}; see rerank_plan")
        timings: dict[str, float] = {}
        with self.pinned() as served, self.metrics.stage("text", "total", timings):
            with self.metrics.stage("text", "decode", timings):
                text = normalise_query(query)
            with self.metrics.stage("text", "encode", timings):
                emb, tier = self.cache.lookup(text)
                if emb is None:
                    emb = self._encode_text(text, timings)
                    self.cache.put(text, emb)
                self.metrics.query_cache.labels(tier).inc()
            fetch = k if rerank_top_n is None else max(k, rerank_top_n)
            if mode == "vector":
                outcome = self._search(emb, "text", k=fetch, alpha=alpha, filters=filters, timings=timings, served=served,
                                       facets=facets, include_predicted=include_predicted)  # fmt: skip
            else:
                fields = resolve_facets(facets, served.filter_fields) if facets else None
                depth = max(fetch, self.settings.facet_top_n) if fields else fetch
                outcome = self._search_lexical(text, emb, mode, fusion or DEFAULT_FUSION, k=depth, alpha=alpha,
                                               filters=filters, timings=timings, served=served,
                                               include_predicted=include_predicted)  # fmt: skip
                if fields:  # counted over the fused top N, then cut to what was asked for
                    outcome.facets = count_facets(outcome.records[: self.settings.facet_top_n], fields)
                    outcome.facet_top_n = min(len(outcome.records), self.settings.facet_top_n)
                    outcome.hits, outcome.records = outcome.hits[:fetch], outcome.records[:fetch]
                    outcome.parts = outcome.parts[:fetch] if outcome.parts is not None else None
            if rerank_top_n is not None:
                with self.metrics.stage("text", "rerank", timings):
                    self._rerank(text, emb, outcome, rerank_top_n, served)
                outcome.hits, outcome.records = outcome.hits[:k], outcome.records[:k]
                outcome.rerank_scores = (outcome.rerank_scores or [])[:k]
        outcome.cache = tier
        outcome.timings_ms = timings
        return outcome

    def search_image(self, image: Image.Image, *, k: int, alpha: float | None, filters: dict | None,
                     timings: dict[str, float], facets: list[str] | None = None,
                     include_predicted: bool = False, rerank_top_n: int | None = None) -> SearchOutcome:  # fmt: skip
        """`timings` may already hold the decode stage, measured by the router. With `rerank_top_n`
        (rerank_plan(..., kind="image"): an aligned reranker) the first-stage top N are reranked from
        (no query text, title, patches) rows whose query embedding is the photo's."""
        if rerank_top_n is not None and (not self.reranks_images or not 1 <= rerank_top_n <= MAX_RERANK_TOP_N):
            raise ValueError(f"rerank_top_n={rerank_top_n!r} needs an aligned reranker and 1..{MAX_RERANK_TOP_N}; see rerank_plan")
        start = time.perf_counter()
        with self.metrics.stage("image", "encode", timings):
            try:
                embs = self.encoder.encode_images([image])
            except UserError as exc:  # e.g. an image the preprocessing refuses to resize
                raise ApiError(422, "invalid_image", str(exc)) from exc
            emb = self._check_emb(embs, "image")
        with self.pinned() as served:
            fetch = k if rerank_top_n is None else max(k, rerank_top_n)
            outcome = self._search(emb, "image", k=fetch, alpha=alpha, filters=filters, timings=timings, served=served,
                                   facets=facets, include_predicted=include_predicted)  # fmt: skip
            if rerank_top_n is not None:
                with self.metrics.stage("image", "rerank", timings):
                    self._rerank("", emb, outcome, rerank_top_n, served)
                outcome.hits, outcome.records = outcome.hits[:k], outcome.records[:k]
                outcome.rerank_scores = (outcome.rerank_scores or [])[:k]
        total = (time.perf_counter() - start) * 1000.0 + timings.get("decode", 0.0)
        timings["total"] = total
        self.metrics.stage_seconds.labels("image", "total").observe(total / 1000.0)
        outcome.timings_ms = timings
        return outcome

    def _encode_text(self, text: str, timings: dict[str, float]) -> np.ndarray:
        try:
            encoded = self.text_batcher.encode(text)
        except UserError as exc:  # e.g. a text the tokenizer cannot turn into tokens
            raise ApiError(422, "invalid_query", str(exc)) from exc
        self.metrics.text_batch_size.observe(encoded.batch_size)
        for part, ms in encoded.parts.items():  # tokenise: the share of the batch's call, not its queue wait
            timings[part] = ms
            self.metrics.stage_seconds.labels("text", part).observe(ms / 1000.0)
        return self._check_emb(encoded.embedding[None, :], "text")

    def _check_emb(self, embs: np.ndarray, what: str) -> np.ndarray:
        assert embs.shape == (1, self.embed_dim), (what, embs.shape, self.embed_dim)
        emb = np.ascontiguousarray(embs[0], dtype=np.float32)
        if not np.isfinite(emb).all():
            raise RuntimeError(f"{what} encoder returned non-finite values")
        return emb

    def _search(self, emb: np.ndarray, kind: QueryKind, *, k: int, alpha: float | None, filters: dict | None,
                timings: dict[str, float], served: ServedVersion, facets: list[str] | None = None,
                exclude: str | None = None, label: str | None = None, include_predicted: bool = False) -> SearchOutcome:  # fmt: skip
        """Top k by the index; `exclude`: an id left out of the answer (and of facet counts);
        `label`: the metrics' kind when it is not the query kind (similar products)."""
        used_alpha = served.index.alphas.resolve(kind, alpha)
        fields = resolve_facets(facets, served.filter_fields) if facets else None
        depth = k + (exclude is not None)
        extra: dict[str, int | bool] = {}
        if include_predicted and filters:  # only changes filtering; indexes without backfill need not know it
            extra["include_predicted"] = True
        if fields:  # rank the facet depth from the pool a plain query of k draws from: the top k stay the same
            extra["fetch_k"] = default_fetch_k(depth)
            depth = max(depth, self.settings.facet_top_n)
        metric_kind = label or kind
        parts: dict[str, float] = {}
        # the index reports its scan and fill_in stages
        with self.metrics.stage(metric_kind, "search", timings), recording(parts), filter_errors():
            hits = served.index.search(emb, k=depth, kind=kind, alpha=used_alpha, filters=filters or None, **extra)
        for part, ms in parts.items():
            timings[part] = ms
            self.metrics.stage_seconds.labels(metric_kind, part).observe(ms / 1000.0)
        if not fields:
            hits = [h for h in hits if h.id != exclude][:k]
        with self.metrics.stage(metric_kind, "records", timings):
            records = self.records([h.id for h in hits], served)
        if not fields:
            return SearchOutcome(hits=hits, records=records, alpha=used_alpha)
        counted = [r for h, r in zip(hits[: self.settings.facet_top_n], records) if h.id != exclude]
        kept = [i for i, h in enumerate(hits) if h.id != exclude][:k]
        return SearchOutcome(hits=[hits[i] for i in kept], records=[records[i] for i in kept], alpha=used_alpha,
                             facets=count_facets(counted, fields), facet_top_n=len(counted))  # fmt: skip

    def similar(self, product_id: str, *, k: int, alpha: float | None, filters: dict | None,
                facets: list[str] | None = None) -> SearchOutcome:  # fmt: skip
        """Products like `product_id`: a photo query with its stored image vector (no encoding), itself left out.

        Scored as a photo query is, α·sim(image, title) + (1−α)·sim(image, image) with the index's photo α;
        404 for an id the served version does not hold, 422 similar_unavailable for an index without stored vectors."""
        timings: dict[str, float] = {}
        with self.pinned() as served, self.metrics.stage("similar", "total", timings):
            if not isinstance(served.index, StoredVectors):
                raise ApiError(422, "similar_unavailable", "this index cannot look up a product's stored vectors")
            with self.metrics.stage("similar", "encode", timings):  # the "encoding" is a lookup
                try:
                    _, image = served.index.vectors([product_id])
                except KeyError:
                    raise ApiError(404, "product_not_found", f"no product with id {product_id!r}") from None
            emb = self._check_emb(image, "stored image")
            outcome = self._search(emb, "image", k=k, alpha=alpha, filters=filters, timings=timings, served=served,
                                   facets=facets, exclude=product_id, label="similar")  # fmt: skip
        outcome.timings_ms = timings
        return outcome

    def _search_lexical(self, text: str, emb: np.ndarray, mode: SearchMode, fusion: FusionMethod, *, k: int,
                        alpha: float | None, filters: dict | None, timings: dict[str, float],
                        served: ServedVersion, include_predicted: bool = False) -> SearchOutcome:  # fmt: skip
        """mode lexical (BM25's top k) or hybrid (the vector and BM25 top `hybrid_depth(k)` fused, `vitrine.fusion`).

        Every hit also gets its exact vector score and parts (`score_ids`), which the reranker's prior reads."""
        index = served.index
        used_alpha = index.alphas.resolve("text", alpha)
        depth = k if mode == "lexical" else hybrid_depth(k)
        predicted = {"include_predicted": True} if include_predicted and filters else {}
        with self.metrics.stage("text", "search", timings), filter_errors():
            lexical = {h.id: h.score for h in index.lexical_search(text, k=depth, filters=filters or None, **predicted)}
            # fetch_k=depth: the candidates a vector top-10 reads; the fused list needs no deeper vector list
            vector = (index.search(emb, k=depth, kind="text", alpha=used_alpha, filters=filters or None, fetch_k=depth,
                                   **predicted)
                      if mode == "hybrid" else [])  # fmt: skip
        with self.metrics.stage("text", "fuse", timings):
            if mode == "lexical":
                ranked = list(lexical.items())
            else:
                weights = [1.0 - DEFAULT_LEXICAL_WEIGHT, DEFAULT_LEXICAL_WEIGHT]
                ranked = fuse_lists([{h.id: h.score for h in vector}, lexical], method=fusion, weights=weights, k=k)
            scored = {h.id: h for h in vector}
            missing = [ident for ident, _ in ranked if ident not in scored]
            scored.update((h.id, h) for h in index.score_ids(emb, missing, kind="text", alpha=used_alpha))
            hits = [Hit(ident, float(score), scored[ident].title_sim, scored[ident].image_sim) for ident, score in ranked]
            parts = [
                {"vector": scored[h.id].score, **({"bm25": lexical[h.id]} if h.id in lexical else {})} for h in hits
            ]
            records = self.records([h.id for h in hits], served)
        return SearchOutcome(hits=hits, records=records, alpha=used_alpha, mode=mode, parts=parts)


@contextmanager
def filter_errors() -> Iterator[None]:
    """A filter the index cannot apply is the request's fault: 422 with the field."""
    try:
        yield
    except UnknownFilterError as exc:
        raise ApiError(422, "unknown_filter", str(exc), [{"loc": ["body", "filters", exc.field], "msg": str(exc)}]) from exc
    except FilterError as exc:
        raise ApiError(422, "invalid_filter", str(exc), [{"loc": ["body", "filters"], "msg": str(exc)}]) from exc


def result_parts(kind: QueryKind, hit: Hit) -> dict[str, float]:
    names = TEXT_PARTS if kind == "text" else IMAGE_PARTS
    return {names[0]: float(hit.title_sim), names[1]: float(hit.image_sim)}
