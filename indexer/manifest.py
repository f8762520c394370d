"""manifest.json of an index version: what was indexed, with which bundle, how, and what failed."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from indexer.storage import IndexStorage
from vitrine.embed import ProductError
from vitrine.errors import UserError
from vitrine.runtime.preprocess import PatchSpec
from vitrine.scoring import Alphas

INDEX_FORMAT = "vitrine-product-index"
INDEX_FORMAT_VERSION = 2  # 2: `storage` (vectors stored once, float16 vectors, compact patches); 1 still loads
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
MAX_LISTED_ERRORS = 10_000  # per-product errors kept in the manifest; the count is always exact
MAX_HISTORY = 50


class BundleInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    path: str | None = None
    fingerprint: str | None = None
    model: str | None = None
    encoder: str = ""  # the encoder's describe(), for non-bundle encoders (tests)


class Counts(BaseModel):
    products: int = Field(ge=0)
    text_vectors: int = Field(ge=0)
    image_vectors: int = Field(ge=0)
    errors: int = Field(ge=0)  # products of the last operation that failed
    next_label: int = Field(ge=0)


class Operation(BaseModel):
    """One build, upsert, delete or update (upserts and deletes together): what it did and how fast."""

    model_config = ConfigDict(extra="allow")

    operation: Literal["build", "upsert", "delete", "update", "backfill"]
    finished_at: str
    seconds: float
    products_in: int = 0  # products offered (catalog rows that became products)
    embedded: int = 0
    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    deleted: int = 0
    errors: int = 0
    embed_seconds: float = 0.0
    products_per_s: float | None = None  # embedded products / embedding seconds
    batch_size: int | None = None
    threads: int | None = None
    catalog: str | None = None


class IndexManifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: Literal["vitrine-product-index"] = INDEX_FORMAT
    format_version: int = INDEX_FORMAT_VERSION
    created_at: str
    bundle: BundleInfo
    alpha: float = Field(ge=0.0, le=1.0)
    # The bundle's α tuned for text and for photo queries (None: `alpha`).
    alpha_t2p: float | None = Field(default=None, ge=0.0, le=1.0)
    alpha_i2p: float | None = Field(default=None, ge=0.0, le=1.0)
    embed_dim: int = Field(ge=1)
    counts: Counts
    index: dict[str, Any]  # IndexSpec.to_dict()
    files: dict[str, str]  # role -> file name in the version folder
    build: Operation  # the operation that wrote this version
    errors: list[ProductError] = Field(default_factory=list)  # of that operation
    catalog: dict[str, Any] | None = None  # source, format, report of the catalog last read
    # The bundle's patch features (grid, dim) when the version stores them (files["patches"]); else None.
    patches: PatchSpec | None = None
    # The BM25 index in `lexical/` (indexer.lexical): library, tokenizer, documents; None in versions that predate it.
    lexical: dict[str, Any] | None = None
    history: list[Operation] = Field(default_factory=list)  # earlier operations, oldest first
    # How vectors, Faiss indexes and patches are stored (format 2); None: format 1 (`indexer.storage.FORMAT_1`).
    storage: IndexStorage | None = None


def write_manifest(folder: Path, manifest: IndexManifest) -> Path:
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: Path) -> IndexManifest:
    path = folder / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} is not a Vitrine index version: no {MANIFEST_FILE}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != INDEX_FORMAT:
        raise UserError(f"{path}: not a Vitrine product index manifest")
    if raw.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise UserError(
            f"{path}: index format version {raw.get('format_version')!r}, this Vitrine reads versions "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}; rebuild the index with `vitrine index`"
        )
    try:
        return IndexManifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise UserError(f"{path}: invalid manifest: {where}: {first['msg']}") from None


class IndexVersionFacts:
    """What an opened index version says about itself, read from its manifest (shared by every backend).

    Needs `_manifest` (an IndexManifest) and `version_dir` (the version's folder) on the instance.
    """

    _manifest: IndexManifest
    version_dir: Path

    @property
    def alphas(self) -> Alphas:
        """The bundle's α, per query kind (see `vitrine.scoring`)."""
        return Alphas.of(self._manifest)

    @property
    def embed_dim(self) -> int:
        return self._manifest.embed_dim

    @property
    def bundle_fingerprint(self) -> str:
        return self._manifest.bundle.fingerprint or ""

    @property
    def bundle_path(self) -> str | None:
        return self._manifest.bundle.path

    @property
    def patch_spec(self) -> PatchSpec | None:
        """Grid and dim of the stored patch features, or None when this index has none."""
        return self._manifest.patches

    @property
    def version(self) -> str:
        return self.version_dir.name
