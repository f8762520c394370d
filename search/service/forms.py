"""Multipart forms that carry one photo (the image search form, the catalog's product form), and JSON
text inside form fields and query parameters.

Both forms are read alike, with the same limits and refusals:

* at most one file and the named text fields, each text field up to FORM_FIELD_MAX_BYTES: a body
  past those (or not multipart at all) is 400 malformed_multipart;
* an unknown field, a missing photo, a photo sent as text or a text field sent as a file: 422;
* the photo part declared as anything but UPLOAD_MEDIA_TYPES: 415; over `max_image_bytes`: 413.

What the text fields mean is the caller's: `read_image_form` hands them over as text.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from search.service.errors import ApiError, field_error
from search.service.images import UPLOAD_FORMATS
from search.service.limits import BodyLimitError

IMAGE_FIELD = "image"
FORM_FIELD_MAX_BYTES = 64 * 1024  # text fields of a multipart form (the file has its own limit)
# The media types an upload may declare for its image part: the image formats that are decoded, and
# the generic type browsers send for files without a known extension. The bytes decide the format.
UPLOAD_MEDIA_TYPES = tuple(f"image/{fmt.lower()}" for fmt in UPLOAD_FORMATS) + ("application/octet-stream",)


@dataclass(frozen=True)
class ImageForm:
    image: bytes  # the photo's bytes, not decoded yet
    fields: dict[str, str]  # the text fields that were sent


async def read_image_form(request: Request, *, text_fields: frozenset[str], max_image_bytes: int) -> ImageForm:
    """The photo (file field `image`) and the text fields of a multipart body; see the module docstring."""
    try:
        form = await request.form(max_files=1, max_fields=len(text_fields), max_part_size=FORM_FIELD_MAX_BYTES)
    except (ApiError, BodyLimitError):  # too large, or too slow: their own 413 / 408
        raise
    except Exception as exc:  # multipart parse errors: starlette raises HTTPException or MultiPartException
        raise ApiError(400, "malformed_multipart", f"cannot parse the multipart body: {getattr(exc, 'detail', exc)}") from exc
    try:
        unknown = sorted(set(form.keys()) - text_fields - {IMAGE_FIELD})
        if unknown:
            expected = ", ".join([IMAGE_FIELD, *sorted(text_fields)])
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
        data = await upload.read(max_image_bytes + 1)
        if len(data) > max_image_bytes:
            raise ApiError(413, "image_too_large", f"image exceeds {max_image_bytes} bytes")
        fields: dict[str, str] = {}
        for name in sorted(text_fields & set(form.keys())):
            value = form.get(name)
            if not isinstance(value, str):
                raise field_error(["body", name], "must be a text field, not a file")
            fields[name] = value
        return ImageForm(data, fields)
    finally:
        await form.close()


def json_field(text: str, *, loc: list[str | int], message: str) -> Any:
    """The JSON value in a text field or query parameter; 400 malformed_json (with `message`) when it
    is not JSON, or is nested deeper than the parser recurses."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ApiError(400, "malformed_json", message, [{"loc": loc, "msg": "not valid JSON"}]) from None
