"""Decoding untrusted uploads safely, and product thumbnails.

Uploads are limited in bytes before decoding, and in pixels and aspect ratio before
pixel data is read: decompression bombs, and thin images that the encoder's resize
(short side to its input size) would blow up to gigabytes. Only common photo formats
are opened: Pillow's rarer plugins (EPS, PSD, ...) are attack surface a shop's search
box does not need.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import struct

from PIL import Image, ImageOps, UnidentifiedImageError

from search.service.errors import ApiError
from search.service.schemas import DATA_URL_PREFIX

UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
FORMAT_SUFFIXES = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
WHITE = (255, 255, 255)
_DATA_URL = re.compile(DATA_URL_PREFIX)
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def decode_base64_image(text: str, *, max_bytes: int, loc: list[str | int]) -> bytes:
    """The bytes of an `image_base64` field (optional data: URL prefix, whitespace allowed): 413 over
    `max_bytes`, 400 invalid_base64 when it is not base64. What schemas.BASE64_PATTERN declares,
    checked without a backtracking regex over megabytes."""
    text = text.strip()
    prefix = _DATA_URL.match(text)
    text = "".join(text[prefix.end() if prefix else 0 :].split())  # line-wrapped base64 is common
    if len(text) > (max_bytes + 2) // 3 * 4:
        raise ApiError(413, "image_too_large", f"image exceeds {max_bytes} bytes")
    try:
        if not _BASE64_TEXT.fullmatch(text):
            raise ValueError("only A-Z, a-z, 0-9, + and / may come before the = padding")
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "invalid_base64", f"{loc[-1]} is not valid base64: {exc}",
                       [{"loc": list(loc), "msg": "not valid base64"}]) from exc  # fmt: skip


def image_suffix(data: bytes) -> str:
    """The file suffix of an upload `decode_upload` accepted (from its header)."""
    with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as image:
        return FORMAT_SUFFIXES[image.format]


def decode_upload(data: bytes, *, max_bytes: int, max_pixels: int, max_aspect_ratio: float) -> Image.Image:
    """Encoded image bytes -> RGB image, or an ApiError (413/415/422) saying what is wrong."""
    if not data:
        raise ApiError(422, "empty_image", "the uploaded image is empty")
    if len(data) > max_bytes:
        raise ApiError(413, "image_too_large", f"image is {len(data)} bytes, the limit is {max_bytes}")
    # No warnings-as-errors here: catch_warnings is not thread-safe and requests decode in parallel.
    # The pixel limit is checked from the header instead; Pillow itself raises DecompressionBombError
    # beyond twice Image.MAX_IMAGE_PIXELS (and only warns below that, which the check then refuses).
    try:
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise ApiError(415, "unsupported_image", f"not an image in a supported format ({', '.join(UPLOAD_FORMATS)})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ApiError(422, "invalid_image", f"cannot read the image: {exc}") from exc
    try:
        width, height = image.size
        if width < 1 or height < 1:
            raise ApiError(422, "invalid_image", "the image has no pixels")
        if width * height > max_pixels:
            raise _too_many_pixels(max_pixels, width, height)
        if max(width, height) > max_aspect_ratio * min(width, height):
            raise ApiError(
                422, "image_aspect_ratio",
                f"image is {width}x{height} px, an aspect ratio of {max(width, height) / min(width, height):.0f}:1; "
                f"the limit is {max_aspect_ratio:g}:1",
            )  # fmt: skip
        image.load()  # the pixels are decoded here: truncated and corrupt files fail now
        return to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(max_pixels) from exc
    except ApiError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error) as exc:
        raise ApiError(422, "invalid_image", f"cannot decode the image: {exc}") from exc
    finally:
        image.close()


def _too_many_pixels(max_pixels: int, width: int | None = None, height: int | None = None) -> ApiError:
    size = f"{width}x{height} = {width * height} pixels" if width and height else "too many pixels"
    return ApiError(413, "image_too_many_pixels", f"image has {size}; the limit is {max_pixels} pixels")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (product shots sit on white, not black)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def jpeg_thumbnail(image: Image.Image, *, max_px: int, quality: int) -> bytes:
    """A JPEG no larger than max_px on its longer side (never upscaled)."""
    thumb = to_rgb(image)
    thumb.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    thumb.save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue()
