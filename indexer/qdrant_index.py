"""A second `SearchIndex`: the same index versions, searched by Qdrant instead of Faiss.

    engine = QdrantEngine.embedded("indexes/fashion/qdrant")      # local mode: no server (tests, `vitrine serve`)
    engine = QdrantEngine.connect("http://qdrant:6333")            # a server or a cluster (production)
    index = QdrantIndex.open("indexes/fashion", engine=engine)     # loads the live version when missing
    hits = index.search(query_emb, k=10, filters={"gender": "women"})

The index version on disk stays the source of truth (`indexer.build` writes it; upserts and
deletes write new versions, as for Faiss). Each version is mirrored by one collection,
`<prefix>-<version>`, built from the version's own files (labels, title and image vectors, the
product store) and never changed afterwards, so a replica still serving the previous version
never sees the next one's points. Points are the store's labels; each has two named vectors,
`text` (title embedding) and `image`, compared by dot product (the vectors are unit length),
and a payload: the product id and every filterable field's value in `match_key` form.

Search reproduces `ProductIndex.search` (FashionKLIP §5 fusion, `vitrine.scoring`): one batch
request asks for the top `fetch_k` points by the `text` vector and by the `image` vector (the
filter applied inside the engine, as a payload filter) with both vectors of every candidate;
the union is scored exactly here, float64 inner products fused with α and sorted by score then
id, as the Faiss backend does. Filters are validated by the same `FilterColumns.normalise`, so
an unknown field or a bad value is the same FilterError either way.

The version's product store and patch features are read from disk as `ProductIndex` does
(records, thumbnails, the reranker's patches); only vectors and search live in Qdrant.
"""
from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from PIL import Image

from indexer.candidates import check_counts, check_query, exact_similarities, fetch_size, rank_union, rows_of_ids, scored_hits
from indexer.filters import FilterColumns, match_key
from indexer.layout import IndexLayout, VersionLease
from indexer.lexical import LexicalSearch
from indexer.manifest import IndexManifest, IndexVersionFacts, read_manifest
from indexer.storage import open_patches, patch_roles
from indexer.store import SqliteProductStore
from vitrine.catalog.record import ProductRecord
from vitrine.errors import IndexUnavailableError, UserError
from vitrine.images import open_image_ref
from vitrine.scoring import Hit, QueryKind

if TYPE_CHECKING:
    from qdrant_client import QdrantClient, models

    from indexer.build import IndexBuildResult
    from vitrine.catalog.product import Product
    from vitrine.catalog.registry import Catalog
    from vitrine.protocols import ServingEncoder

log = logging.getLogger(__name__)
T = TypeVar("T")

VECTORS = ("text", "image")  # named vectors: the title embedding and the image embedding
DEFAULT_PREFIX = "vitrine"
UPLOAD_BATCH = 512
DEFAULT_HNSW_EF = 128  # approximate (HNSW) search: at least fetch_k
TIE_MARGIN = 16  # points fetched past fetch_k to see whether a tie at the cut goes on
_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,150}$")
_SAFE_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _client_errors() -> tuple[type[BaseException], ...]:
    """What a lost or failing Qdrant raises (REST, gRPC, transport); anything else is a bug."""
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    errors: list[type[BaseException]] = [UnexpectedResponse, ResponseHandlingException, ConnectionError, TimeoutError]
    try:
        import grpc

        errors.append(grpc.RpcError)
    except ImportError:  # pragma: no cover - grpcio is a dependency of qdrant-client
        pass
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def payload_key(field: str) -> str:
    """The payload key of a filterable field: `f_<name>`, or `fx_<hex>` for names a key path cannot spell."""
    if _SAFE_FIELD.match(field):
        return f"f_{field}"
    return f"fx_{field.encode('utf-8').hex()}"


def predicted_payload_key(field: str) -> str:
    """The payload key of a field's value with backfilled values filling the catalog's gaps (`pf_<name>`)."""
    return "p" + payload_key(field)


class QdrantEngine:
    """A Qdrant client and how this deployment names and shapes collections.

    Embedded (local mode, `QdrantClient(path=...)` or `":memory:"`): Qdrant's Python
    implementation in this process, exact search, payload filters evaluated in Python; its
    folder is locked by one process at a time. Server or cluster (`connect(url)`): collections
    get `shard_number` shards and `replication_factor` copies of each, and keyword payload
    indexes on every filter field.

    Shared by the QdrantIndex objects of one process (one per open version): each `open`
    acquires it and each `close` releases it. Whoever creates an engine closes it, or lets the
    last release close it (`close_when_unused`, as the service does: a reopened version takes
    the engine over from the one it replaces).
    """

    def __init__(
        self,
        client: QdrantClient,
        *,
        embedded: bool,
        location: str,
        prefix: str = DEFAULT_PREFIX,
        shard_number: int | None = None,
        replication_factor: int | None = None,
        close_when_unused: bool = False,
    ) -> None:
        if not _PREFIX.match(prefix or ""):
            raise UserError(f"Qdrant collection prefix {prefix!r} must be 1-64 letters, digits, '_' or '-'")
        for name, value in (("shard_number", shard_number), ("replication_factor", replication_factor)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"Qdrant {name} must be a positive integer, got {value!r}")
        self.client = client
        self.embedded = embedded
        self.location = location
        self.prefix = prefix
        self.shard_number = shard_number
        self.replication_factor = replication_factor
        self.close_when_unused = close_when_unused
        self._users = 0
        self._closed = False
        self._users_lock = threading.Lock()
        # Local mode is plain Python over numpy arrays, not documented as thread-safe: one call at a time.
        self._call_lock: threading.Lock | None = threading.Lock() if embedded else None
        self._errors = _client_errors()

    @classmethod
    def embedded(cls, path: str | Path, *, prefix: str = DEFAULT_PREFIX, close_when_unused: bool = False) -> QdrantEngine:
        """Local mode in folder `path` (created if missing), or in memory for `":memory:"`."""
        from qdrant_client import QdrantClient

        location = str(path)
        try:
            if location == ":memory:":
                client = QdrantClient(location=":memory:")
            else:
                Path(path).mkdir(parents=True, exist_ok=True)
                client = QdrantClient(path=location)
        except RuntimeError as exc:  # the folder's lock is held by another process
            raise UserError(
                f"the embedded Qdrant at {location} is open in another process ({exc}); local mode allows one "
                "process per folder: give each replica its own copy, or run a Qdrant server (--qdrant-url)"
            ) from None
        return cls(client, embedded=True, location=location, prefix=prefix, close_when_unused=close_when_unused)

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        api_key: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        shard_number: int | None = None,
        replication_factor: int | None = None,
        prefer_grpc: bool = True,
        timeout_s: int = 30,
        close_when_unused: bool = False,
    ) -> QdrantEngine:
        """A Qdrant server or cluster at `url` (http(s)://host:6333; gRPC on 6334 when `prefer_grpc`)."""
        from qdrant_client import QdrantClient

        if not re.match(r"^https?://[^\s/]+", url or ""):
            raise UserError(f"Qdrant URL must look like http://host:6333, got {url!r}")
        client = QdrantClient(url=url, api_key=api_key, prefer_grpc=prefer_grpc, timeout=timeout_s)
        return cls(client, embedded=False, location=url, prefix=prefix, shard_number=shard_number,
                   replication_factor=replication_factor, close_when_unused=close_when_unused)  # fmt: skip

    def describe(self) -> str:
        return f"qdrant {'embedded' if self.embedded else 'server'} {self.location}"

    def collection_name(self, version: str) -> str:
        """The collection that mirrors index version `version`."""
        if not _SAFE_NAME.match(version):
            version = "v" + hashlib.sha256(version.encode("utf-8")).hexdigest()[:24]
        return f"{self.prefix}-{version}"

    def call(self, fn: Callable[[QdrantClient], T]) -> T:
        """`fn(client)`; a failure of the engine (down, timing out, refusing) is an IndexUnavailableError."""
        try:
            if self._call_lock is None:
                return fn(self.client)
            with self._call_lock:
                return fn(self.client)
        except self._errors as exc:
            raise IndexUnavailableError(f"{self.describe()} did not answer: {type(exc).__name__}: {exc}"[:500]) from exc

    def acquire(self) -> QdrantEngine:
        with self._users_lock:
            if self._closed:
                raise UserError(f"{self.describe()} is closed")
            self._users += 1
        return self

    def release(self) -> None:
        with self._users_lock:
            self._users = max(0, self._users - 1)
            last = self._users == 0
        if last and self.close_when_unused:
            self.close()

    def close(self) -> None:
        with self._users_lock:
            if self._closed:
                return
            self._closed = True
        self.client.close()  # local mode: releases the folder's lock

    def collections(self) -> list[str]:
        return [c.name for c in self.call(lambda c: c.get_collections()).collections]


# ---------------------------------------------------------------- loading versions


def _index_root(version_dir: Path) -> Path:
    """The index folder of a version folder (`<root>/versions/<name>`), or the bare version folder itself."""
    return version_dir.parent.parent if version_dir.parent.name == "versions" else version_dir


def _identity(version_dir: Path, manifest: IndexManifest) -> dict[str, Any]:
    """What a collection records about the version it mirrors (checked on every open)."""
    return {
        "version": version_dir.name,
        "created_at": manifest.created_at,
        "fingerprint": manifest.bundle.fingerprint or manifest.bundle.encoder,
        "products": manifest.counts.products,
        "embed_dim": manifest.embed_dim,
        "index_dir": str(_index_root(version_dir).resolve()),
    }


def _recorded_identity(engine: QdrantEngine, name: str) -> dict[str, Any] | None:
    info = engine.call(lambda c: c.get_collection(name))
    metadata = info.config.metadata or {}
    recorded = metadata.get("vitrine") if isinstance(metadata, dict) else None
    return recorded if isinstance(recorded, dict) else None


def _same_version(recorded: dict[str, Any] | None, identity: dict[str, Any]) -> bool:
    """Same version content; `index_dir` may differ (replicas mount the index at different paths)."""
    if recorded is None:
        return False
    keys = ("version", "created_at", "fingerprint", "products", "embed_dim")
    return all(recorded.get(key) == identity[key] for key in keys)


def _count(engine: QdrantEngine, name: str) -> int:
    return int(engine.call(lambda c: c.count(name, exact=True)).count)


def collection_state(engine: QdrantEngine, version_dir: Path, manifest: IndexManifest | None = None) -> str:
    """"missing", "partial" (an interrupted load) or "complete" for the collection of `version_dir`;
    UserError when the collection of that name holds another index's version."""
    manifest = manifest or read_manifest(version_dir)
    name = engine.collection_name(version_dir.name)
    if not engine.call(lambda c: c.collection_exists(name)):
        return "missing"
    identity = _identity(version_dir, manifest)
    if not _same_version(_recorded_identity(engine, name), identity):
        raise UserError(
            f"Qdrant collection {name} ({engine.describe()}) does not hold index version {version_dir}: "
            "another index uses the same collection prefix; give this one its own (--qdrant-collection)"
        )
    return "complete" if _count(engine, name) == manifest.counts.products else "partial"


def load_version(engine: QdrantEngine, version_dir: str | Path, *, progress: Callable[[int, int], None] | None = None) -> str:
    """Make the engine hold `version_dir`'s collection, built from the version's vectors and product
    store when it is missing (or was left partial by an interrupted load); returns its name."""
    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    name = engine.collection_name(version_dir.name)
    state = collection_state(engine, version_dir, manifest)
    if state == "complete":
        return name
    if state == "partial":
        log.warning("Qdrant collection %s is incomplete (an interrupted load): loading it again", name)
        engine.call(lambda c: c.delete_collection(name))
    started = time.perf_counter()
    _create_collection(engine, name, version_dir, manifest)
    loaded = 0
    for ids, text, image, payloads in _version_batches(version_dir, manifest):
        _upsert(engine, name, ids, text, image, payloads)
        loaded += len(ids)
        if progress is not None:
            progress(loaded, manifest.counts.products)
    count = _count(engine, name)
    if count != manifest.counts.products:
        raise UserError(f"Qdrant collection {name} holds {count:,} points after loading {manifest.counts.products:,}")
    log.info("loaded %d products of %s into Qdrant collection %s (%s) in %.1fs", count, version_dir.name, name,
             engine.describe(), time.perf_counter() - started)  # fmt: skip
    return name


def _create_collection(engine: QdrantEngine, name: str, version_dir: Path, manifest: IndexManifest) -> None:
    from qdrant_client import models

    vectors = {v: models.VectorParams(size=manifest.embed_dim, distance=models.Distance.DOT) for v in VECTORS}
    options: dict[str, Any] = {}
    if not engine.embedded:  # local mode has one shard and no replicas
        options = {"shard_number": engine.shard_number, "replication_factor": engine.replication_factor}
    metadata = {"vitrine": _identity(version_dir, manifest)}
    engine.call(lambda c: c.create_collection(name, vectors_config=vectors, metadata=metadata, **options))
    if not engine.embedded:  # payload indexes serve filtered HNSW search on a server (local mode scans)
        with SqliteProductStore(version_dir / manifest.files["store"]) as store:
            records = [record for _, record in store.scan()]
        fields = list(FilterColumns.from_records(records).fields())
        predicted = list(FilterColumns.from_records(records, include_predicted=True).fields()) if any(r.predicted for r in records) else []
        for key in ["id", *(payload_key(f) for f in fields), *(predicted_payload_key(f) for f in predicted)]:
            engine.call(lambda c, key=key: c.create_payload_index(name, key, models.PayloadSchemaType.KEYWORD, wait=True))


def _version_batches(version_dir: Path, manifest: IndexManifest) -> Iterator[tuple[list[int], np.ndarray, np.ndarray, list[dict]]]:
    """(labels, title vectors, image vectors, payloads) of the version, UPLOAD_BATCH products at a time."""
    files = manifest.files
    labels = np.load(version_dir / files["labels"])
    text = np.load(version_dir / files["text_vectors"], mmap_mode="r")
    image = np.load(version_dir / files["image_vectors"], mmap_mode="r")
    with SqliteProductStore(version_dir / files["store"]) as store:
        scanned = list(store.scan())
    if [label for label, _ in scanned] != labels.tolist():
        raise UserError(f"index version {version_dir} is inconsistent: the product store and labels.npy disagree")
    columns = FilterColumns.from_records(record for _, record in scanned)
    keys = {field: payload_key(field) for field in columns.fields()}
    # A backfilled version also carries each field with predicted values filling the gaps (include_predicted).
    with_predicted = FilterColumns.from_records((record for _, record in scanned), include_predicted=True)
    predicted_keys = (
        {field: predicted_payload_key(field) for field in with_predicted.fields()} if any(r.predicted for _, r in scanned) else {}
    )
    for start in range(0, len(scanned), UPLOAD_BATCH):
        chunk = scanned[start : start + UPLOAD_BATCH]
        payloads = [
            {
                "id": record.id,
                **{key: match_key(record.attribute(field)) for field, key in keys.items()},
                **{key: match_key(record.attribute_or_predicted(field)) for field, key in predicted_keys.items()},
            }
            for _, record in chunk
        ]
        end = start + len(chunk)
        yield labels[start:end].tolist(), np.asarray(text[start:end]), np.asarray(image[start:end]), payloads


def _upsert(engine: QdrantEngine, name: str, ids: list[int], text: np.ndarray, image: np.ndarray, payloads: list[dict]) -> None:
    from qdrant_client import models

    batch = models.Batch(ids=ids, vectors={"text": text.tolist(), "image": image.tolist()}, payloads=payloads)
    engine.call(lambda c: c.upsert(name, points=batch, wait=True))


def drop_stale_collections(engine: QdrantEngine, index_dir: str | Path) -> list[str]:
    """Delete this index's collections whose version no longer exists on disk (pruned or collected).

    Only collections that record this index folder are touched (another index on the same engine
    keeps its own); versions a server is still reading are leased on disk, so they are kept.
    """
    layout = IndexLayout(index_dir)
    on_disk = {engine.collection_name(v.name) for v in layout.finished_versions()}
    root = str(layout.root.resolve())
    dropped = []
    for name in engine.collections():
        if not name.startswith(f"{engine.prefix}-") or name in on_disk:
            continue
        recorded = _recorded_identity(engine, name)
        if recorded is not None and recorded.get("index_dir") == root:
            engine.call(lambda c, name=name: c.delete_collection(name))
            dropped.append(name)
    if dropped:
        log.info("dropped %d Qdrant collection(s) of pruned versions: %s", len(dropped), ", ".join(dropped))
    return dropped


def sync_index(engine: QdrantEngine, index_dir: str | Path, *, progress: Callable[[int, int], None] | None = None) -> str:
    """Load the live version of `index_dir` into the engine and drop the collections of pruned versions."""
    version = IndexLayout(index_dir).resolve()
    name = load_version(engine, version, progress=progress)
    drop_stale_collections(engine, index_dir)
    return name


def _synced(engine: QdrantEngine, out: str | Path) -> str:
    with IndexLayout(out).lock():  # as a writer: no other load races to create the same collection
        return sync_index(engine, out)


def build_qdrant_index(
    catalog: Catalog | Sequence[Product], encoder: ServingEncoder, out: str | Path, engine: QdrantEngine, **options: Any
) -> tuple[IndexBuildResult, str]:
    """`indexer.build.build_index`, then its version loaded into `engine`: (IndexBuildResult, collection)."""
    from indexer.build import build_index

    result = build_index(catalog, encoder, out, **options)
    return result, _synced(engine, out)


def upsert_qdrant_index(
    out: str | Path, catalog: Catalog | Sequence[Product], encoder: ServingEncoder, engine: QdrantEngine, **options: Any
) -> tuple[IndexBuildResult, str]:
    """`indexer.build.upsert_index` (a new version: new and changed products), then loaded into `engine`."""
    from indexer.build import upsert_index

    result = upsert_index(out, catalog, encoder, **options)
    return result, _synced(engine, out)


def delete_from_qdrant_index(out: str | Path, ids: Iterable[str], engine: QdrantEngine, **options: Any) -> tuple[IndexBuildResult, str]:
    """`indexer.build.delete_from_index` (a new version without `ids`), then loaded into `engine`."""
    from indexer.build import delete_from_index

    result = delete_from_index(out, ids, **options)
    return result, _synced(engine, out)


# ---------------------------------------------------------------- searching


class QdrantIndex(LexicalSearch, IndexVersionFacts):
    """One index version, searched through its Qdrant collection. Thread-safe for concurrent searches.

    Satisfies `vitrine.protocols.SearchIndex`, as `ProductIndex` does, with the same results.
    """

    def __init__(
        self,
        *,
        index_dir: Path,
        version_dir: Path,
        manifest: IndexManifest,
        store: SqliteProductStore,
        engine: QdrantEngine,
        collection: str,
        patches: np.ndarray | None = None,
        lease: VersionLease | None = None,
        exact: bool | None = None,
    ) -> None:
        scanned = list(store.scan())
        n = len(scanned)
        if n != manifest.counts.products:
            raise UserError(f"index version {version_dir} is inconsistent: {n} stored products, manifest says {manifest.counts.products}")
        if (patches is None) != (manifest.patches is None):
            raise UserError(f"index version {version_dir} is inconsistent: the manifest's patch spec and the stored patches disagree")
        if patches is not None and patches.shape != (n, *manifest.patches.shape):
            raise UserError(f"index version {version_dir} is inconsistent: patches {patches.shape}, expected {(n, *manifest.patches.shape)}")
        self.index_dir = index_dir
        self.version_dir = version_dir
        self.engine = engine
        self.collection = collection
        self._manifest = manifest
        self.manifest: dict[str, Any] = manifest.model_dump(mode="json")
        self._store = store
        self._lease = lease
        self._patches = patches
        self._labels = np.array([label for label, _ in scanned], dtype=np.int64)
        self._ids = np.array([record.id for _, record in scanned], dtype=str) if n else np.zeros(0, dtype="<U1")
        self._columns = FilterColumns.from_records(record for _, record in scanned)
        self._has_predicted = any(record.predicted for _, record in scanned)
        self._keys = {field: payload_key(field) for field in self._columns.fields()}
        # include_predicted filters read the `pf_` payloads, where backfilled values fill the catalog's gaps.
        self._columns_with_predicted = (
            FilterColumns.from_records((record for _, record in scanned), include_predicted=True) if self._has_predicted else self._columns
        )
        self._predicted_keys = {field: predicted_payload_key(field) for field in self._columns_with_predicted.fields()}
        # Exact (brute-force) search mirrors a flat Faiss index; HNSW otherwise (local mode is always exact).
        self.exact = bool(manifest.index.get("exact", False)) if exact is None else bool(exact)
        self._closed = False
        self._vectors: tuple[np.ndarray, np.ndarray] | None = None  # (title, image), mapped by `vectors`

    @classmethod
    def open(
        cls,
        index_dir: str | Path,
        *,
        engine: QdrantEngine,
        version: str | None = None,
        load: bool | None = None,
        exact: bool | None = None,
    ) -> QdrantIndex:
        """Open the live version of `index_dir` (or its version named `version`) on `engine`.

        `load` (default: when the engine is embedded) builds the version's collection if it is
        missing; otherwise a missing collection is a UserError naming the command that loads it
        (a cluster is loaded by `vitrine index ... --qdrant-url`, never by each replica). The
        version is leased on disk until `close()`, as `ProductIndex.open` does.
        """
        layout = IndexLayout(index_dir)
        folder, lease = layout.open_version(version)
        engine.acquire()
        try:
            manifest = read_manifest(folder)
            for role in ("store", "labels", "text_vectors", "image_vectors", *patch_roles(manifest)):
                if role not in manifest.files or not (folder / manifest.files[role]).is_file():
                    raise UserError(f"index version {folder} is incomplete: {manifest.files.get(role, role)} missing")
            if engine.embedded if load is None else load:
                collection = load_version(engine, folder)
                if engine.embedded:
                    drop_stale_collections(engine, layout.root)
            else:
                collection = engine.collection_name(folder.name)
                state = collection_state(engine, folder, manifest)
                if state != "complete":
                    raise UserError(
                        f"Qdrant collection {collection} ({engine.describe()}) is {state}: load index version "
                        f"{folder.name} with `vitrine index --out {layout.root} --qdrant-load --qdrant-url URL`"
                    )
            patches = open_patches(folder, manifest)
            return cls(
                index_dir=layout.root, version_dir=folder, manifest=manifest,
                store=SqliteProductStore(folder / manifest.files["store"]), engine=engine, collection=collection,
                patches=patches, lease=lease, exact=exact,
            )  # fmt: skip
        except BaseException:
            engine.release()
            lease.release()
            raise

    @staticmethod
    def live_version(index_dir: str | Path) -> Path:
        """The version folder `open` would read now."""
        return IndexLayout(index_dir).resolve()

    def close(self) -> None:
        """Close the store and release the lease and the engine (see `QdrantEngine.close_when_unused`)."""
        if self._closed:
            return
        self._closed = True
        self._store.close()
        if self._lease is not None:
            self._lease.release()
        self.engine.release()

    def __enter__(self) -> QdrantIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ facts







    @property
    def index_type(self) -> str:
        return "qdrant"

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def __contains__(self, id: object) -> bool:
        return id in self._store

    def ids(self) -> list[str]:
        """Every product id, in label (insertion) order."""
        return self._ids.tolist()

    def filter_fields(self) -> dict[str, list[str]]:
        return self._columns.fields()

    def get(self, id: str) -> ProductRecord | None:
        return self._store.get(id)

    def get_many(self, ids: Sequence[str]) -> list[ProductRecord | None]:
        return self._store.get_many(ids)

    def open_image(self, id: str) -> Image.Image:
        """The product's image, decoded (for thumbnails); KeyError for an unknown id."""
        ref = self._store.image_ref(id)
        if ref is None:
            raise KeyError(id)
        return open_image_ref(ref, id)

    def vectors(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(title, image) float32 (len(ids), D) stored vectors, as `ProductIndex.vectors`; KeyError for an unknown id.

        Read from the version's own vector files (mapped on first use), which the collection was
        loaded from: the same values as the points' vectors, without a round trip to Qdrant."""
        if self._vectors is None:
            files = self._manifest.files
            self._vectors = (np.load(self.version_dir / files["text_vectors"], mmap_mode="r"),
                             np.load(self.version_dir / files["image_vectors"], mmap_mode="r"))  # fmt: skip
        rows = rows_of_ids(self._store, self._labels, ids)
        text, image = self._vectors
        return np.asarray(text[rows], dtype=np.float32), np.asarray(image[rows], dtype=np.float32)

    def patches(self, ids: Sequence[str]) -> np.ndarray:
        """float32 (len(ids), P, C) stored patch features; UserError for an unknown id or an index without them."""
        if self._patches is None:
            raise UserError(f"index {self.index_dir} stores no patch features: rebuild it with a bundle exported with patches")
        if isinstance(ids, str):
            raise UserError("patches expects a list of product ids, got a single string")
        try:
            rows = rows_of_ids(self._store, self._labels, ids)
        except KeyError as exc:
            raise UserError(f"product {exc.args[0]!r} is not in the index {self.index_dir}") from None
        return np.asarray(self._patches[rows], dtype=np.float32)

    # ------------------------------------------------------------ search

    def filter_mask(self, filters: Mapping[str, str | list[str]], *, include_predicted: bool = False) -> np.ndarray:
        """Boolean (n,) in label order: the products these filters admit (the lexical side reads it)."""
        return (self._columns_with_predicted if include_predicted else self._columns).mask(filters)

    def search(
        self,
        query_emb: np.ndarray,
        *,
        k: int,
        kind: QueryKind = "text",
        alpha: float | None = None,
        filters: Mapping[str, str | list[str]] | None = None,
        fetch_k: int | None = None,
        include_predicted: bool = False,
    ) -> list[Hit]:
        """Top-k products for one query embedding (D,), by fused score (see the module docstring).

        Same arguments, checks and results as `ProductIndex.search`."""
        predicted = bool(include_predicted and self._has_predicted)
        query = check_query(query_emb, self.embed_dim)
        check_counts(k, fetch_k)
        alpha = self.alphas.resolve(kind, alpha)
        columns = self._columns_with_predicted if predicted else self._columns
        wanted = columns.normalise(filters) if filters else None  # validates fields even on an empty index
        n = len(self)
        if n == 0 or (wanted is not None and any(not keys for keys in wanted.values())):
            return []
        ids, title_vectors, image_vectors = self._candidates(query, fetch_size(n, k, fetch_k), self._payload_filter(wanted, predicted))
        if not ids:
            return []
        title = exact_similarities(title_vectors, query)  # as ProductIndex, to the bit
        image = exact_similarities(image_vectors, query)
        return rank_union(np.array(ids, dtype=str), title, image, alpha, int(k))

    def score_ids(self, query_emb: np.ndarray, ids: Sequence[str], *, kind: QueryKind = "text",
                  alpha: float | None = None) -> list[Hit]:  # fmt: skip
        """As `ProductIndex.score_ids`: the stored vectors of `ids` come back from the collection."""
        query = check_query(query_emb, self.embed_dim)
        alpha = self.alphas.resolve(kind, alpha)
        if not len(ids):
            return []
        labels = self._labels[rows_of_ids(self._store, self._labels, ids)].tolist()
        points = self.engine.call(lambda c: c.retrieve(self.collection, ids=labels, with_vectors=list(VECTORS)))
        by_label = {int(p.id): p for p in points}
        title = exact_similarities(np.array([by_label[label].vector["text"] for label in labels], dtype=np.float32), query)
        image = exact_similarities(np.array([by_label[label].vector["image"] for label in labels], dtype=np.float32), query)
        return scored_hits(list(ids), title, image, alpha)

    def _payload_filter(self, wanted: dict[str, list[str]] | None, predicted: bool = False) -> models.Filter | None:
        """Every field must match one of its values: a Qdrant filter over the `match_key` payloads
        (`predicted`: the payloads where backfilled values fill the catalog's gaps)."""
        if not wanted:
            return None
        from qdrant_client import models

        keys = self._predicted_keys if predicted else self._keys
        return models.Filter(
            must=[models.FieldCondition(key=keys[field], match=models.MatchAny(any=values)) for field, values in wanted.items()]
        )

    def _candidates(
        self, query: np.ndarray, fetch: int, query_filter: models.Filter | None
    ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The union of the top-`fetch` points by title and by image: ids, title and image vectors.

        Ties at the cut are settled as a flat Faiss index settles them (the earliest row, here the
        lowest label, wins): each list is fetched with a margin and, while a tie at the cut reaches
        past what came back, fetched again with twice the margin. Equal vectors score equally in
        both engines, so a catalog's many identical titles pick the same candidates.
        """
        from qdrant_client import models

        params = None  # local mode always searches exactly (and warns about any params)
        if not self.engine.embedded:
            params = models.SearchParams(exact=True) if self.exact else models.SearchParams(hnsw_ef=max(DEFAULT_HNSW_EF, fetch))
        vector = query.tolist()
        n = len(self)
        limit = min(n, fetch + TIE_MARGIN)
        pending = list(VECTORS)
        found: dict[str, list[models.ScoredPoint]] = {}
        while pending:
            requests = [
                models.QueryRequest(
                    query=vector, using=name, filter=query_filter, limit=limit, params=params,
                    with_vector=list(VECTORS), with_payload=["id"],
                )
                for name in pending
            ]
            responses = self.engine.call(lambda c, batch=requests: c.query_batch_points(self.collection, requests=batch))
            unsettled = []
            for name, response in zip(pending, responses):
                points = sorted(response.points, key=lambda p: (-p.score, int(p.id)))
                found[name] = points[:fetch]
                if len(points) == limit < n and points[min(fetch, len(points)) - 1].score <= points[-1].score:
                    unsettled.append(name)  # the tie at the cut may go on past the last point we got
            pending, limit = unsettled, min(n, 2 * limit)
        union: dict[int | str, models.ScoredPoint] = {}
        for name in VECTORS:
            for point in found[name]:
                union.setdefault(point.id, point)
        if not union:
            dim = self.embed_dim
            return [], np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32)
        points = list(union.values())
        ids = [str(p.payload["id"]) for p in points]
        title = np.array([p.vector["text"] for p in points], dtype=np.float32)
        image = np.array([p.vector["image"] for p in points], dtype=np.float32)
        return ids, title, image
