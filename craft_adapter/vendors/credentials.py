"""Vendor keys and URLs: read a key from a variable or a file, send it in one header, never print it.

A key is held as a :class:`Secret` (``repr`` and ``str`` are ``***``); URLs are shown without credentials or
query string (:func:`redact_url`); error bodies are scrubbed of every header value that may carry a key.
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
        return text.replace(self._value, "***") if self._value else text

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


def redact_url(url: str) -> str:
    """``url`` without credentials or query string (where some APIs carry keys): scheme, host, port, path."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def header_secrets(items: Any) -> list[str]:
    """Header values that may carry a key (all but Content-Type), and the token after an auth scheme."""
    found: list[str] = []
    for name, value in items:
        if name.lower() != "content-type" and value:
            found += [value, *(value.split(None, 1)[1:] if " " in value else [])]
    return sorted({v for v in found if len(v) >= 4}, key=len, reverse=True)


def scrub_secrets(text: str, secrets: list[str]) -> str:
    """``text`` with each of ``secrets`` replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text

