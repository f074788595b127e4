"""The service's own settings: authentication, CORS, request limits, ingress availability.

Declared once here (`ServiceSettings`, one line of doc per field); `serving.app.build_app` takes
them as the `service:` mapping of the app's arguments (serve_config.yaml) or as its `service=`
argument, and the ingress replicas read them. API keys come from three places, merged:
`api_keys` (tests; avoid in config files), the file `api_keys_file` (one key per line) and the
environment variable `LIGHTX2V_API_KEYS` (comma-separated) of the ingress replicas' processes.
With no key anywhere the API is open, as before; `/health` is always open.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

API_KEYS_ENV = "LIGHTX2V_API_KEYS"
"""Environment variable with comma-separated API keys (read in the ingress replicas)."""
MIN_KEY_CHARS = 16
MiB = 1024 * 1024


@dataclass(frozen=True)
class ServiceSettings:
    """Settings of the HTTP entrance and the job runners (frozen; checked when built)."""

    api_keys: tuple[str, ...] = ()
    """API keys accepted as `Authorization: Bearer KEY` (prefer api_keys_file or $LIGHTX2V_API_KEYS)."""
    api_keys_file: str | None = None
    """File with one API key per line (blank lines and `#` comments ignored), read at start."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins allowed to call the API from other sites; empty = no CORS, cross-site writes refused."""
    max_body_bytes: int = 48 * MiB
    """Largest request body: a larger Content-Length gets 413 before reading, a longer stream at the limit."""
    max_upload_bytes: int = 32 * MiB
    """Largest uploaded file (`input_reference`); the body limit bounds it too."""
    max_image_pixels: int = 4096 * 4096
    """Largest input image (width x height, read from its header before decoding)."""
    ingress_replicas: int = 2
    """Ingress replicas sharing the job store (one node): while one is replaced, the other answers."""
    job_lease_s: float = 15.0
    """A job whose ingress replica has not heartbeat for this long is failed (code `interrupted`)."""

    def __post_init__(self) -> None:
        for name in ("api_keys", "cors_origins"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"service.{name} must be a list of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for key in self.api_keys:
            _check_key(key, "service.api_keys")
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"service.cors_origins: each origin must be 'http(s)://host[:port]' "
                                 f"or '*', got {origin!r}")
        for name, low in (("max_body_bytes", 1024), ("max_upload_bytes", 1024),
                          ("max_image_pixels", 64 * 64), ("ingress_replicas", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"service.{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.job_lease_s, (int, float)) or not self.job_lease_s >= 2:
            raise ValueError(f"service.job_lease_s must be a number >= 2 (seconds), got {self.job_lease_s!r}")

    @classmethod
    def from_value(cls, value: "ServiceSettings | Mapping[str, Any] | None") -> "ServiceSettings":
        """From a mapping (serve_config.yaml's `service:`), an instance, or None (defaults).
        Unknown names are refused, naming the known ones."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"service must be a mapping of settings, got {type(value).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"service.{unknown[0]} is not a setting; known: {', '.join(known)}")
        return cls(**dict(value))

    @classmethod
    def from_flags(cls, values: Any) -> "ServiceSettings":
        """From parsed CLI flags (an argparse namespace or a mapping): every value named like a
        field and not None sets it; the rest keep their defaults."""
        given = vars(values) if not isinstance(values, Mapping) else values
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in given.items() if k in names and v is not None})

    def to_dict(self) -> dict[str, Any]:
        """Plain values (what the replicas are given)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def load_api_keys(self, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
        """All API keys: `api_keys`, the lines of `api_keys_file`, `$LIGHTX2V_API_KEYS`.
        Empty: the API is open. A short or malformed key is refused, naming where it came from."""
        environ = os.environ if environ is None else environ
        keys = list(self.api_keys)
        if self.api_keys_file:
            path = Path(self.api_keys_file)
            try:
                lines = path.read_text().splitlines()
            except OSError as err:
                raise ValueError(f"service.api_keys_file: cannot read {path} ({err.strerror})") from None
            for n, line in enumerate(lines, 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(_check_key(line, f"service.api_keys_file line {n}"))
        for key in filter(None, (k.strip() for k in environ.get(API_KEYS_ENV, "").split(","))):
            keys.append(_check_key(key, f"${API_KEYS_ENV}"))
        return tuple(dict.fromkeys(keys))


def _check_key(key: str, where: str) -> str:
    if len(key) < MIN_KEY_CHARS or not key.isascii() or any(c.isspace() for c in key):
        raise ValueError(f"{where}: an API key must be at least {MIN_KEY_CHARS} printable ASCII "
                         f"characters without spaces (got one of {len(key)} characters)")
    return key


def owner_of(key: str) -> str:
    """The owner id recorded on the jobs of `key` (a hash: the key itself is never stored)."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:24]
