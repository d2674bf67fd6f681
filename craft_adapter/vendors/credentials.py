"""Vendor keys and URLs: read a key from a variable or a file, send it in one header, never print it.

A key is held as a :class:`Secret` (``repr`` and ``str`` are ``***``) and sent only by :func:`auth_headers`;
a vendor URL is checked by :func:`check_vendor_url` (fit and the server alike) and shown without credentials or
query string (:func:`redact_url`); text is scrubbed of secrets by :func:`scrub_secrets` alone, whether the secret
is a :class:`Secret`, the header values a client sent (:func:`header_secrets`) or the query values of its vendor URL
(:func:`url_secrets`, where some APIs take their key).

A vendor may echo a key in its error body in any encoding: raw, base64 (of the key alone, or of ``user:key`` or
``Bearer key``, standard or URL-safe, padded or not), URL-encoded or JSON-escaped. :func:`secret_forms` lists every
form, and :func:`vendor_detail` is the one way vendor text reaches a message: it scrubs all of them first and only
then truncates, so a key straddling the cut cannot leak in part.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlsplit

DEFAULT_KEY_ENV = "CRAFT_VENDOR_API_KEY"
MIN_SECRET_CHARS = 4  # shorter header or query values are not keys, and scrubbing them would garble messages
DETAIL_CHARS = 200  # of vendor text in one message
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")  # newlines, escapes: a message is one plain line


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


def url_secrets(url: str) -> list[str]:
    """The values in ``url``'s query string (and any password), which may be keys: scrubbed wherever echoed."""
    parts = urlsplit(url)
    found = {v for _, v in parse_qsl(parts.query, keep_blank_values=True)} | {parts.password or ""}
    return sorted((v for v in found if len(v) >= MIN_SECRET_CHARS), key=len, reverse=True)


def _base64_cores(data: bytes) -> set[str]:
    """The base64 characters that encode ``data`` at each of the 3 byte offsets it can sit at in a longer text.

    Base64 maps 3 bytes to 4 characters, so ``data`` inside ``"user:" + data`` or ``"Bearer " + data`` is encoded
    as one of three strings, apart from the characters it shares with its neighbours; those cores are what a
    base64 echo of any text containing the secret contains.
    """
    cores = set()
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + data).decode("ascii")
        core = encoded[-(-8 * shift // 6):8 * (shift + len(data)) // 6]
        cores |= {core, core.replace("+", "-").replace("/", "_")}
    return cores


def secret_forms(secret: str) -> set[str]:
    """Every form of ``secret`` a vendor may echo: raw, URL-encoded, JSON-escaped and base64 in any framing."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1],
             json.dumps(secret, ensure_ascii=False)[1:-1], secret.replace("/", "\\/")}
    forms |= {f.lower() for f in forms if "%" in f}  # lower-case percent escapes
    data = secret.encode("utf-8", "surrogatepass")
    whole = base64.b64encode(data).decode("ascii")
    forms |= {whole, whole.rstrip("="), base64.urlsafe_b64encode(data).decode("ascii"),
              base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")} | _base64_cores(data)
    return {f for f in forms if len(f) >= min(len(secret), MIN_SECRET_CHARS)}


def scrub_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every form (:func:`secret_forms`) of each of ``secrets`` replaced by ``***``, longest first."""
    forms = set().union(*(secret_forms(s) for s in secrets if s))
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, "***")
    return text


def vendor_detail(body: bytes | str | BaseException, secrets: Iterable[str], limit: int = DETAIL_CHARS) -> str:
    """Vendor text (a body, a reply, an exception) fit for a message: scrubbed of ``secrets`` in every form FIRST,
    then made one plain line, then cut to ``limit`` characters: the one way vendor text reaches a message."""
    if isinstance(body, bytes | bytearray):
        text = bytes(body).decode("utf-8", "replace")
    elif isinstance(body, BaseException):
        text = str(body) or type(body).__name__
    else:
        text = str(body)
    text = _CONTROL.sub(" ", scrub_secrets(text, secrets)).strip()
    return text if len(text) <= limit else text[:limit] + "..."

