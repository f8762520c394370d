"""GET /products/{id}/similar: "more like this", a photo query with the product's stored image vector.

Query parameters, as a search body has them (same limits, same 422s): k (1..max_k), alpha (0..1),
filters (a JSON object, URL-encoded: filters={"gender":"Women"}), facets (repeated:
facets=baseColour&facets=gender), timing (true|false). A GET, so a "more like this" link is
bookmarkable and cacheable; the product itself is never among the results.
"""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from search.service.deps import get_engine, get_settings
from search.service.engine import SearchEngine
from search.service.errors import field_error, validation_error
from search.service.forms import json_field
from search.service.routers.search import to_response
from search.service.schemas import ERROR_RESPONSES, MAX_FACETS, ErrorResponse, SearchOptions, SimilarResponse
from search.service.settings import Settings

router = APIRouter(tags=["products"], responses=ERROR_RESPONSES)
QUERY_PARAMS = frozenset({"k", "alpha", "filters", "facets", "timing"})
MAX_FILTERS_PARAM_CHARS = 2048  # the JSON text of `filters`: percent-encoded (up to 12 bytes a character), it still fits a request head (32 KiB)


@router.get(
    "/products/{product_id}/similar", response_model=SimilarResponse, response_model_exclude_unset=True,
    responses={404: {"model": ErrorResponse, "description": "unknown product id"}},
    summary="Products like this one (more like this)",
)  # fmt: skip
async def similar_products(
    request: Request,
    product_id: Annotated[str, Path(min_length=1, max_length=200, description="product id")],
    engine: Annotated[SearchEngine, Depends(get_engine)],
    settings: Annotated[Settings, Depends(get_settings)],
    k: Annotated[int | None, Query(ge=1, description="number of products to return (1..max_k)")] = None,
    alpha: Annotated[float | None, Query(ge=0.0, le=1.0, allow_inf_nan=False, description="title weight; default: the index's photo α")] = None,
    filters: Annotated[str | None, Query(max_length=MAX_FILTERS_PARAM_CHARS, description='JSON object, e.g. {"gender": "Women"}')] = None,
    facets: Annotated[list[str] | None, Query(description=f"filterable field to count (repeat, at most {MAX_FACETS})")] = None,
    timing: Annotated[bool, Query(description="include timings_ms")] = False,
) -> SimilarResponse:
    """The top k products by α·sim(image, title) + (1−α)·sim(image, image), where `image` is the product's
    stored image vector (nothing is encoded), the product itself left out; filters and facets as in search."""
    unknown = sorted(set(request.query_params.keys()) - QUERY_PARAMS)
    if unknown:
        raise field_error(["query", unknown[0]], f"unknown query parameter {unknown[0]!r}; expected {', '.join(sorted(QUERY_PARAMS))}")
    raw: dict[str, Any] = {"k": k, "alpha": alpha, "timing": timing, "facets": facets}
    if filters is not None:
        raw["filters"] = json_field(filters, loc=["query", "filters"],
                                    message='query parameter filters is not JSON: send a URL-encoded object, e.g. {"gender":"Women"}')  # fmt: skip
    try:
        options = SearchOptions.model_validate({name: value for name, value in raw.items() if value is not None})
    except ValidationError as exc:
        raise validation_error(list(exc.errors()), ("query",)) from exc
    k = settings.default_k if options.k is None else options.k
    if k > settings.max_k:
        raise field_error(["query", "k"], f"k must be between 1 and {settings.max_k}, got {k}")
    outcome = await run_in_threadpool(
        engine.similar, product_id, k=k, alpha=options.alpha, filters=options.filters, facets=options.facets
    )
    response = to_response("image", outcome, k, timing=options.timing)
    return SimilarResponse(product_id=product_id, **response.model_dump(exclude_unset=True))
