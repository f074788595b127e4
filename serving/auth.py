"""Who is calling: API keys (`Authorization: Bearer KEY`) and the cross-site write guard.

- `ApiKeys`: the service's keys (see `ServiceSettings.load_api_keys`). With none, the API is
  open and jobs have no owner. With keys, every route but `/health` needs one (401 in OpenAI's
  error shape, code `invalid_api_key`), and a key's jobs are its own: another key gets 404 for
  them and never sees them listed. Keys are compared by their SHA-256 digest, in constant time;
  the store records an owner id (`settings.owner_of`), never the key.
- `check_origin`: a browser page on another site can send a form-encoded or multipart POST
  without a CORS preflight (and so without asking). Writes (POST, DELETE, ...) that carry an
  `Origin` header are refused (403) unless the origin is this service's own or listed in
  `ServiceSettings.cors_origins`. Clients that are not browsers send no `Origin` and are not
  affected. (Form-encoded bodies are refused anyway: see `serving.ingress`.)
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Iterable, Mapping
from urllib.parse import urlsplit

from serving.api import ApiError
from serving.settings import owner_of

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


class ApiKeys:
    """The accepted keys, kept as digests; `owner(authorization_header)` checks one."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._owners = {_digest(k): owner_of(k) for k in keys}

    @property
    def enabled(self) -> bool:
        return bool(self._owners)

    def owner(self, authorization: str | None) -> str | None:
        """The owner id of the request's key; None when the API is open. Raises a 401 ApiError
        for a missing, malformed or unknown key (never echoing it)."""
        if not self._owners:
            return None
        if not authorization:
            raise ApiError(401, "no API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers=_CHALLENGE)
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "malformed Authorization header: expected 'Bearer KEY'",
                           code="invalid_api_key", headers=_CHALLENGE)
        digest = _digest(token)
        found = None
        for known, owner in self._owners.items():  # every key compared: no timing hint
            if hmac.compare_digest(known, digest):
                found = owner
        if found is None:
            raise ApiError(401, "incorrect API key", code="invalid_api_key", headers=_CHALLENGE)
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def check_origin(method: str, headers: Mapping[str, str], allowed: Iterable[str]) -> None:
    """Refuse (403) a write whose `Origin` is neither this service's host nor an allowed one."""
    if method.upper() in SAFE_METHODS:
        return
    origin = headers.get("origin")
    if origin is None:
        return  # not a browser (browsers send Origin with every cross-site write)
    allowed = tuple(allowed)
    host = headers.get("host")
    same_host = bool(host) and urlsplit(origin).netloc == host  # any scheme: TLS may end before us
    if "*" in allowed or origin in allowed or same_host:
        return
    raise ApiError(403, f"cross-site request refused: origin {origin!r} is not allowed to call this "
                        "API (the service's cors_origins setting lists the allowed origins)",
                   code="forbidden_origin")
