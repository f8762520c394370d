"""Request and response bodies of the HTTP API (pydantic; they are the OpenAPI schema too).

Numbers and booleans are strict (k=true, k="5", rerank=1 or rerank="yes" are errors). Limits
that depend on settings (max k, max query length) are checked by the routers with the same
error shape, and written into the OpenAPI schema by `search.service.openapi`. Strings holding
a lone surrogate ("\ud800", which no UTF-8 text can carry) are refused.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from search.service.settings import MAX_RERANK_TOP_N
from vitrine.fusion import FusionMethod, SearchMode

MAX_FACETS = 16  # facet fields per request (a catalog has a handful of filterable fields)

MAX_FILTER_VALUES = 100
MAX_FILTER_CHARS = 200
# Python's whitespace (str.isspace) spelled out, so the schema's patterns (ECMA regex) and the
# server's checks (str.strip, str.split) agree on every character.
WHITESPACE = r"\t-\r\x1c- \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NON_BLANK_PATTERN = f"[^{WHITESPACE}]"  # somewhere a character that is not whitespace
# image_base64: an optional data: URL prefix, then base64 with any whitespace, then up to two "=".
DATA_URL_PREFIX = r"data:[A-Za-z0-9_.+-]+/[A-Za-z0-9_.+-]+(;[A-Za-z0-9_=.+-]+)*;base64,"
BASE64_PATTERN = f"^[{WHITESPACE}]*({DATA_URL_PREFIX})?([{WHITESPACE}]*[A-Za-z0-9+/])+[{WHITESPACE}]*(=[{WHITESPACE}]*){{0,2}}$"
_FILTER_VALUE_SCHEMA = {"type": "string", "minLength": 1, "maxLength": MAX_FILTER_CHARS, "pattern": NON_BLANK_PATTERN}
FILTERS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "propertyNames": {"minLength": 1, "maxLength": MAX_FILTER_CHARS},
    "additionalProperties": {
        "anyOf": [
            _FILTER_VALUE_SCHEMA,
            {"type": "array", "items": _FILTER_VALUE_SCHEMA, "minItems": 1, "maxItems": MAX_FILTER_VALUES},
        ]
    },
}
Filters = Annotated[dict[str, str | list[str]], WithJsonSchema(FILTERS_SCHEMA)]
K = Annotated[int, Field(strict=True, ge=1, description="number of products to return (1..max_k)")]
Alpha = Annotated[
    float,
    Field(strict=True, ge=0.0, le=1.0, allow_inf_nan=False, description="weight of the title score; default: the index's α"),
]
FacetNames = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_FILTER_CHARS)]], Field(min_length=1, max_length=MAX_FACETS)
]
RerankTopN = Annotated[
    int, Field(strict=True, ge=1, le=MAX_RERANK_TOP_N, description=f"first-stage hits to rerank (1..{MAX_RERANK_TOP_N})")
]


class SearchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: K | None = None
    alpha: Alpha | None = None
    filters: Filters | None = Field(
        default=None,
        description="attribute -> value or values (case-insensitive); GET /filters lists them",
        examples=[{"gender": "Women", "baseColour": ["Red", "Maroon"]}],
    )
    rerank: bool | None = Field(
        default=None,
        strict=True,
        description="rerank the first-stage top N with the bundle's cross-encoder (text queries; photo queries too when "
        "the reranker is aligned, GET /readyz reranker.image_queries, else 422 rerank_unsupported); "
        "default: on when the bundle has a reranker (VITRINE_RERANK_DEFAULT); 422 rerank_unavailable when it has none",
    )
    rerank_top_n: RerankTopN | None = Field(default=None, description="N; default VITRINE_RERANK_TOP_N or the reranker's own")
    timing: bool = Field(default=False, strict=True, description="include timings_ms, the per-stage breakdown, in the response")
    include_predicted: bool = Field(
        default=False, strict=True,
        description="filters also match backfilled attribute values (`predicted`) of products the catalog gives none",
    )  # fmt: skip
    facets: FacetNames | None = Field(
        default=None,
        description="filterable fields to count values of over the first-stage top N (VITRINE_FACET_TOP_N, at most 100); "
        "GET /filters lists the fields",
        examples=[["baseColour", "gender"]],
    )

    @field_validator("facets")
    @classmethod
    def _check_facets(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(has_lone_surrogate(name) for name in value):
            raise ValueError("facet names must be valid Unicode (no lone surrogates)")
        return value

    @field_validator("filters", mode="before")
    @classmethod
    def _check_filters(cls, value: Any) -> Any:
        """One clear message per bad filter rather than pydantic's union-branch errors."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError('filters must be an object of field -> value or list of values, e.g. {"gender": "Women"}')
        for name, wanted in value.items():
            if not name or len(name) > MAX_FILTER_CHARS:
                raise ValueError(f"filter field names must have 1 to {MAX_FILTER_CHARS} characters")
            if has_lone_surrogate(name):
                raise ValueError(f"filter field name {name!r} is not valid Unicode (a lone surrogate)")
            values = [wanted] if isinstance(wanted, str) else wanted
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ValueError(f"filter {name!r}: expected a string or a list of strings, got {json_type(wanted)}")
            if not values or len(values) > MAX_FILTER_VALUES:
                raise ValueError(f"filter {name!r}: give 1 to {MAX_FILTER_VALUES} values")
            if any(not v.strip() or len(v) > MAX_FILTER_CHARS for v in values):
                raise ValueError(f"filter {name!r}: values must be non-blank and at most {MAX_FILTER_CHARS} characters")
            if any(has_lone_surrogate(v) for v in values):
                raise ValueError(f"filter {name!r}: values must be valid Unicode (no lone surrogates)")
        return value


def has_lone_surrogate(text: str) -> bool:
    """True for text holding a UTF-16 surrogate on its own: JSON can spell one ("\\ud800"), UTF-8 cannot carry it."""
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", dict: "an object", list: "a list", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class TextSearchRequest(SearchOptions):
    query: str = Field(
        min_length=1,
        description="what the shopper typed: not blank, at most VITRINE_MAX_QUERY_CHARS characters (maxLength), "
        "valid Unicode (a lone surrogate such as \\ud800 is refused)",
        examples=["women red handbags"],
        json_schema_extra={"pattern": NON_BLANK_PATTERN},
    )
    mode: SearchMode = Field(
        default="vector",
        description="vector: rank by the embeddings; lexical: by BM25 over titles and attribute values (brands, exact "
        "words); hybrid: both, fused (see fusion). Filters and rerank apply in every mode",
    )
    fusion: FusionMethod | None = Field(
        default=None, description="hybrid only: weighted (min-max normalised sum, BM25 0.7 : vector 0.3) or rrf (reciprocal rank fusion); default: weighted"
    )

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query is empty")
        if has_lone_surrogate(value):
            raise ValueError("query is not valid Unicode (it holds a lone surrogate)")
        return value


class ImageSearchJSONRequest(SearchOptions):
    image_base64: str = Field(
        min_length=1,
        description="the photo (JPEG, PNG, WebP, GIF or BMP), base64; a data: URL prefix and line breaks are accepted",
        json_schema_extra={"pattern": BASE64_PATTERN, "contentEncoding": "base64", "contentMediaType": "image/*"},
    )


class PredictedValue(BaseModel):
    """An attribute value the catalog lacks, predicted from the product's photo and title."""

    value: str
    source: Literal["predicted"] = "predicted"
    confidence: float = Field(ge=0.0, le=1.0, description="calibrated probability that the value is right")


def predicted_values(predicted: dict[str, dict[str, Any]]) -> dict[str, PredictedValue]:
    # source set explicitly: the search routes leave unset fields out of the JSON (response_model_exclude_unset).
    return {name: PredictedValue(value=p["value"], source="predicted", confidence=p["confidence"]) for name, p in predicted.items()}


class ProductOut(BaseModel):
    id: str
    title: str
    category: str
    subcategory: str
    description: str = ""
    attributes: dict[str, str]
    predicted: dict[str, PredictedValue] = Field(default_factory=dict, description="backfilled attributes, with provenance")
    image_url: str


class SearchResult(BaseModel):
    id: str
    title: str
    score: float = Field(description="first-stage fused score α·sim(q, title) + (1−α)·sim(q, image)")
    rerank_score: float | None = Field(
        default=None,
        description="the rerank score (the cross-encoder's match logit + its prior weight x the first-stage score); "
        "only on reranked results (the top rerank_top_n)",
    )
    parts: dict[str, float] = Field(
        description="{t2t, t2i} for text queries, {i2t, i2i} for image queries; lexical and hybrid add vector "
        "(the fused vector score) and bm25 (when BM25 found the product)"
    )
    category: str
    subcategory: str
    attributes: dict[str, str]
    predicted: dict[str, PredictedValue] = Field(default_factory=dict, description="backfilled attributes, with provenance")
    image_url: str


class FacetValue(BaseModel):
    value: str
    count: int


class SearchResponse(BaseModel):
    results: list[SearchResult]
    k: int
    alpha: float
    mode: str = Field(default="vector", description="vector | lexical | hybrid: how the results were ranked (score is BM25's "
                      "in lexical mode, the fused rank score in hybrid)")  # fmt: skip
    took_ms: float
    timings_ms: dict[str, float] | None = Field(
        default=None, description="only when the request sets timing: ms per stage (decode, tokenise, encode, search, scan, fill_in, records, rerank, total); the Server-Timing header has them always, with serialise and app"
    )
    cache: str | None = Field(default=None, description="query-embedding cache: local, redis or miss (text only)")
    reranked: bool = Field(default=False, description="the top rerank_top_n first-stage hits were reordered by the reranker")
    rerank_top_n: int | None = Field(default=None, description="N reranked (null when not reranked)")
    facets: dict[str, list[FacetValue]] | None = Field(
        default=None, description="only when the request names facets: field -> values with their counts, most frequent first"
    )
    facet_top_n: int | None = Field(default=None, description="only with facets: first-stage candidates counted (fewer when filters leave fewer)")


class FiltersResponse(BaseModel):
    fields: dict[str, list[str]]


class ErrorDetail(BaseModel):
    loc: list[Any]
    msg: str
    type: str | None = None


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: list[ErrorDetail] | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    status: str = Field(description="ready | degraded (Redis configured but unreachable) | not_ready")
    index: dict[str, Any] | None = None
    redis: dict[str, Any] | None = None
    reranker: dict[str, Any] | None = Field(default=None, description="{loaded, layers, model, default_on, top_n, ...}")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "unreadable body (malformed JSON, bad base64)"},
    413: {"model": ErrorResponse, "description": "body or image too large"},
    415: {"model": ErrorResponse, "description": "unsupported content type or image format"},
    422: {"model": ErrorResponse, "description": "invalid field values"},
}


# ---------------------------------------------------------------- catalog writes

# Ids of products written over HTTP: URL- and file-name-safe. Any id the index holds can still be
# read and deleted (GET and DELETE take 1..200 characters).
PRODUCT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
MAX_PRODUCT_ID_CHARS = 128
ATTRIBUTE_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]*$"
MAX_ATTRIBUTE_NAME_CHARS = 64
MAX_ATTRIBUTES = 64
MAX_TITLE_CHARS = 300
MAX_FIELD_CHARS = 200
MAX_DESCRIPTION_CHARS = 5000
RESERVED_ATTRIBUTES = frozenset({"category", "subcategory"})  # top-level fields; filters read them by these names
ATTRIBUTES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "maxProperties": MAX_ATTRIBUTES,
    "propertyNames": {"pattern": ATTRIBUTE_NAME_PATTERN, "maxLength": MAX_ATTRIBUTE_NAME_CHARS,
                      "not": {"enum": sorted(RESERVED_ATTRIBUTES)}},
    "additionalProperties": {"type": "string", "maxLength": MAX_FIELD_CHARS},
}  # fmt: skip
NewProductId = Annotated[
    str, Field(min_length=1, max_length=MAX_PRODUCT_ID_CHARS, pattern=PRODUCT_ID_PATTERN, description="letters, digits and . _ : -")
]
AnyProductId = Annotated[str, Field(min_length=1, max_length=MAX_FILTER_CHARS, description="an id the index holds")]


class ProductFields(BaseModel):
    """A product as the catalog has it; the photo travels beside it (base64 in JSON, a file in multipart)."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=MAX_TITLE_CHARS, json_schema_extra={"pattern": NON_BLANK_PATTERN},
                       description="what the shopper sees and text queries match: not blank", examples=["Women Red Floral Summer Dress"])  # fmt: skip
    category: str = Field(default="", max_length=MAX_FIELD_CHARS, examples=["Apparel"])
    subcategory: str = Field(default="", max_length=MAX_FIELD_CHARS, examples=["Dress"])
    description: str = Field(default="", max_length=MAX_DESCRIPTION_CHARS)
    attributes: Annotated[dict[str, str], WithJsonSchema(ATTRIBUTES_SCHEMA)] = Field(
        default_factory=dict, description="filterable attributes, e.g. gender, baseColour", examples=[{"gender": "Women", "baseColour": "Red"}]
    )

    @field_validator("title")
    @classmethod
    def _title(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("title is blank")
        return value

    @field_validator("title", "category", "subcategory", "description")
    @classmethod
    def _unicode(cls, value: str) -> str:
        if has_lone_surrogate(value):
            raise ValueError("not valid Unicode (a lone surrogate)")
        return value

    @field_validator("attributes", mode="before")
    @classmethod
    def _attributes(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError('attributes must be an object of name -> text, e.g. {"gender": "Women"}')
        if len(value) > MAX_ATTRIBUTES:
            raise ValueError(f"at most {MAX_ATTRIBUTES} attributes")
        for name, text in value.items():
            if not isinstance(name, str) or not re.fullmatch(ATTRIBUTE_NAME_PATTERN[1:-1], name) or len(name) > MAX_ATTRIBUTE_NAME_CHARS:
                raise ValueError(f"attribute name {name!r}: a letter, then letters, digits or _ (at most {MAX_ATTRIBUTE_NAME_CHARS})")
            if name in RESERVED_ATTRIBUTES:
                raise ValueError(f"attribute name {name!r} is a product field: set it at the top level")
            if not isinstance(text, str) or len(text) > MAX_FIELD_CHARS:
                raise ValueError(f"attribute {name!r}: text of at most {MAX_FIELD_CHARS} characters, got {json_type(text)}")
            if has_lone_surrogate(text):
                raise ValueError(f"attribute {name!r}: not valid Unicode (a lone surrogate)")
        return value


IMAGE_BASE64_FIELD = Field(
    min_length=1,
    description="the product photo (JPEG, PNG, WebP, GIF or BMP), base64; a data: URL prefix and line breaks are accepted",
    json_schema_extra={"pattern": BASE64_PATTERN, "contentEncoding": "base64", "contentMediaType": "image/*"},
)


class ProductPut(ProductFields):
    image_base64: str = IMAGE_BASE64_FIELD


class BatchUpsert(ProductPut):
    id: NewProductId


class BatchRequest(BaseModel):
    """Upserts and deletes applied together as one index version: all of them, or (any row bad) none."""

    model_config = ConfigDict(extra="forbid")

    upsert: list[BatchUpsert] = Field(default_factory=list, description="products to add or replace")
    delete: list[AnyProductId] = Field(default_factory=list, json_schema_extra={"uniqueItems": True},
                                       description="ids to remove; each must be in the index")  # fmt: skip


class WriteResult(BaseModel):
    id: str
    result: str = Field(description="added | replaced | unchanged (same fields and photo: nothing re-embedded) | deleted")


class WriteResponse(BaseModel):
    version: str = Field(description="the index version that holds the write (durable, and served by this replica)")
    results: list[WriteResult]
    took_ms: float = Field(description="from accepted to durable")


# ---------------------------------------------------------------- similar products


class SimilarResponse(SearchResponse):
    product_id: str = Field(description="the product the results are like (never among them)")
