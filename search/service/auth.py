"""API keys: who may write the catalog (and, when configured, read it).

Settings hold only digests (`VITRINE_WRITE_KEYS='{"ci": "sha256:<hex>"}'`), never keys. A request
sends `Authorization: Bearer <key>`; its SHA-256 is compared with every stored digest in constant
time (hmac.compare_digest, no early exit), so neither the answer nor its timing says which digest
came close. Keys must be random (at least 128 bits): then a plain SHA-256 is as strong as a slow
password hash. Missing key: 401 (with `WWW-Authenticate: Bearer`); a key that matches none: 403.

    python -m search.service.auth ci      # a new key, and the settings entry that admits it
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sys
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from search.service.deps import get_settings
from search.service.errors import ApiError
from search.service.settings import Settings

bearer = HTTPBearer(
    auto_error=False,  # our own 401/403, in the service's error shape
    scheme_name="ApiKey",
    description="an API key from VITRINE_WRITE_KEYS (or VITRINE_READ_KEYS), as `Authorization: Bearer <key>`",
)


def key_digest(key: str) -> str:
    """What settings store for `key`."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id_for(key: str, keys: dict[str, str]) -> str | None:
    """The id of the stored digest `key` matches, or None. Every digest is compared, in constant time."""
    presented = key_digest(key).encode()
    found = None
    for key_id, digest in keys.items():
        if hmac.compare_digest(presented, digest.encode()):
            found = key_id
    return found


def _check(credentials: HTTPAuthorizationCredentials | None, keys: dict[str, str], action: str) -> str:
    """The key id; 401 without a key, 403 when it matches none of `keys`. `action`: what the key is for ("write")."""
    if credentials is None or not credentials.credentials:
        raise ApiError(401, "missing_api_key", f"an API key is needed to {action}: send Authorization: Bearer <key>",
                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    key_id = key_id_for(credentials.credentials, keys)
    if key_id is None:
        raise ApiError(403, "invalid_api_key", f"this API key may not {action}")
    return key_id


async def require_write_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> str:
    """The id of the caller's write key (401 without a key, 403 with a wrong one; refusals are audited)."""
    try:
        return _check(credentials, settings.write_keys, "change the catalog")
    except ApiError as exc:
        if exc.status == 403:  # someone holds a key, but not a good one: worth a line in the audit log
            audit = getattr(request.app.state, "audit", None)
            if audit is not None:
                audit.record(key_id=None, action=request.method.lower(), ids=[], result="forbidden", status=403,
                             path=request.url.path[:300])  # fmt: skip
        raise


async def require_read_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> str | None:
    """Reads are open unless VITRINE_READ_KEYS is set; then a read or a write key is needed."""
    if not settings.read_keys:
        return None
    return _check(credentials, {**settings.read_keys, **settings.write_keys}, "read the catalog")


def main(argv: list[str]) -> int:
    key_id = argv[0] if argv else "default"
    key = secrets.token_urlsafe(32)
    print(f"API key (give it to the client, store it nowhere else): {key}")
    print(f"settings:  VITRINE_WRITE_KEYS='{json.dumps({key_id: key_digest(key)})}'")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
