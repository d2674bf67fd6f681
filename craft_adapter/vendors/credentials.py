"""Vendor keys and URLs: read a key from a variable or a file, send it in one header, never print it.

A key is held as a :class:`Secret` (``repr`` and ``str`` are ``***``) and sent only by :func:`auth_headers`;
a vendor URL is checked by :func:`check_vendor_url` (fit and the server alike) and shown without credentials or
query string (:func:`redact_url`); text is scrubbed of secrets by :func:`scrub_secrets` alone, whether the secret
is a :class:`Secret` or the header values a client sent (:func:`header_secrets`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_KEY_ENV = "CRAFT_VENDOR_API_KEY"


class Secret:
    """A string that never prints: ``repr``/``str``/f-strings show ``***``; :meth:`reveal` gives it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that sends it."""
        return self._value

    def scrub(self, text: str) -> str:
        """``text`` with every occurrence of the secret replaced by ``***``."""
        return scrub_secrets(text, [self._value])

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def read_key(key_env: str, key_file: str = "", env: Mapping[str, str] | None = None) -> Secret | None:
    """An API key from ``key_file`` if given, else from the environment variable ``key_env``; or None."""
    if key_file:
        try:
            key = Path(key_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read the vendor key file {key_file} ({e.strerror})") from None
        if not key:
            raise ValueError(f"the vendor key file {key_file} is empty")
        return Secret(key)
    key = (os.environ if env is None else env).get(key_env, "").strip()
    return Secret(key) if key else None


def auth_headers(key: Secret | None, header: str = "Authorization", scheme: str = "Bearer") -> dict[str, str]:
    """The header that carries ``key`` (``scheme`` before it; empty sends it bare); nothing without a key."""
    if key is None:
        return {}
    return {header: f"{scheme} {key.reveal()}" if scheme else key.reveal()}


def check_vendor_url(url: str) -> None:
    """Refuse (``ValueError``) a vendor URL that is not ``http(s)://host...`` or that carries credentials."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"vendor URL must be http(s)://host[:port]/path, got {redact_url(url)!r}")
    if parts.username or parts.password:
        raise ValueError("put the vendor key in an environment variable or a file, not in the vendor URL")


def redact_url(url: str) -> str:
    """``url`` without credentials or query string (where some APIs carry keys): scheme, host, port, path."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def header_secrets(items: Any) -> list[str]:
    """The secret part of each header value that may carry a key (all but Content-Type): the token after an auth
    scheme, else the whole value. Scrubbing it leaves the scheme readable ("Bearer ***")."""
    found = {value.split(None, 1)[-1] for name, value in items if name.lower() != "content-type" and value.strip()}
    return sorted({v for v in found if len(v) >= 4}, key=len, reverse=True)


def scrub_secrets(text: str, secrets: list[str]) -> str:
    """``text`` with each of ``secrets`` (longest first, empty ones skipped) replaced by ``***``."""
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text

