"""Catalog writes: PUT /products/{id}, DELETE /products/{id} and POST /products:batch (API key required).

Every write is validated whole before it is queued (fields, the photo decoded under the upload
limits, ids), then committed by `search.service.writes.CatalogWriter` and answered once it is
durable and served. A batch is all-or-nothing: any bad row refuses the batch with a 422 whose
`details` name every bad row (`loc: ["body", "upsert", <row>, <field>]`). Refusals before the
queue (bad input, a full queue) are audited here; the writer audits the rest.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from search.service.auth import require_write_key
from search.service.deps import get_settings
from search.service.errors import ApiError, field_error, validation_error
from search.service.forms import IMAGE_FIELD, UPLOAD_MEDIA_TYPES, json_field, read_image_form
from search.service.images import decode_base64_image, decode_upload, image_suffix
from search.service.schemas import (
    ATTRIBUTES_SCHEMA,
    MAX_DESCRIPTION_CHARS,
    MAX_FIELD_CHARS,
    MAX_FILTER_CHARS,
    MAX_PRODUCT_ID_CHARS,
    MAX_TITLE_CHARS,
    NON_BLANK_PATTERN,
    PRODUCT_ID_PATTERN,
    AnyProductId,
    BatchRequest,
    BatchUpsert,
    ErrorResponse,
    ProductFields,
    ProductPut,
    WriteResponse,
    WriteResult,
)
from search.service.settings import Settings
from search.service.writes import CatalogWriter, ProductUpload, WriteJob, WriteOutcome

FORM_FIELDS = frozenset({"title", "category", "subcategory", "description", "attributes"})


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


WRITE_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("unreadable body (malformed JSON or multipart, bad base64)"),
    401: _error("no API key (send Authorization: Bearer <key>)"),
    403: _error("the API key is not one of VITRINE_WRITE_KEYS"),
    413: _error("body or photo too large"),
    415: _error("unsupported content type or photo format"),
    422: _error("invalid fields or photo; for a batch, `details` lists every bad row"),
    429: _error("the write queue is full: retry after the Retry-After header's seconds"),
    503: _error("writes are off here, another process is writing the index, or the service is shutting down"),
}
router = APIRouter(tags=["catalog"], responses=WRITE_RESPONSES)
NewProductIdPath = Annotated[
    str, Path(min_length=1, max_length=MAX_PRODUCT_ID_CHARS, pattern=PRODUCT_ID_PATTERN, description="letters, digits and . _ : -")
]
AnyProductIdPath = Annotated[str, Path(min_length=1, max_length=MAX_FILTER_CHARS, description="product id")]
WriteKey = Annotated[str, Depends(require_write_key)]


async def get_writer(request: Request) -> CatalogWriter:
    writer = getattr(request.app.state, "writer", None)
    if writer is None:
        raise ApiError(503, "writes_unavailable", "this service cannot write its index (it is not serving an index folder)")
    return writer


Writer = Annotated[CatalogWriter, Depends(get_writer)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

PUT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ProductPut.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["title", IMAGE_FIELD],
                    "additionalProperties": False,
                    "maxProperties": 1 + len(FORM_FIELDS),
                    "properties": {
                        IMAGE_FIELD: {"type": "string", "format": "binary", "contentMediaType": "image/*",
                                      "description": "the product photo: JPEG, PNG, WebP, GIF or BMP"},
                        "title": {"type": "string", "minLength": 1, "maxLength": MAX_TITLE_CHARS, "pattern": NON_BLANK_PATTERN},
                        "category": {"type": "string", "maxLength": MAX_FIELD_CHARS},
                        "subcategory": {"type": "string", "maxLength": MAX_FIELD_CHARS},
                        "description": {"type": "string", "maxLength": MAX_DESCRIPTION_CHARS},
                        "attributes": {"type": "string", "contentMediaType": "application/json", "contentSchema": ATTRIBUTES_SCHEMA,
                                       "description": 'JSON object, e.g. {"gender": "Women"}'},
                    },
                },
                "encoding": {IMAGE_FIELD: {"contentType": ", ".join(UPLOAD_MEDIA_TYPES)}},
            },
        },
    }
}


def inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its `$defs` substituted for their `$ref`s: a request body given in
    `openapi_extra` sits inside the OpenAPI document, where `#/$defs/...` would not resolve."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


BATCH_OPENAPI: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": inline_defs(BatchRequest.model_json_schema())}}}
}


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


def _audit_refusal(request: Request, key_id: str, action: str, ids: list[str], exc: ApiError) -> None:
    result = "queue_full" if exc.status == 429 else ("busy" if exc.status == 503 else "invalid")
    request.app.state.metrics.writes.labels(action, result).inc()
    request.app.state.audit.record(key_id=key_id, action=action, ids=ids, result=result, status=exc.status, error=exc.code)


async def _submit(request: Request, writer: CatalogWriter, job: WriteJob) -> WriteResponse:
    try:
        future = writer.submit(job)
    except ApiError as exc:
        _audit_refusal(request, job.key_id, job.action, job.ids, exc)
        raise
    outcome: WriteOutcome = await asyncio.wrap_future(future)  # durable (and served here) when it returns
    results = [WriteResult(id=id, result=outcome.changes[id]) for id in job.ids]
    return WriteResponse(version=outcome.version, results=results, took_ms=round(outcome.seconds * 1000.0, 3))


def _upload(id: str, fields: ProductFields, data: bytes, settings: Settings, row: int | None = None) -> ProductUpload:
    """Decode the photo under the upload limits (so the writer never meets a bad one) and keep its bytes."""
    decode_upload(data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                  max_aspect_ratio=settings.max_image_aspect_ratio)  # fmt: skip
    return ProductUpload(id=id, fields=fields, image=data, suffix=image_suffix(data), row=row)


@router.put("/products/{product_id}", response_model=WriteResponse, summary="Add or replace a product (API key)",
            openapi_extra=PUT_OPENAPI)  # fmt: skip
async def put_product(product_id: NewProductIdPath, request: Request, key_id: WriteKey, writer: Writer,
                      settings: SettingsDep) -> WriteResponse:  # fmt: skip
    """JSON `{title, category?, subcategory?, description?, attributes?, image_base64}`, or multipart with the
    same fields (attributes as a JSON text) and the photo as the file field `image`. Answered once the
    product is durable in a new index version and served; `result` says added, replaced or unchanged."""
    try:
        media_type = _media_type(request)
        if media_type == "multipart/form-data":
            fields, data = await _read_form(request, settings)
        elif _is_json(media_type):
            body = await _parse(request, ProductPut)
            fields = ProductFields.model_validate(body.model_dump(exclude={"image_base64"}))
            data = decode_base64_image(body.image_base64, max_bytes=settings.max_image_bytes, loc=["body", "image_base64"])
        else:
            got = f"not {media_type}" if media_type else "the request has no Content-Type"
            raise ApiError(415, "unsupported_media_type", f"send application/json with image_base64, or multipart/form-data ({got})")
        upload = await run_in_threadpool(_upload, product_id, fields, data, settings)
    except ApiError as exc:
        _audit_refusal(request, key_id, "put", [product_id], exc)
        raise
    return await _submit(request, writer, WriteJob("put", key_id, upserts=[upload]))


@router.delete("/products/{product_id}", response_model=WriteResponse, summary="Remove a product (API key)",
               responses={404: _error("no product with this id")})  # fmt: skip
async def delete_product(product_id: AnyProductIdPath, request: Request, key_id: WriteKey, writer: Writer) -> WriteResponse:
    """Answered once the product is gone from a new, durable index version that this replica serves."""
    return await _submit(request, writer, WriteJob("delete", key_id, deletes=[product_id]))


@router.post("/products:batch", response_model=WriteResponse, summary="Upsert and delete products together (API key)",
             openapi_extra=BATCH_OPENAPI)  # fmt: skip
async def batch(request: Request, key_id: WriteKey, writer: Writer, settings: SettingsDep) -> WriteResponse:
    """JSON `{upsert: [{id, title, ..., image_base64}], delete: [id, ...]}`, at most VITRINE_WRITE_MAX_ROWS rows,
    applied as one index version: every row, or none. A bad row refuses the batch (422, `details` per row)."""
    ids: list[str] = []
    try:
        if not _is_json(_media_type(request)):
            raise ApiError(415, "unsupported_media_type", "send application/json")
        envelope = await _parse(request, BatchEnvelope)
        ids = [row.get("id") for row in envelope.upsert if isinstance(row, dict) and isinstance(row.get("id"), str)]
        ids += list(envelope.delete)
        if len(envelope.upsert) + len(envelope.delete) > settings.write_max_rows:
            raise field_error(["body"], f"{len(envelope.upsert) + len(envelope.delete)} rows; a batch holds at most "
                                        f"{settings.write_max_rows}")  # fmt: skip
        uploads = await run_in_threadpool(_batch_uploads, envelope, settings)
    except ApiError as exc:
        _audit_refusal(request, key_id, "batch", ids, exc)
        raise
    job = WriteJob("batch", key_id, upserts=uploads, deletes=list(envelope.delete))
    if not job.ids:
        return WriteResponse(version=request.app.state.engine.version, results=[], took_ms=0.0)
    return await _submit(request, writer, job)


async def _parse(request: Request, model: type):
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(list(exc.errors()), ("body",)) from exc


class BatchEnvelope(BaseModel):
    """A batch before its rows are read: each upsert row is validated on its own, so one answer lists every bad row."""

    model_config = ConfigDict(extra="forbid")

    upsert: list[Any] = Field(default_factory=list)
    delete: list[AnyProductId] = Field(default_factory=list)


def _batch_uploads(envelope: BatchEnvelope, settings: Settings) -> list[ProductUpload]:
    """Every upsert row validated and its photo decoded, ids checked for repeats; all bad rows reported together (422)."""
    uploads, details = [], []
    for i, raw in enumerate(envelope.upsert):
        try:
            row = BatchUpsert.model_validate(raw)
        except ValidationError as exc:
            details += validation_error(list(exc.errors()), ("body", "upsert", i)).details or []
            continue
        loc = ["body", "upsert", i, "image_base64"]
        try:
            data = decode_base64_image(row.image_base64, max_bytes=settings.max_image_bytes, loc=loc)
            fields = ProductFields.model_validate(row.model_dump(exclude={"id", "image_base64"}))
            uploads.append(_upload(row.id, fields, data, settings, row=i))
        except ApiError as exc:
            details.append({"loc": loc, "msg": exc.message, "type": exc.code})
    seen = Counter([upload.id for upload in uploads] + list(envelope.delete))
    details += [{"loc": ["body", "upsert", upload.row, "id"], "msg": f"id {upload.id!r} appears more than once in the batch",
                 "type": "duplicate_id"} for upload in uploads if seen[upload.id] > 1]  # fmt: skip
    details += [{"loc": ["body", "delete", i], "msg": f"id {id!r} appears more than once in the batch", "type": "duplicate_id"}
                for i, id in enumerate(envelope.delete) if seen[id] > 1]  # fmt: skip
    if details:
        rows = len({tuple(d["loc"][:3]) for d in details})
        raise ApiError(422, "invalid_rows", f"{rows} row(s) of the batch are invalid; nothing was written", details)
    return uploads


async def _read_form(request: Request, settings: Settings) -> tuple[ProductFields, bytes]:
    form = await read_image_form(request, text_fields=FORM_FIELDS, max_image_bytes=settings.max_image_bytes)
    raw: dict[str, Any] = dict(form.fields)
    if "attributes" in raw:
        raw["attributes"] = json_field(raw["attributes"], loc=["body", "attributes"], message="form field attributes is not a JSON object")
    try:
        fields = ProductFields.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(list(exc.errors()), ("body",)) from exc
    return fields, form.image
