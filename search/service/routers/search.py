"""POST /search/text and POST /search/image."""
from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from search.service.deps import get_engine, get_settings, require_json
from search.service.engine import SearchEngine, SearchOutcome, product_image_url, result_parts
from search.service.errors import ApiError, field_error, validation_error
from search.service.forms import IMAGE_FIELD, UPLOAD_MEDIA_TYPES, json_field, read_image_form
from search.service.images import decode_base64_image, decode_upload
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

FORM_FIELDS = frozenset({"k", "alpha", "filters", "rerank", "rerank_top_n", "timing", "facets", "include_predicted"})


def check_options(options: SearchOptions, settings: Settings) -> int:
    """Settings-dependent checks; returns the k to use."""
    k = settings.default_k if options.k is None else options.k
    if k > settings.max_k:
        raise field_error(["body", "k"], f"k must be between 1 and {settings.max_k}, got {k}")
    return k


def to_response(kind: str, outcome: SearchOutcome, k: int, *, timing: bool = False) -> SearchResponse:
    """The response; fields left unset here (timings_ms without `timing`, rerank_score on hits that
    were not reranked) are left out of the JSON (the routes use response_model_exclude_unset)."""
    results = []
    rerank_scores = outcome.rerank_scores or [None] * len(outcome.hits)
    more_parts = outcome.parts or [{}] * len(outcome.hits)
    for hit, record, rerank_score, more in zip(outcome.hits, outcome.records, rerank_scores, more_parts):
        if record is None:
            continue  # the index and its store disagree; never show a blank card
        extra = {} if rerank_score is None else {"rerank_score": rerank_score}
        results.append(
            SearchResult(
                id=hit.id, title=record.title, score=float(hit.score), parts={**result_parts(kind, hit), **more},
                category=record.category, subcategory=record.subcategory, attributes=record.attributes,
                predicted=predicted_values(record.predicted), image_url=product_image_url(hit.id), **extra,
            )
        )  # fmt: skip
    timings = {name: round(ms, 3) for name, ms in outcome.timings_ms.items()}
    return SearchResponse(
        results=results, k=k, alpha=outcome.alpha, mode=outcome.mode, took_ms=timings.get("total", 0.0), cache=outcome.cache,
        reranked=outcome.rerank_top_n is not None, rerank_top_n=outcome.rerank_top_n,
        **({"timings_ms": timings} if timing else {}),
        **({"facets": outcome.facets, "facet_top_n": outcome.facet_top_n} if outcome.facets is not None else {}),
    )  # fmt: skip


def json_response(kind: str, outcome: SearchOutcome, k: int, *, timing: bool, engine: SearchEngine) -> Response:
    """The response as JSON bytes (pydantic's serializer; the route's response_model stays the schema) with
    a Server-Timing header of every stage, serialisation included. Returning a Response also skips FastAPI's
    second validation of the model and the threadpool hop it takes for a sync endpoint."""
    start = time.perf_counter()
    body = to_response(kind, outcome, k, timing=timing).model_dump_json(exclude_unset=True)
    serialise_ms = (time.perf_counter() - start) * 1000.0
    engine.metrics.stage_seconds.labels(kind, "serialise").observe(serialise_ms / 1000.0)
    return Response(body, media_type="application/json",
                    headers={"Server-Timing": server_timing({**outcome.timings_ms, "serialise": serialise_ms})})  # fmt: skip


def server_timing(timings: dict[str, float]) -> str:
    """`Server-Timing` header value: `encode;dur=5.123, search;dur=0.812, ...` (ms)."""
    return ", ".join(f"{name};dur={ms:.3f}" for name, ms in timings.items())


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
    if body.fusion is not None and body.mode != "hybrid":
        raise field_error(["body", "fusion"], f"fusion applies to mode hybrid only, not {body.mode}")
    outcome = engine.search_text(body.query, k=k, alpha=body.alpha, filters=body.filters, rerank_top_n=top_n,
                                 mode=body.mode, fusion=body.fusion, facets=body.facets,
                                 include_predicted=body.include_predicted)  # fmt: skip
    return json_response("text", outcome, k, timing=body.timing, engine=engine)


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
                        "rerank": {"type": "boolean", "description": "true or false; photo queries are reranked by an aligned reranker only "
                                                                     "(GET /readyz: reranker.image_queries): with another, true is a 422 rerank_unsupported"},
                        "rerank_top_n": {"type": "integer", "minimum": 1, "maximum": MAX_RERANK_TOP_N,
                                         "description": "first-stage hits to rerank; as rerank, a 422 unless the reranker reads photo queries or rerank is false"},
                        "timing": {"type": "boolean", "description": "true or false: include timings_ms in the response"},
                        "facets": {"type": "string", "contentMediaType": "application/json",
                                   "description": 'JSON list of filterable fields to count, e.g. ["baseColour", "gender"]'},
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
    or JSON `{image_base64, k, alpha, filters, timing}`. Ranks by α·sim(photo, title) + (1−α)·sim(photo, image),
    then, when the bundle's reranker is aligned (it reads the dual encoder's embeddings, so the photo's stands
    for the query), reorders the top N as text queries are. With a plain reranker rerank true is a 422
    rerank_unsupported; rerank omitted follows VITRINE_RERANK_DEFAULT where a photo can be reranked."""
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
    k = check_options(options, settings)
    top_n = engine.rerank_plan(options.rerank, options.rerank_top_n, kind="image")

    def run() -> SearchOutcome:
        start = time.perf_counter()
        try:
            image = decode_upload(data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                                  max_aspect_ratio=settings.max_image_aspect_ratio)  # fmt: skip
        finally:
            timings["decode"] = (time.perf_counter() - start) * 1000.0
            engine.metrics.stage_seconds.labels("image", "decode").observe(timings["decode"] / 1000.0)
        return engine.search_image(image, k=k, alpha=options.alpha, filters=options.filters, timings=timings,
                                   facets=options.facets, include_predicted=options.include_predicted,
                                   rerank_top_n=top_n)  # fmt: skip

    outcome = await run_in_threadpool(run)
    return json_response("image", outcome, k, timing=options.timing, engine=engine)


async def _read_multipart(request: Request, settings: Settings) -> tuple[bytes, SearchOptions]:
    form = await read_image_form(request, text_fields=FORM_FIELDS, max_image_bytes=settings.max_image_bytes)
    raw = {name: _form_value(name, value) for name, value in form.fields.items()}
    try:
        options = SearchOptions.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(list(exc.errors()), ("body",)) from exc
    return form.image, options


def _form_value(name: str, value: str) -> Any:
    """Form fields are text: JSON-decode them (k=5 -> 5, rerank=false -> False, filters={...}); anything
    else stays a string and fails validation (booleans are strict: rerank=1 or rerank=yes is a 422)."""
    if name == "filters":
        return json_field(value, loc=["body", "filters"], message="form field filters is not a JSON object")
    try:
        return json.loads(value)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser recurses
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
