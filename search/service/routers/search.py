"""POST /search/text and POST /search/image."""
from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from search.service.deps import get_engine, get_settings, require_json
from search.service.engine import SearchEngine, SearchOutcome, product_image_url, result_parts
from search.service.errors import ApiError, field_error, validation_error
from search.service.images import UPLOAD_FORMATS, decode_base64_image, decode_upload
from search.service.limits import BodyLimitError
from search.service.schemas import (
    ERROR_RESPONSES,
    FILTERS_SCHEMA,
    ImageSearchJSONRequest,
    SearchOptions,
    SearchResponse,
    SearchResult,
    TextSearchRequest,
    predicted_values,
)
from search.service.settings import MAX_RERANK_TOP_N, Settings

router = APIRouter(prefix="/search", tags=["search"], responses=ERROR_RESPONSES)

IMAGE_FIELD = "image"
FORM_FIELDS = frozenset({"k", "alpha", "filters", "rerank", "rerank_top_n", "timing", "include_predicted"})
FORM_FIELD_MAX_BYTES = 64 * 1024  # text fields of the multipart form (the file has its own limit)
# The media types an upload may declare for its image part: the image formats that are decoded, and
# the generic type browsers send for files without a known extension. The bytes decide the format.
UPLOAD_MEDIA_TYPES = tuple(f"image/{fmt.lower()}" for fmt in UPLOAD_FORMATS) + ("application/octet-stream",)


def check_options(options: SearchOptions, settings: Settings) -> int:
    """Settings-dependent checks; returns the k to use."""
    k = settings.default_k if options.k is None else options.k
    if k > settings.max_k:
        raise field_error(["body", "k"], f"k must be between 1 and {settings.max_k}, got {k}")
    return k


def refuse_image_rerank(options: SearchOptions) -> None:
    """The reranker reads a text query: a photo query asking for it (rerank or rerank_top_n) is a 422."""
    if options.rerank or (options.rerank is None and options.rerank_top_n is not None):
        loc = "rerank" if options.rerank else "rerank_top_n"
        raise ApiError(
            422, "rerank_unsupported",
            "photo queries cannot be reranked: the reranker reads a text query; omit rerank or set it to false",
            [{"loc": ["body", loc], "msg": "rerank is for text queries only"}],
        )  # fmt: skip


def to_response(kind: str, outcome: SearchOutcome, k: int, *, timing: bool = False) -> SearchResponse:
    """The response; fields left unset here (timings_ms without `timing`, rerank_score on hits that
    were not reranked) are left out of the JSON (the routes use response_model_exclude_unset)."""
    results = []
    rerank_scores = outcome.rerank_scores or [None] * len(outcome.hits)
    for hit, record, rerank_score in zip(outcome.hits, outcome.records, rerank_scores):
        if record is None:
            continue  # the index and its store disagree; never show a blank card
        extra = {} if rerank_score is None else {"rerank_score": rerank_score}
        results.append(
            SearchResult(
                id=hit.id, title=record.title, score=float(hit.score), parts=result_parts(kind, hit),
                category=record.category, subcategory=record.subcategory, attributes=record.attributes,
                predicted=predicted_values(record.predicted), image_url=product_image_url(hit.id), **extra,
            )
        )  # fmt: skip
    timings = {name: round(ms, 3) for name, ms in outcome.timings_ms.items()}
    return SearchResponse(
        results=results, k=k, alpha=outcome.alpha, took_ms=timings.get("total", 0.0), cache=outcome.cache,
        reranked=outcome.rerank_top_n is not None, rerank_top_n=outcome.rerank_top_n,
        **({"timings_ms": timings} if timing else {}),
    )  # fmt: skip


@router.post(
    "/text", response_model=SearchResponse, response_model_exclude_unset=True, summary="Search products by text",
    dependencies=[Depends(require_json)],
)  # fmt: skip
def search_text(
    body: TextSearchRequest,
    engine: Annotated[SearchEngine, Depends(get_engine)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> SearchResponse:
    """Rank products by α·sim(query, title) + (1−α)·sim(query, image) (FashionKLIP §5), then, when the
    bundle has a reranker, reorder the top N by the cross-encoder (FashionBERT); see rerank, rerank_top_n."""
    k = check_options(body, settings)
    if len(body.query) > settings.max_query_chars:
        raise field_error(["body", "query"], f"query is longer than {settings.max_query_chars} characters")
    top_n = engine.rerank_plan(body.rerank, body.rerank_top_n)
    outcome = engine.search_text(body.query, k=k, alpha=body.alpha, filters=body.filters, rerank_top_n=top_n,
                                 include_predicted=body.include_predicted)  # fmt: skip
    return to_response("text", outcome, k, timing=body.timing)


IMAGE_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [IMAGE_FIELD],
                    # One part per field; any other field is a 422, more parts than these a 400.
                    "additionalProperties": False,
                    "maxProperties": 1 + len(FORM_FIELDS),
                    "properties": {
                        IMAGE_FIELD: {
                            "type": "string", "format": "binary", "contentMediaType": "image/*",
                            "description": "the photo: JPEG, PNG, WebP, GIF or BMP (detected from its bytes; "
                                           "the part's declared type must be one of those or application/octet-stream)",
                        },
                        "k": {"type": "integer", "minimum": 1, "description": "number of products to return (1..max_k)"},
                        "alpha": {"type": "number", "minimum": 0, "maximum": 1},
                        "filters": {
                            "type": "string", "contentMediaType": "application/json", "contentSchema": FILTERS_SCHEMA,
                            "description": 'JSON object, e.g. {"gender": "Women"}',
                        },
                        "rerank": {"type": "boolean", "description": "true or false; photo queries cannot be reranked: true is a 422"},
                        "rerank_top_n": {"type": "integer", "minimum": 1, "maximum": MAX_RERANK_TOP_N, "description": "photo queries cannot be reranked: a 422 unless rerank is false"},
                        "timing": {"type": "boolean", "description": "true or false: include timings_ms in the response"},
                        "include_predicted": {"type": "boolean", "description": "true or false: filters also match backfilled values"},
                    },
                },
                "encoding": {IMAGE_FIELD: {"contentType": ", ".join(UPLOAD_MEDIA_TYPES)}},
            },
            "application/json": {"schema": ImageSearchJSONRequest.model_json_schema()},
        },
    }
}


@router.post(
    "/image", response_model=SearchResponse, response_model_exclude_unset=True, summary="Search products by photo",
    openapi_extra=IMAGE_OPENAPI,
)  # fmt: skip
async def search_image(
    request: Request,
    engine: Annotated[SearchEngine, Depends(get_engine)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> SearchResponse:
    """Multipart upload (field `image`, optional form fields k, alpha, filters as JSON, timing)
    or JSON `{image_base64, k, alpha, filters, timing}`. Ranks by α·sim(photo, title) + (1−α)·sim(photo, image).
    Never reranked (the reranker reads a text query): rerank true is a 422 rerank_unsupported."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    timings: dict[str, float] = {}
    if media_type == "multipart/form-data":
        data, options = await _read_multipart(request, settings)
    elif media_type == "application/json" or media_type.endswith("+json"):
        data, options = await _read_json(request, settings)
    else:
        raise ApiError(
            415, "unsupported_media_type",
            f"send multipart/form-data (field {IMAGE_FIELD!r}) or application/json with image_base64 "
            f"({f'not {media_type}' if media_type else 'the request has no Content-Type'})",
        )  # fmt: skip
    refuse_image_rerank(options)
    k = check_options(options, settings)

    def run() -> SearchOutcome:
        start = time.perf_counter()
        try:
            image = decode_upload(data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                                  max_aspect_ratio=settings.max_image_aspect_ratio)  # fmt: skip
        finally:
            timings["decode"] = (time.perf_counter() - start) * 1000.0
            engine.metrics.stage_seconds.labels("image", "decode").observe(timings["decode"] / 1000.0)
        return engine.search_image(image, k=k, alpha=options.alpha, filters=options.filters, timings=timings,
                                   include_predicted=options.include_predicted)  # fmt: skip

    outcome = await run_in_threadpool(run)
    return to_response("image", outcome, k, timing=options.timing)


async def _read_multipart(request: Request, settings: Settings) -> tuple[bytes, SearchOptions]:
    try:
        form = await request.form(max_files=1, max_fields=len(FORM_FIELDS), max_part_size=FORM_FIELD_MAX_BYTES)
    except (ApiError, BodyLimitError):  # too large, or too slow: their own 413 / 408
        raise
    except Exception as exc:  # multipart parse errors: starlette raises HTTPException or MultiPartException
        raise ApiError(400, "malformed_multipart", f"cannot parse the multipart body: {getattr(exc, 'detail', exc)}") from exc
    try:
        unknown = sorted(set(form.keys()) - FORM_FIELDS - {IMAGE_FIELD})
        if unknown:
            expected = ", ".join([IMAGE_FIELD, *sorted(FORM_FIELDS)])
            raise field_error(["body", unknown[0]], f"unknown form field {unknown[0]!r}; expected {expected}")
        upload = form.get(IMAGE_FIELD)
        if upload is None:
            raise field_error(["body", IMAGE_FIELD], f"missing file field {IMAGE_FIELD!r}")
        if not isinstance(upload, UploadFile):
            raise field_error(["body", IMAGE_FIELD], f"{IMAGE_FIELD!r} must be a file upload, not a text field")
        declared = (upload.content_type or "application/octet-stream").split(";")[0].strip().lower()
        if declared not in UPLOAD_MEDIA_TYPES:
            raise ApiError(
                415, "unsupported_media_type",
                f"the {IMAGE_FIELD!r} part is declared {declared}; send one of {', '.join(UPLOAD_MEDIA_TYPES)}",
                [{"loc": ["body", IMAGE_FIELD], "msg": f"unsupported media type {declared}"}],
            )  # fmt: skip
        data = await upload.read(settings.max_image_bytes + 1)
        if len(data) > settings.max_image_bytes:
            raise ApiError(413, "image_too_large", f"image exceeds {settings.max_image_bytes} bytes")
        raw: dict[str, Any] = {}
        for name in FORM_FIELDS & set(form.keys()):
            value = form.get(name)
            if not isinstance(value, str):
                raise field_error(["body", name], "must be a text field, not a file")
            raw[name] = _form_value(name, value)
        try:
            options = SearchOptions.model_validate(raw)
        except ValidationError as exc:
            raise validation_error(list(exc.errors()), ("body",)) from exc
        return data, options
    finally:
        await form.close()


def _form_value(name: str, value: str) -> Any:
    """Form fields are text: JSON-decode them (k=5 -> 5, rerank=false -> False, filters={...}); anything
    else stays a string and fails validation (booleans are strict: rerank=1 or rerank=yes is a 422)."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        if name == "filters":
            raise ApiError(400, "malformed_json", "form field filters is not a JSON object",
                           [{"loc": ["body", "filters"], "msg": "not valid JSON"}]) from None  # fmt: skip
        return value


async def _read_json(request: Request, settings: Settings) -> tuple[bytes, SearchOptions]:
    raw = await request.body()
    try:
        body = ImageSearchJSONRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(list(exc.errors()), ("body",)) from exc
    data = decode_base64_image(body.image_base64, max_bytes=settings.max_image_bytes, loc=["body", "image_base64"])
    options = SearchOptions.model_validate(body.model_dump(exclude={"image_base64"}, exclude_unset=True))
    return data, options
