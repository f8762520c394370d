"""How an index version stores each product, what that costs per file, and the arithmetic at 10M and 100M.

Format 1 (before issue 13) stored float32 vectors twice (`*_vectors.npy` and again inside the flat
`*.faiss`) and float16 patches (31,360 B a product with the demo bundle): about 36 KB a product.
Format 2 records an `IndexStorage` in the manifest:

* **vectors stored once.** A flat index is not written: it is built at load from `*_vectors.npy`
  (a copy: ~0.1 s per 100k vectors), and the search re-scores from the flat index's own memory.
  Approximate indexes (HNSW, IVF-PQ) are still written (training and graph building are not free).
* **float16 vectors past the flat range.** Up to `AUTO_FLAT_MAX` products vectors stay float32 (they
  are small and scores are then bit-identical to format 1); beyond, float16 halves them (cosine
  error < 2e-4, measured in docs/RESULTS.md, “Index memory and speed at scale”).
* **compact patches** (`indexer.patch_codec`) when full float16 patches exceed `PATCH_BUDGET` (the
  demo bundle's: 31,360 B a product; an aligned reranker's pooled 3 x 3 grid: 5,760 B), at any size.

Format-1 versions load as before: no `storage` in the manifest means `FORMAT_1`.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from indexer import faiss_index
from indexer.patch_codec import CompactPatches, PatchCodec, components_for
from vitrine.errors import UserError
from vitrine.runtime.preprocess import PatchSpec

if TYPE_CHECKING:  # indexer.manifest imports this module for its `storage` field
    from indexer.manifest import IndexManifest

VECTOR_DTYPES = ("auto", "float32", "float16")
PATCH_STORAGES = ("auto", "float16", "pca-int8")
PATCH_BUDGET = 2048  # bytes of patch data a product may take before patches are stored compactly (issue 12)
PATCH_FILES = {"patches": "patches.npy"}  # float16 (n, P, C)
COMPACT_PATCH_FILES = {"patch_codes": "patch_codes.npy", "patch_scales": "patch_scales.npy", "patch_basis": "patch_basis.npz"}
# products.sqlite per product, measured on the demo index (21,100 real products, 9,973,760 B): the
# store holds titles, attributes and image references, which do not shrink with the catalog.
SQLITE_BYTES_PER_PRODUCT = 473
LABEL_BYTES = 8


class IndexStorage(BaseModel):
    """How a version stores vectors, Faiss indexes and patches (manifest field; format 2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vectors: Literal["float32", "float16"] = "float32"
    faiss_files: bool = True  # False: the (flat) Faiss indexes are built at load from the vectors
    patches: Literal["float16", "pca-int8"] | None = None
    patch_components: int | None = Field(default=None, ge=1)
    reasons: list[str] = Field(default_factory=list)  # why each choice was made (shown by --du and the build log)

    @property
    def vector_dtype(self) -> np.dtype:
        return np.dtype(self.vectors)


FORMAT_1 = IndexStorage(vectors="float32", faiss_files=True, patches="float16")


def storage_of(manifest: IndexManifest) -> IndexStorage:
    """The storage of a version (format 1: its implicit storage)."""
    storage = manifest.storage
    if storage is None:
        return FORMAT_1 if manifest.patches is not None else FORMAT_1.model_copy(update={"patches": None})
    return storage


def choose_storage(
    num_products: int,
    spec: faiss_index.IndexSpec,
    patch_spec: PatchSpec | None,
    *,
    vector_dtype: str = "auto",
    patches: str = "auto",
) -> IndexStorage:
    """The storage of a new index of `num_products` with `spec` and (optionally) patches."""
    if vector_dtype not in VECTOR_DTYPES:
        raise UserError(f"vector dtype must be one of {', '.join(VECTOR_DTYPES)}, got {vector_dtype!r}")
    if patches not in PATCH_STORAGES:
        raise UserError(f"patch storage must be one of {', '.join(PATCH_STORAGES)}, got {patches!r}")
    reasons = []
    if vector_dtype == "auto":
        vector_dtype = "float32" if num_products <= faiss_index.AUTO_FLAT_MAX else "float16"
        reasons.append(
            f"vectors {vector_dtype}: {num_products:,} products "
            + ("<=" if vector_dtype == "float32" else ">") + f" {faiss_index.AUTO_FLAT_MAX:,}"
        )  # fmt: skip
    faiss_files = not builds_at_load(spec)
    if not faiss_files:
        reasons.append("flat Faiss index built at load from the vectors (stored once)")
    patch_kind = patch_components = None
    if patch_spec is not None:
        full = patch_spec.num_patches * patch_spec.dim * 2
        if patches == "auto":
            # Past the budget patches would dominate the index (31 KB a product at 7 x 7 x 320: 310 GB at
            # 10M), and the reranker reads only its top N's: PCA-int8 codes (issue 12: <= 2 KB a product).
            patches = "float16" if full <= PATCH_BUDGET else "pca-int8"
            reasons.append(f"patches {patches}: float16 patches take {full:,} B a product (budget {PATCH_BUDGET:,} B)")
        patch_kind = patches
        if patches == "pca-int8":
            patch_components = components_for(patch_spec.num_patches, patch_spec.dim)
    return IndexStorage(vectors=vector_dtype, faiss_files=faiss_files, patches=patch_kind,
                        patch_components=patch_components, reasons=reasons)  # fmt: skip


def builds_at_load(spec: faiss_index.IndexSpec) -> bool:
    """Index types whose Faiss file would only repeat the vectors: built at load instead."""
    return spec.type == "flat" and spec.factory == "IDMap2,Flat"


def storage_files(storage: IndexStorage, base: dict[str, str]) -> dict[str, str]:
    """The manifest's role -> file map: `base` (store, labels, vectors, indexes) adjusted to `storage`."""
    files = dict(base)
    if not storage.faiss_files:
        files.pop("text_index", None)
        files.pop("image_index", None)
    if storage.patches == "float16":
        files.update(PATCH_FILES)
    elif storage.patches == "pca-int8":
        files.update(COMPACT_PATCH_FILES)
    return files


# ------------------------------------------------------------------ reading a version


def load_vectors(folder: Path, files: dict[str, str], *, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(text, image) vectors as stored (float32 or float16), mapped when `mmap`."""
    mode = "r" if mmap else None
    return np.load(folder / files["text_vectors"], mmap_mode=mode), np.load(folder / files["image_vectors"], mmap_mode=mode)


def flat_index(spec: faiss_index.IndexSpec, vectors: np.ndarray, labels: np.ndarray) -> tuple[Any, np.ndarray]:
    """A flat index built from `vectors`, and a float32 view of its own storage (the vectors, once, in RAM)."""
    index = faiss_index.build(spec, np.ascontiguousarray(vectors, dtype=np.float32), labels)
    inner = faiss.downcast_index(index.index)
    n, d = int(inner.ntotal), int(inner.d)
    view = faiss.rev_swig_ptr(inner.get_xb(), n * d).reshape(n, d) if n else np.zeros((0, d), np.float32)
    return index, view


def open_search_arrays(folder: Path, manifest: IndexManifest, labels: np.ndarray, *, mmap: bool) -> tuple[np.ndarray, np.ndarray, Any, Any]:
    """(text vectors, image vectors, text index, image index) of a version, whatever its storage."""
    storage = storage_of(manifest)
    spec = faiss_index.IndexSpec.from_dict(manifest.index)
    text, image = load_vectors(folder, manifest.files, mmap=mmap)
    if storage.faiss_files:
        indexes = [faiss_index.read(folder / manifest.files[f"{name}_index"]) for name in ("text", "image")]
        return text, image, indexes[0], indexes[1]
    text_index, text = flat_index(spec, text, labels)
    image_index, image = flat_index(spec, image, labels)
    return text, image, text_index, image_index


def patch_roles(manifest: IndexManifest) -> tuple[str, ...]:
    """The manifest roles of a version's patch files (none without patches)."""
    kind = storage_of(manifest).patches if manifest.patches is not None else None
    return tuple(PATCH_FILES) if kind == "float16" else tuple(COMPACT_PATCH_FILES) if kind == "pca-int8" else ()


def open_patches(folder: Path, manifest: IndexManifest) -> np.ndarray | CompactPatches | None:
    """The version's patches, memory-mapped; compact ones decode the rows they are indexed with."""
    storage = storage_of(manifest)
    if manifest.patches is None or storage.patches is None:
        return None
    if storage.patches == "float16":
        return np.load(folder / manifest.files["patches"], mmap_mode="r")
    codec = PatchCodec.load(folder / manifest.files["patch_basis"])
    return CompactPatches(
        np.load(folder / manifest.files["patch_codes"], mmap_mode="r"),
        np.load(folder / manifest.files["patch_scales"], mmap_mode="r"),
        codec,
    )


# ------------------------------------------------------------------ what a product costs


def version_sizes(folder: Path) -> dict[str, Any]:
    """Bytes and bytes per product of every file of a version folder (`vitrine index --du`)."""
    import json

    manifest = json.loads((folder / "manifest.json").read_text())
    n = int(manifest["counts"]["products"])
    # A folder (the lexical index) counts as one entry: the bytes of every file under it.
    files = {
        path.name: path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        for path in sorted(folder.iterdir())
    }
    total = sum(files.values())
    return {
        "version": str(folder),
        "products": n,
        "format_version": manifest.get("format_version"),
        "index_type": manifest["index"]["type"],
        "storage": manifest.get("storage"),
        "files": {name: {"bytes": size, "bytes_per_product": size / n if n else None} for name, size in files.items()},
        "total_bytes": total,
        "bytes_per_product": total / n if n else None,
    }


def format_sizes(sizes: dict[str, Any]) -> str:
    lines = [f"{sizes['version']}: {sizes['products']:,} products, {sizes['index_type']} index, format {sizes['format_version']}"]
    width = max([len(name) for name in sizes["files"]] + [5])
    for name, row in sizes["files"].items():
        per = f"{row['bytes_per_product']:>12,.1f} B/product" if row["bytes_per_product"] is not None else ""
        lines.append(f"  {name:<{width}} {row['bytes']:>15,} B {per}")
    per = f"{sizes['bytes_per_product']:>12,.1f} B/product" if sizes["bytes_per_product"] is not None else ""
    lines.append(f"  {'total':<{width}} {sizes['total_bytes']:>15,} B {per}")
    for reason in (sizes.get("storage") or {}).get("reasons", []):
        lines.append(f"  ({reason})")
    return "\n".join(lines)


def faiss_bytes_per_vector(spec: faiss_index.IndexSpec, num_products: int, dim: int) -> float:
    """Bytes per vector of one Faiss index file of `spec` (the formulas checked against bench/scale.py)."""
    if builds_at_load(spec):
        return 0.0
    if spec.type == "flat":
        return 4.0 * dim + 8
    if spec.type == "hnsw":
        # float32 vector + level-0 links (2M int32) + upper levels (~M/(M-1) of M links) + offsets, level, IDMap id
        m = faiss_index.HNSW_M
        return 4.0 * dim + 4 * 2 * m + 4 * m / (m - 1) * 1.0 + 8 + 1 + 8
    if spec.type == "ivfpq":
        m = faiss_index._pq_subquantizers(dim)
        nlist = int(spec.factory.split(",")[0][3:])
        centroids = nlist * dim * 4 + 256 * dim * 4  # coarse centroids + PQ codebooks
        return m + 8 + centroids / max(1, num_products)
    raise ValueError(f"no size formula for index type {spec.type}")


def projection_rows(sizes: list[int], *, dim: int = 256, patch_spec: PatchSpec | None = None) -> list[dict[str, Any]]:
    """Bytes per product of each file of a default (`--index-type auto`) index at each catalog size."""
    patch_spec = patch_spec or PatchSpec(grid=(7, 7), dim=320)  # the demo bundle's patches
    rows = []
    for n in sizes:
        spec = faiss_index.resolve_spec("auto", n, dim)
        storage = choose_storage(n, spec, patch_spec)
        vec = dim * storage.vector_dtype.itemsize
        ann = faiss_bytes_per_vector(spec, n, dim)
        if storage.patches == "pca-int8":
            codec_bytes = PatchCodec(np.zeros(patch_spec.dim, np.float32), np.zeros((storage.patch_components, patch_spec.dim), np.float32),
                                     np.ones(storage.patch_components, np.float32)).bytes_per_product(patch_spec.num_patches)  # fmt: skip
            patches = codec_bytes + (storage.patch_components + 2) * patch_spec.dim * 4 / n
        else:
            patches = patch_spec.num_patches * patch_spec.dim * 2
        per_file = {
            "products.sqlite": SQLITE_BYTES_PER_PRODUCT,
            "labels.npy": LABEL_BYTES,
            "text_vectors.npy": vec,
            "image_vectors.npy": vec,
            "text.faiss": ann,
            "image.faiss": ann,
            "patches": patches,
        }
        total = sum(per_file.values())
        rows.append({
            "products": n, "index_type": f"{spec.type} ({spec.factory})", "vectors": storage.vectors,
            "patches_storage": storage.patches, "per_file": per_file, "bytes_per_product": total,
            "total_gb": total * n / 1e9, "fits_3kb": total <= 3072,
        })  # fmt: skip
    return rows
