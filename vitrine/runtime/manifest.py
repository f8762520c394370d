"""The model bundle's manifest: schema, integrity checks and fingerprint (no onnxruntime).

A bundle is a directory written by `trainer.export.export_bundle`:

    manifest.json        this schema (format, version, model, preprocessing, tokenizer, parity, file hashes)
    text_encoder.onnx    input_ids int64 [batch, seq] -> embeddings float32 [batch, D], L2-normalised
    image_encoder.onnx   pixels float32 [batch, 3, S, S] -> embeddings float32 [batch, D], L2-normalised,
                         and, when the manifest has `patches`, patches float32 [batch, P, C] (the trunk's
                         spatial map before pooling, for the cross-encoder reranker)
    tokenizer/           tokenizer.json (+ whatever the tokenizer saves beside it)

The manifest lists the sha256 of every other file, so hashing manifest.json
after verifying those gives a fingerprint of the whole bundle.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vitrine.errors import UserError
from vitrine.runtime.preprocess import PatchSpec, PreprocessSettings
from vitrine.runtime.tokenizer import TokenizerSettings

BUNDLE_FORMAT = "vitrine-model-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TEXT_ENCODER_FILE = "text_encoder.onnx"
IMAGE_ENCODER_FILE = "image_encoder.onnx"
TOKENIZER_DIR = "tokenizer"
DEFAULT_ALPHA = 0.5
FINGERPRINT_CHARS = 16


class BundleError(UserError):
    """The bundle directory is missing, incomplete, corrupted or of another format version."""


class GraphSpec(BaseModel):
    """One ONNX graph of the bundle and its input/output names and shapes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    input_name: str
    input_dtype: str
    input_shape: list[int | str]  # strings are dynamic axes
    output_name: str
    output_shape: list[int | str]


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    config: dict[str, Any] = Field(default_factory=dict)


class ParityRecord(BaseModel):
    """Max abs difference between the bundle (this runtime) and the torch model, measured at export."""

    model_config = ConfigDict(extra="allow", frozen=True)

    tolerance: float
    texts: int
    images: int
    text_max_abs_diff: float | None = None
    image_max_abs_diff: float | None = None
    preprocess_max_abs_diff: float | None = None
    # Patch features are O(1..10), so they are checked against tolerance * max(1, patches_max_abs).
    patches_max_abs_diff: float | None = None
    patches_max_abs: float | None = None  # largest |value| of the torch patches: the scale of that diff
    token_lengths: list[int] = Field(default_factory=list)  # [shortest, longest] of the check texts


class BundleManifest(BaseModel):
    """manifest.json. Fields the exporter's caller adds (training fingerprint, val metrics...) are kept as extras."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: Literal["vitrine-model-bundle"] = BUNDLE_FORMAT
    format_version: int = FORMAT_VERSION
    model: ModelInfo
    embed_dim: int = Field(ge=1)
    image_size: int = Field(ge=1)
    preprocess: PreprocessSettings
    tokenizer: TokenizerSettings
    text_encoder: GraphSpec
    image_encoder: GraphSpec
    opset: int
    exporter: dict[str, Any] = Field(default_factory=dict)
    parity: ParityRecord | None = None
    files: dict[str, str] = Field(default_factory=dict)  # path relative to the bundle -> sha256
    created_at: str = ""
    # Caller-settable fields with a meaning at serving time.
    alpha: float = Field(default=DEFAULT_ALPHA, ge=0.0, le=1.0)  # weight of text vs image score
    # Tuned separately for text queries (Score_t2p) and photo queries (Score_i2p); None: use `alpha`.
    alpha_t2p: float | None = Field(default=None, ge=0.0, le=1.0)
    alpha_i2p: float | None = Field(default=None, ge=0.0, le=1.0)
    # Token pruning in the text tower: a bool, or details such as {"trained": ..., "at_inference": ...}.
    pruning: bool | dict[str, Any] | None = None
    # The image graph's patch-features output; None for bundles exported without it.
    patches: PatchSpec | None = None
    # Graphs shipped int8 (`vitrine bundle quantize`): per graph, the method and how far its outputs moved.
    quantization: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # The fingerprint of the bundle whose embedding space this one shares (an int8 copy names its float
    # original): indexes built with that bundle serve with this one.
    embeds_like: str | None = None

    @model_validator(mode="after")
    def _check(self) -> BundleManifest:
        if self.preprocess.image_size != self.image_size:
            raise ValueError(f"preprocess.image_size {self.preprocess.image_size} != image_size {self.image_size}")
        for graph in (self.text_encoder, self.image_encoder):
            if graph.file not in self.files:
                raise ValueError(f"{graph.file} is not listed in files")
        return self


# Keys a caller of export_bundle may not override through its `manifest` dict.
RESERVED_KEYS = frozenset(BundleManifest.model_fields) - {"alpha", "alpha_t2p", "alpha_i2p", "pruning"}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_bundle_files(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` except the manifest, keyed by relative POSIX path."""
    directory = Path(directory)
    return {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST_FILE
    }


def write_manifest(directory: Path, manifest: BundleManifest) -> Path:
    path = Path(directory) / MANIFEST_FILE
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(directory: str | Path) -> BundleManifest:
    """The validated manifest of a bundle directory; BundleError says what is wrong."""
    directory = Path(directory)
    if not directory.exists():
        raise BundleError(f"bundle not found: {directory}")
    if not directory.is_dir():
        raise BundleError(f"{directory} is not a bundle directory (expected a folder with {MANIFEST_FILE})")
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{directory} is not a model bundle: no {MANIFEST_FILE}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a Vitrine model bundle manifest (format is not {BUNDLE_FORMAT!r})")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {version!r}, this Vitrine reads version {FORMAT_VERSION}; "
            "re-export the bundle with this version's trainer"
        )
    try:
        return BundleManifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise BundleError(f"{path}: invalid manifest: {where}: {first['msg']}") from exc


def verify_files(directory: Path, manifest: BundleManifest) -> None:
    """Every file the manifest lists exists with the recorded sha256."""
    for name, expected in manifest.files.items():
        path = Path(directory) / name
        if not path.is_file():
            raise BundleError(f"bundle {directory} is incomplete: {name} is missing")
        if sha256_file(path) != expected:
            raise BundleError(f"bundle {directory} is corrupted: {name} does not match its sha256 in the manifest")


def bundle_fingerprint(directory: str | Path) -> str:
    """Short hash identifying the bundle: sha256 of manifest.json, which lists every file's sha256."""
    return hashlib.sha256((Path(directory) / MANIFEST_FILE).read_bytes()).hexdigest()[:FINGERPRINT_CHARS]
