"""The adapter server's settings: one dataclass, filled from flags or ``CRAFT_SERVE_*`` environment variables.

Every field ``name`` reads from ``CRAFT_SERVE_<NAME>`` (e.g. ``CRAFT_SERVE_VENDOR_URL``). Worker processes
rebuild the config from the environment, which is how ``--workers N`` hands it to them. The vendor's API key
is never a field: it is read from the variable named by ``vendor_key_env`` or from ``vendor_key_file``, and is
held as a :class:`Secret`, whose ``repr`` and ``str`` are ``***``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from craft_adapter.vendors.credentials import DEFAULT_KEY_ENV, Secret, read_key, redact_url

ENV_PREFIX = "CRAFT_SERVE_"








@dataclass(frozen=True)
class ServerConfig:
    """Everything ``craft-adapter serve`` can be told; validated on creation."""

    adapter: str
    vendor_url: str
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    device: str = "cpu"  # the refiner is tiny: CPU answers in microseconds without a GPU round trip
    vendor_timeout_s: float = 10.0  # one vendor call
    request_timeout_s: float = 30.0  # a whole client request, retries and waits included
    vendor_retries: int = 2  # extra attempts after the first, on 429, 5xx, timeouts and malformed replies
    backoff_base_s: float = 0.05
    backoff_max_s: float = 2.0
    max_vendor_in_flight: int = 64  # per worker
    max_requests_in_flight: int = 1024  # per worker; past it uvicorn answers 503
    max_body_bytes: int = 16 << 20
    max_batch: int = 64
    max_image_pixels: int = 40_000_000
    top_k: int = 5
    vendor_key_env: str = DEFAULT_KEY_ENV
    vendor_key_file: str = ""
    vendor_auth_header: str = "Authorization"
    vendor_auth_scheme: str = "Bearer"  # empty: send the key bare, e.g. for an X-API-Key header
    graceful_timeout_s: float = 30.0
    log_level: str = "info"
    access_log: bool = True

    def __post_init__(self) -> None:
        url = urlsplit(self.vendor_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"vendor URL must be http(s)://host[:port]/path, got {redact_url(self.vendor_url)!r}")
        if url.username or url.password:
            raise ValueError("put the vendor key in an environment variable or a file, not in the vendor URL")
        positive = ("vendor_timeout_s", "request_timeout_s", "backoff_max_s", "max_vendor_in_flight",
                    "max_requests_in_flight", "max_body_bytes", "max_batch", "max_image_pixels", "top_k", "workers")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.vendor_retries < 0 or self.backoff_base_s < 0 or self.graceful_timeout_s < 0:
            raise ValueError("vendor_retries, backoff_base_s and graceful_timeout_s must not be negative")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be 0-65535, got {self.port}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.log_level not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError(f"log level must be critical, error, warning, info or debug, got {self.log_level!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServerConfig:
        """A config from ``CRAFT_SERVE_*`` variables in ``env`` (default ``os.environ``), then ``overrides``."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(raw, f.type, f.name)
        values.update(overrides)
        missing = [n for n in ("adapter", "vendor_url") if not values.get(n)]
        if missing:
            raise ValueError("no " + " and no ".join(f"{ENV_PREFIX}{n.upper()}" for n in missing) + " set")
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The ``CRAFT_SERVE_*`` variables that :meth:`from_env` turns back into this config."""
        return {ENV_PREFIX + f.name.upper(): _format(getattr(self, f.name)) for f in fields(self)}

    def vendor_key(self, env: Mapping[str, str] | None = None) -> Secret | None:
        """The vendor's API key from ``vendor_key_file``, else from the variable ``vendor_key_env``; or None."""
        return read_key(self.vendor_key_env, self.vendor_key_file, env)


def _parse(raw: str, kind: Any, name: str) -> Any:
    kind = str(kind)
    try:
        if kind == "bool":
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind}") from None
    return raw


def _format(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)
