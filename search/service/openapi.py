"""The API's documentation: an OpenAPI schema that states what the server enforces, and Swagger UI
served from this server (the `swagger-ui-bundle-v2` package), so /docs works offline and its page
can carry a strict Content-Security-Policy.

The request models carry the fixed rules (strict types, patterns, minLength); the limits that
come from settings (max k, max query length) are written into the schema here, so a client
generated from /openapi.json refuses what the server would refuse.
"""
from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from search.service.headers import docs_csp
from search.service.settings import Settings

DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def swagger_ui_dir() -> Path:
    from swagger_ui_bundle import swagger_ui_path  # the serve extra's swagger-ui-bundle-v2

    return Path(str(swagger_ui_path))


def install_docs(app: FastAPI, settings: Settings, openapi_url: str) -> None:
    """GET /docs (Swagger UI, assets under /docs/assets) and an openapi() that writes the settings' limits."""
    app.openapi = _with_limits(app.openapi, settings)  # type: ignore[method-assign]
    page = get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{app.title} - API docs",
        swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_URL}/favicon-32x32.png",
        swagger_ui_parameters={"validatorUrl": None},  # else the page asks validator.swagger.io
    ).body
    # The page's one inline script (SwaggerUIBundle's set-up) is allowed by its hash, nothing else inline.
    hashes = [base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() for script in _INLINE_SCRIPT.findall(page.decode())]
    headers = {"Content-Security-Policy": docs_csp(hashes)}

    @app.get(DOCS_URL, include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)

    app.mount(ASSETS_URL, StaticFiles(directory=swagger_ui_dir()), name="docs-assets")


def _with_limits(generate: Callable[[], dict[str, Any]], settings: Settings) -> Callable[[], dict[str, Any]]:
    done = False

    def openapi() -> dict[str, Any]:
        nonlocal done
        schema = generate()  # FastAPI builds it once and caches it (app.openapi_schema)
        if not done:
            apply_limits(schema, settings)
            done = True
        return schema

    return openapi


def apply_limits(schema: dict[str, Any], settings: Settings) -> None:
    """Write max k and max query length from settings into the search request schemas (and /similar's k), and the batch's row limit."""
    components = schema.get("components", {}).get("schemas", {})
    image_body = schema["paths"]["/search/image"]["post"]["requestBody"]["content"]
    request_schemas = [
        components.get("TextSearchRequest", {}),
        image_body["application/json"]["schema"],
        image_body["multipart/form-data"]["schema"],
    ]
    for request in request_schemas:
        properties = request.get("properties", {})
        if "k" in properties:
            _limit(properties["k"], maximum=settings.max_k)
    query = components.get("TextSearchRequest", {}).get("properties", {}).get("query")
    if query is not None:
        _limit(query, maxLength=settings.max_query_chars)
    similar = schema["paths"].get("/products/{product_id}/similar", {}).get("get", {})
    for parameter in similar.get("parameters", []):
        if parameter.get("name") == "k":
            _limit(parameter.get("schema", {}), maximum=settings.max_k)
    batch = schema["paths"].get("/products:batch", {}).get("post", {}).get("requestBody", {}).get("content", {})
    rows = batch.get("application/json", {}).get("schema", {}).get("properties", {})
    for name in ("upsert", "delete"):  # the batch holds at most write_max_rows rows in all
        if name in rows:
            _limit(rows[name], maxItems=settings.write_max_rows)


def _limit(prop: dict[str, Any], **limits: Any) -> None:
    """Set limits on a property, or on the non-null branch of an optional one (anyOf [T, null])."""
    branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"]
    for target in branches or [prop]:
        target.update(limits)
