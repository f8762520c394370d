"""Writing index versions: a full build, an upsert (add new, replace changed) and a delete.

Each operation writes a complete new version folder beside the live one and switches
CURRENT to it atomically (`indexer.layout`), so readers never see a half-written index
and a failed operation leaves the previous version live. Upserts and deletes reuse the
stored vectors and the previous Faiss indexes: only new or changed products are
embedded, and only index types that cannot remove ids are rebuilt (from stored vectors).

With a bundle that has patch features, each version also stores them (`patches.npy`,
float16 (n, P, C), rows aligned with the vector files); upserts and deletes copy the
kept rows a chunk at a time from the previous version's memory-mapped file.

Each version also holds its BM25 lexical index (`lexical/`, `indexer.lexical`), written from the
version's own product store: built with it, and rebuilt by every upsert and delete.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from indexer import faiss_index
from indexer import storage as storage_
from indexer.layout import DEFAULT_KEEP_VERSIONS, IndexLayout, IndexNotFoundError
from indexer.lexical import write_lexical
from indexer.manifest import (
    MAX_HISTORY,
    MAX_LISTED_ERRORS,
    BundleInfo,
    Counts,
    IndexManifest,
    Operation,
    ProductError,
    read_manifest,
    write_manifest,
)
from indexer.patch_codec import PatchCodec
from indexer.store import STORE_FILE, ProductRecord, SqliteProductStore, StoredProduct
from vitrine.catalog.product import Product
from vitrine.catalog.registry import Catalog
from vitrine.embed import DEFAULT_BATCH_SIZE, PATCH_DTYPE, EmbeddingResult, ProductEmbedder
from vitrine.errors import UserError
from vitrine.protocols import ServingEncoder
from vitrine.runtime.preprocess import PatchSpec
from vitrine.scoring import Alphas

log = logging.getLogger(__name__)

FILES = {
    "store": STORE_FILE,
    "labels": "labels.npy",  # int64 (n,), ascending: row i of the vector files has label labels[i]
    "text_vectors": "text_vectors.npy",  # float32 (n, D) title embeddings
    "image_vectors": "image_vectors.npy",  # float32 (n, D) image embeddings
    "text_index": "text.faiss",
    "image_index": "image.faiss",
}
PATCHES_FILE = "patches.npy"  # float16 (n, P, C) patch features, row i for labels[i] (or compact: indexer.storage)
_PATCH_CHUNK = 2048  # rows copied at a time (~64 MB at 49 x 320)


class EmbeddingStep(Protocol):
    """What turns a build's products into vectors: `embedder.embed` here, or a distributed engine
    (`indexer.ray_embed.RayEmbedding`) running the same ProductEmbedder. Everything after it is shared."""

    def __call__(self, embedder: ProductEmbedder, products: Sequence[Product]) -> EmbeddingResult: ...


@dataclass
class IndexBuildResult:
    """What an operation did; `version_dir` is the live version afterwards."""

    version_dir: Path
    manifest: IndexManifest
    operation: Operation
    errors: list[ProductError] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    changes: dict[str, str] = field(default_factory=dict)  # id -> added | replaced | unchanged | deleted | failed

    def summary(self) -> str:
        op = self.operation
        parts = {
            "build": f"indexed {op.added:,} products",
            "upsert": f"added {op.added:,}, replaced {op.replaced:,}, unchanged {op.unchanged:,}",
            "delete": f"deleted {op.deleted:,} products",
            "update": f"added {op.added:,}, replaced {op.replaced:,}, unchanged {op.unchanged:,}, deleted {op.deleted:,}",
        }
        rate = f" ({op.products_per_s:,.1f} products/s embedding)" if op.products_per_s else ""
        lines = [
            f"{op.operation}: {parts[op.operation]}; {op.errors:,} failed; {self.manifest.counts.products:,} products "
            f"in {self.manifest.index['type']} index {self.version_dir} in {op.seconds:.1f} s{rate}"
        ]
        reasons = [self.manifest.index.get("reason", "")] + (self.manifest.storage.reasons if self.manifest.storage else [])
        lines += [f"  why: {reason}" for reason in reasons if reason and op.operation == "build"]
        for error in self.errors[:10]:
            lines.append(f"  {error.id}: {error.stage}: {error.message}")
        if len(self.errors) > 10:
            lines.append(f"  ... and {len(self.errors) - 10:,} more (listed in manifest.json)")
        return "\n".join(lines)


# ---------------------------------------------------------------- helpers


def bundle_info(encoder: ServingEncoder, bundle_path: str | Path | None = None) -> BundleInfo:
    path = bundle_path if bundle_path is not None else encoder.path
    return BundleInfo(
        path=str(Path(path).expanduser().absolute()) if path is not None else None,
        fingerprint=encoder.fingerprint,
        model=encoder.model_name,
        encoder=encoder.describe(),
    )


def catalog_info(catalog: Catalog | Sequence[Product]) -> dict[str, Any] | None:
    """Source, format and read report of a `vitrine.catalog.Catalog` (None for a bare product list)."""
    if not isinstance(catalog, Catalog):
        return None
    return {"source": str(catalog.source), "format": catalog.report.format, "report": catalog.report.to_dict()}


def _products_of(catalog: Catalog | Sequence[Product]) -> list[Product]:
    return list(catalog.products if isinstance(catalog, Catalog) else catalog)


def _dedupe(products: list[Product]) -> tuple[list[Product], list[ProductError]]:
    seen: set[str] = set()
    kept, errors = [], []
    for product in products:
        if product.id in seen:
            errors.append(ProductError(id=product.id, stage="record", message="duplicate id (the first occurrence is kept)"))
        else:
            seen.add(product.id)
            kept.append(product)
    return kept, errors


def _stored(result: EmbeddingResult) -> list[StoredProduct]:
    return [
        StoredProduct(
            ProductRecord(p.id, p.title, p.category, p.subcategory, p.description, dict(p.attributes), p.image.describe()),
            image_ref=ref,
            content_hash=digest,
        )
        for p, ref, digest in zip(result.products, result.image_refs, result.content_hashes)
    ]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class _Vectors:
    """A version's vectors, rows in ascending label order."""

    labels: np.ndarray
    text: np.ndarray
    image: np.ndarray

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        assert self.labels.dtype == np.int64 and self.labels.ndim == 1, (self.labels.dtype, self.labels.shape)
        assert self.text.shape == self.image.shape and self.text.shape[0] == n, (self.text.shape, self.image.shape, n)
        assert self.text.dtype == np.float32 and self.image.dtype == np.float32
        assert n < 2 or bool((np.diff(self.labels) > 0).all()), "labels must be strictly ascending"

    @classmethod
    def load(cls, folder: Path) -> _Vectors:
        """Float32 whatever the stored dtype (format 2 may store float16)."""
        labels, text, image = (np.load(folder / FILES[name]) for name in ("labels", "text_vectors", "image_vectors"))
        return cls(labels, text.astype(np.float32, copy=False), image.astype(np.float32, copy=False))

    def save(self, folder: Path, dtype: str = "float32") -> None:
        np.save(folder / FILES["labels"], np.ascontiguousarray(self.labels))
        for name, array in (("text_vectors", self.text), ("image_vectors", self.image)):
            np.save(folder / FILES[name], np.ascontiguousarray(array, dtype=dtype))


def _files(storage: storage_.IndexStorage) -> dict[str, str]:
    """The manifest's role -> file map of a version."""
    return storage_.storage_files(storage, FILES)


def _write_patches(path: Path, sources: Sequence[np.ndarray], rows: np.ndarray) -> None:
    """Write `np.concatenate(sources)[rows]` to the .npy file `path`, a chunk of rows at a time.

    The sources may be memory-mapped (a previous version's patches): they are never all read at once.
    """
    offsets = np.cumsum([0, *(len(source) for source in sources)])
    shape, dtype = sources[0].shape[1:], sources[0].dtype  # float16 patches, or int8 codes / float16 scales
    assert all(s.shape[1:] == shape and s.dtype == dtype for s in sources), [(s.shape, s.dtype) for s in sources]
    assert rows.ndim == 1 and (rows.size == 0 or (rows.min() >= 0 and rows.max() < offsets[-1])), rows.shape
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows.size, *shape))
    for start in range(0, rows.size, _PATCH_CHUNK):
        chunk = rows[start : start + _PATCH_CHUNK]
        source_of = np.searchsorted(offsets, chunk, side="right") - 1
        block = np.empty((chunk.size, *shape), dtype)
        for k, source in enumerate(sources):
            picked = source_of == k
            if picked.any():
                block[picked] = source[chunk[picked] - offsets[k]]
        out[start : start + chunk.size] = block
    out.flush()
    del out


def _load_patches(folder: Path, manifest: IndexManifest) -> np.ndarray:
    return np.load(folder / manifest.files["patches"], mmap_mode="r")


def _write_version_patches(
    staging: Path, storage: storage_.IndexStorage, new: np.ndarray | None, rows: np.ndarray,
    previous: tuple[Path, IndexManifest] | None = None,
) -> None:
    """Write a version's patches: rows of [previous version's rows..., `new` rows...], as `storage` says.

    Compact patches fit their basis on the first build's patches; later versions keep it.
    """
    new_sources = [] if new is None or not len(new) else [new]
    if storage.patches == "float16":
        old = [_load_patches(*previous)] if previous is not None else []
        _write_patches(staging / storage_.PATCH_FILES["patches"], old + new_sources, rows)
        return
    files = storage_.COMPACT_PATCH_FILES
    if previous is not None:
        folder, manifest = previous
        codec = PatchCodec.load(folder / manifest.files["patch_basis"])
        codes = [np.load(folder / manifest.files["patch_codes"], mmap_mode="r")]
        scales = [np.load(folder / manifest.files["patch_scales"], mmap_mode="r")]
    else:
        codec, codes, scales = PatchCodec.fit(new, storage.patch_components), [], []
    for source in new_sources:
        c, sc = codec.encode(source)
        codes.append(c)
        scales.append(sc)
    codec.save(staging / files["patch_basis"])
    _write_patches(staging / files["patch_codes"], codes, rows)
    _write_patches(staging / files["patch_scales"], scales, rows)


def _check_same_patches(manifest: IndexManifest, embedder: ProductEmbedder) -> None:
    if embedder.patch_spec != manifest.patches:
        raise UserError(
            f"the index stores patch features {manifest.patches}, the encoder gives {embedder.patch_spec}: "
            "upsert with the bundle the index was built with, or rebuild the index"
        )


def _write_indexes(folder: Path, indexes: dict[str, Any]) -> None:
    for name, index in indexes.items():
        faiss_index.write(index, folder / FILES[f"{name}_index"])




def _manifest(
    *,
    previous: IndexManifest | None,
    operation: Operation,
    errors: list[ProductError],
    bundle: BundleInfo,
    alphas: Alphas,
    embed_dim: int,
    spec: faiss_index.IndexSpec,
    vectors: _Vectors,
    next_label: int,
    catalog: dict[str, Any] | None,
    patches: PatchSpec | None,
    storage: storage_.IndexStorage,
    lexical: dict[str, Any] | None = None,
) -> IndexManifest:
    history = [] if previous is None else [*previous.history, previous.build][-MAX_HISTORY:]
    return IndexManifest(
        created_at=_now(),
        bundle=bundle,
        **alphas.as_dict(),
        embed_dim=embed_dim,
        counts=Counts(
            products=int(vectors.labels.shape[0]),
            text_vectors=int(vectors.text.shape[0]),
            image_vectors=int(vectors.image.shape[0]),
            errors=len(errors),
            next_label=next_label,
        ),
        index=spec.to_dict(),
        files=_files(storage),
        patches=patches,
        storage=storage,
        lexical=lexical,
        build=operation,
        errors=errors[:MAX_LISTED_ERRORS],
        catalog=catalog if catalog is not None else (previous.catalog if previous is not None else None),
        history=history,
    )


def _publish(layout: IndexLayout, staging: Path, keep_versions: int) -> Path:
    final = layout.commit(staging)
    removed = layout.prune(keep_versions)
    if removed:
        log.debug("pruned %d old index versions", len(removed))
    return final


# ---------------------------------------------------------------- operations


def build_index(
    catalog: Catalog | Sequence[Product],
    encoder: ServingEncoder,
    out: str | Path,
    *,
    index_type: str = "auto",
    vector_dtype: str = "auto",
    patch_storage: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
    bundle_path: str | Path | None = None,
    progress: bool = False,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    embed_step: EmbeddingStep | None = None,
) -> IndexBuildResult:
    """Embed every product of `catalog` (a Catalog or a list of Products) into a new version of `out`.

    Products with bad data are skipped and listed in the manifest; an encoder failure raises
    and leaves the previous version live. `embed_step` replaces the in-process embedding
    (default `ProductEmbedder.embed`), e.g. with Ray actors. `vector_dtype` and `patch_storage` ("auto":
    by catalog size and patch size, `indexer.storage.choose_storage`) say how vectors and patches are stored.
    """
    start = time.perf_counter()
    layout = IndexLayout(out)
    layout.check_writable_target()
    offered = _products_of(catalog)
    products, errors = _dedupe(offered)
    if not products:
        raise UserError("the catalog has no products to index")
    embedder = ProductEmbedder(encoder, batch_size=batch_size, threads=threads, progress=progress)
    faiss_index.resolve_spec(index_type, len(products), embedder.dim)  # a bad index type fails now, not after embedding
    with layout.lock(), layout.staging() as staging:
        result = embedder.embed(products) if embed_step is None else embed_step(embedder, products)
        errors += result.errors
        if not result.products:
            raise UserError(f"none of the {len(products):,} products could be indexed; first problem: "
                            f"{errors[0].id}: {errors[0].message}")  # fmt: skip
        dim = int(result.text.shape[1])
        spec = faiss_index.resolve_spec(index_type, len(result.products), dim)
        storage = storage_.choose_storage(len(result.products), spec, embedder.patch_spec,
                                          vector_dtype=vector_dtype, patches=patch_storage)  # fmt: skip
        for reason in ([spec.reason] if spec.reason else []) + storage.reasons:
            log.info("index: %s", reason)
        with SqliteProductStore.create(staging / FILES["store"]) as store:
            labels = store.put_many(_stored(result))
            next_label = store.next_label
            lexical = write_lexical(staging, (record for _, record in store.scan()))
        vectors = _Vectors(labels, result.text, result.image)
        vectors.save(staging, storage.vectors)
        if embedder.patch_spec is not None:
            _write_version_patches(staging, storage, result.patches, np.arange(len(result.products)))
        if storage.faiss_files:  # else the flat index is built at load from the vectors
            _write_indexes(staging, {
                "text": faiss_index.build(spec, vectors.text, vectors.labels),
                "image": faiss_index.build(spec, vectors.image, vectors.labels),
            })  # fmt: skip
        operation = Operation(
            operation="build", finished_at=_now(), seconds=round(time.perf_counter() - start, 3),
            products_in=len(offered),
            embedded=len(result.products), added=len(result.products), errors=len(errors),
            embed_seconds=round(result.seconds, 3), products_per_s=_rate(result),
            batch_size=batch_size, threads=embedder.threads, catalog=_source(catalog),
        )  # fmt: skip
        manifest = _manifest(
            previous=None, operation=operation, errors=errors, bundle=bundle_info(encoder, bundle_path),
            alphas=encoder.alphas, embed_dim=dim, spec=spec,
            vectors=vectors, next_label=next_label, catalog=catalog_info(catalog), patches=embedder.patch_spec,
            storage=storage,
            lexical=lexical,
        )  # fmt: skip
        write_manifest(staging, manifest)
        final = _publish(layout, staging, keep_versions)
    return IndexBuildResult(final, manifest, operation, errors)


def _rate(result: EmbeddingResult) -> float | None:
    rate = result.products_per_s
    return None if rate is None else round(rate, 2)


def _source(catalog: Catalog | Sequence[Product]) -> str | None:
    return str(catalog.source) if isinstance(catalog, Catalog) else None


def _live(layout: IndexLayout) -> Path:
    current = layout.current()
    if current is None:
        raise IndexNotFoundError(f"no index at {layout.root} to update; build one first with `vitrine index --bundle B --catalog C --out I`")
    return current


def check_same_encoder(manifest: IndexManifest, encoder: ServingEncoder) -> None:
    """Vectors from different models are not comparable: refuse to mix them in one index."""
    ours = bundle_info(encoder)
    theirs = manifest.bundle
    same = ours.fingerprint == theirs.fingerprint if theirs.fingerprint or ours.fingerprint else ours.encoder == theirs.encoder
    if not same:
        raise UserError(
            f"the index was built with bundle {theirs.fingerprint or theirs.encoder} ({theirs.path}), not "
            f"{ours.fingerprint or ours.encoder}: upsert with the same bundle, or rebuild the index"
        )


class UnknownProductsError(UserError):
    """Ids to delete that the index does not hold; nothing was changed."""

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = list(ids)
        shown = ", ".join(self.ids[:10]) + (f" and {len(self.ids) - 10} more" if len(self.ids) > 10 else "")
        super().__init__(f"not in the index: {shown}; nothing was deleted")


class RejectedProductsError(UserError):
    """A strict update met products with bad data (empty title, unreadable image); nothing was changed."""

    def __init__(self, errors: Sequence[ProductError]) -> None:
        self.errors = list(errors)
        first = self.errors[0]
        more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
        super().__init__(f"product {first.id}: {first.message}{more}; nothing was changed")


def upsert_index(
    out: str | Path,
    catalog: Catalog | Sequence[Product],
    encoder: ServingEncoder,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
    progress: bool = False,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
) -> IndexBuildResult:
    """Add new products and replace changed ones (by content hash); unchanged ones are not re-embedded.

    A changed product whose new data is bad keeps its indexed version (the error says so).
    """
    return update_index(out, upserts=catalog, encoder=encoder, batch_size=batch_size, threads=threads,
                        progress=progress, keep_versions=keep_versions)  # fmt: skip


def delete_from_index(out: str | Path, ids: Iterable[str], *, keep_versions: int = DEFAULT_KEEP_VERSIONS) -> IndexBuildResult:
    """Remove products by id. Unknown ids are an error (UnknownProductsError) and nothing is deleted."""
    ids = list(dict.fromkeys(str(i) for i in ids))
    if not ids:
        raise UserError("no product ids to delete")
    return update_index(out, deletes=ids, keep_versions=keep_versions)


def update_index(
    out: str | Path,
    *,
    upserts: Catalog | Sequence[Product] = (),
    deletes: Iterable[str] = (),
    encoder: ServingEncoder | None = None,
    strict: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
    progress: bool = False,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
) -> IndexBuildResult:
    """Upsert `upserts` and delete `deletes` in one new version (one atomic switch), or change nothing.

    Upserts add new products and replace changed ones (by content hash); unchanged ones are not
    re-embedded. Deleting an unknown id raises UnknownProductsError; an id both upserted and
    deleted is a UserError. A product with bad data is skipped and reported (a replaced one keeps
    its indexed version), or, with `strict`, raises RejectedProductsError and nothing is written.
    `result.changes` says what happened to each id: added, replaced, unchanged, deleted or failed.
    """
    start = time.perf_counter()
    layout = IndexLayout(out)
    offered = _products_of(upserts)
    products, errors = _dedupe(offered)
    delete_ids = list(dict.fromkeys(str(i) for i in deletes))
    both = sorted({p.id for p in products} & set(delete_ids))
    if both:
        raise UserError(f"products both upserted and deleted in one update: {', '.join(both[:10])}")
    if strict and errors:
        raise RejectedProductsError(errors)
    embedder = None
    if products:
        if encoder is None:
            raise ValueError("upserting products needs an encoder")
        embedder = ProductEmbedder(encoder, batch_size=batch_size, threads=threads, progress=progress, desc="upserting")
    _live(layout)  # fail before creating anything when there is no index
    with layout.lock():
        live = _live(layout)
        previous = read_manifest(live)
        if embedder is not None:
            check_same_encoder(previous, encoder)
            _check_same_patches(previous, embedder)
        spec = faiss_index.IndexSpec.from_dict(previous.index)
        storage = storage_.storage_of(previous)
        with SqliteProductStore(live / FILES["store"]) as old_store:
            deleted = old_store.labels_of(delete_ids)
            missing = [i for i in delete_ids if i not in deleted]
            if missing:
                raise UnknownProductsError(missing)
            known = old_store.content_hashes() if embedder is not None else {}
            result = embedder.embed(products, known_hashes=known) if embedder is not None else _no_embeddings(previous)
            errors += [
                e.model_copy(update={"message": f"{e.message} (the indexed version is kept)"}) if e.id in known else e
                for e in result.errors
            ]
            if strict and errors:
                raise RejectedProductsError(errors)
            if result.products and result.text.shape[1] != previous.embed_dim:
                raise UserError(f"the encoder gives {result.text.shape[1]}-d vectors, the index holds {previous.embed_dim}-d")
            replaced = sum(p.id in known for p in result.products)
            changes = {
                **{e.id: "failed" for e in errors},
                **dict.fromkeys(result.unchanged, "unchanged"),
                **{p.id: "replaced" if p.id in known else "added" for p in result.products},
                **dict.fromkeys(delete_ids, "deleted"),
            }
            kind = "delete" if not offered else ("update" if delete_ids else "upsert")
            operation = Operation(
                operation=kind, finished_at=_now(), seconds=0.0, products_in=len(offered),
                embedded=len(result.products), added=len(result.products) - replaced, replaced=replaced,
                unchanged=len(result.unchanged), deleted=len(delete_ids), errors=len(errors),
                embed_seconds=round(result.seconds, 3), products_per_s=_rate(result),
                batch_size=batch_size if embedder is not None else None,
                threads=embedder.threads if embedder is not None else None, catalog=_source(upserts),
            )  # fmt: skip
            if not result.products and not delete_ids:  # nothing to change: no new version
                operation.seconds = round(time.perf_counter() - start, 3)
                return IndexBuildResult(live, previous, operation, errors, changes=changes)
            with layout.staging() as staging:
                with old_store.copy_to(staging / FILES["store"]) as store:
                    labels = store.put_many(_stored(result)) if result.products else np.zeros(0, np.int64)
                    store.delete(delete_ids)
                    next_label = store.next_label
                    lexical = write_lexical(staging, (record for _, record in store.scan()))  # rebuilt: bm25s has no update
                old = _Vectors.load(live)
                n_old = old.labels.size
                # Rows of the new version, as rows of [old rows..., embedded rows...]: old rows in place
                # (replaced ones swapped for their new embedding), then the added ones, less the deleted.
                is_replaced = np.isin(labels, old.labels)
                rows = np.searchsorted(old.labels, labels[is_replaced])
                source_rows = np.concatenate([np.arange(n_old), n_old + np.flatnonzero(~is_replaced)])
                source_rows[rows] = n_old + np.flatnonzero(is_replaced)
                all_labels = np.concatenate([old.labels, labels[~is_replaced]])
                removed = np.array(sorted(deleted.values()), dtype=np.int64)
                keep = ~np.isin(all_labels, removed)
                source_rows = source_rows[keep]
                text = np.concatenate([old.text, result.text])[source_rows]
                image = np.concatenate([old.image, result.image])[source_rows]
                vectors = _Vectors(all_labels[keep], text, image)
                vectors.save(staging, storage.vectors)
                if previous.patches is not None:
                    _write_version_patches(staging, storage, result.patches if result.products else None, source_rows,
                                           previous=(live, previous))  # fmt: skip
                if storage.faiss_files:
                    _write_indexes(staging, {
                        name: faiss_index.update(
                            spec, faiss_index.read(live / FILES[f"{name}_index"]),
                            remove=np.concatenate([labels[is_replaced], removed]),
                            add_vectors=new, add_labels=labels, all_vectors=all_vectors, all_labels=vectors.labels,
                        )
                        for name, new, all_vectors in (("text", result.text, vectors.text), ("image", result.image, vectors.image))
                    })  # fmt: skip
                operation.seconds = round(time.perf_counter() - start, 3)
                manifest = _manifest(
                    previous=previous, operation=operation, errors=errors, bundle=previous.bundle,
                    alphas=Alphas.of(previous), embed_dim=previous.embed_dim, spec=spec, vectors=vectors,
                    next_label=next_label, catalog=catalog_info(upserts) if offered else None, patches=previous.patches,
                    storage=storage,
                    lexical=lexical,
                )  # fmt: skip
                write_manifest(staging, manifest)
                final = _publish(layout, staging, keep_versions)
    return IndexBuildResult(final, manifest, operation, errors, changes=changes)


def _no_embeddings(manifest: IndexManifest) -> EmbeddingResult:
    """What embedding nothing gives, for an update that only deletes."""
    empty = np.zeros((0, manifest.embed_dim), np.float32)
    patches = np.zeros((0, *manifest.patches.shape), PATCH_DTYPE) if manifest.patches is not None else None
    return EmbeddingResult(products=[], image_refs=[], content_hashes=[], text=empty, image=empty.copy(), patches=patches)
