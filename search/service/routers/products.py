"""GET /products/{id}, its thumbnail, and GET /filters."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response

from search.service.deps import get_engine
from search.service.engine import SearchEngine, product_image_url
from search.service.schemas import ErrorResponse, FiltersResponse, ProductOut, predicted_values

router = APIRouter(tags=["products"])
ProductId = Annotated[str, Path(min_length=1, max_length=200, description="product id")]
NOT_FOUND = {404: {"model": ErrorResponse, "description": "unknown product id"}}


@router.get("/products/{product_id}", response_model=ProductOut, responses=NOT_FOUND, summary="One product")
def get_product(product_id: ProductId, engine: Annotated[SearchEngine, Depends(get_engine)]) -> ProductOut:
    record = engine.product(product_id)
    return ProductOut(
        id=record.id, title=record.title, category=record.category, subcategory=record.subcategory,
        description=record.description, attributes=record.attributes, predicted=predicted_values(record.predicted),
        image_url=product_image_url(record.id),
    )  # fmt: skip


@router.get(
    "/products/{product_id}/image",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "JPEG thumbnail"}, **NOT_FOUND},
    summary="A product's thumbnail (JPEG)",
)
def get_product_image(
    product_id: ProductId, request: Request, engine: Annotated[SearchEngine, Depends(get_engine)]
) -> Response:
    with engine.pinned() as served:  # the ETag names the version the image comes from
        etag = f'"{served.version}-{engine.settings.thumbnail_px}-{product_id}"'
        headers = {"ETag": etag, "Cache-Control": "public, max-age=3600"}
        if request.headers.get("if-none-match") == etag:
            engine.product(product_id, served)  # still 404 for ids that are gone
            return Response(status_code=304, headers=headers)
        return Response(engine.thumbnail(product_id, served), media_type="image/jpeg", headers=headers)


@router.get("/filters", response_model=FiltersResponse, summary="Filterable fields and their values")
def get_filters(engine: Annotated[SearchEngine, Depends(get_engine)]) -> FiltersResponse:
    return FiltersResponse(fields=engine.filter_fields)
