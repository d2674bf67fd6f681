"""Replies of a hostile vendor, for the stub vendor's hostile fault kinds (tests and rehearsals of the reply contract).

Each function writes one reply to a :class:`http.server.BaseHTTPRequestHandler`:

- :func:`send_redirect`: a 3xx to another address (a client that follows it carries the key there);
- :func:`send_gzip_bomb`: a small gzip body that inflates to ``megabytes`` MB of spaces;
- :func:`send_endless`: a 200 that streams ``megabytes`` MB of a JSON string, never ending in time;
- :func:`send_echo`: an error body echoing the caller's key in one encoding, after ``pad`` filler characters, so the
  key can be placed across any cut a client makes.
"""

from __future__ import annotations

import base64
import json
import zlib
from functools import cache
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qsl, quote, urlsplit

ECHO_ENCODINGS = ("raw", "base64", "base64url", "basic", "bearer_base64", "urlencoded", "json", "query")
CHUNK = 1 << 20


@cache
def gzip_bomb(megabytes: int) -> bytes:
    """A gzip body of ``megabytes`` MB of spaces (about 1 KB per MB at level 9), built without holding them."""
    z = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = b" " * CHUNK
    return b"".join([*(z.compress(block) for _ in range(megabytes)), z.flush()])


def _head(handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str]) -> None:
    handler.send_response(status)
    for k, v in headers.items():
        handler.send_header(k, v)
    handler.end_headers()


def send_redirect(handler: BaseHTTPRequestHandler, status: int, location: str) -> None:
    """A redirect to ``location``."""
    _head(handler, status, {"Location": location, "Content-Length": "0"})


def send_gzip_bomb(handler: BaseHTTPRequestHandler, megabytes: int) -> None:
    """A 200 whose gzip body inflates to ``megabytes`` MB."""
    body = gzip_bomb(megabytes)
    _head(handler, 200, {"Content-Type": "application/json", "Content-Encoding": "gzip",
                         "Content-Length": str(len(body))})
    handler.wfile.write(body)


def send_endless(handler: BaseHTTPRequestHandler, megabytes: int) -> None:
    """A 200 that streams ``megabytes`` MB inside one JSON string; stops quietly when the client hangs up."""
    handler.close_connection = True
    _head(handler, 200, {"Content-Type": "application/json", "Content-Length": str(megabytes * CHUNK + 16)})
    try:
        handler.wfile.write(b'[{"label": "')
        block = b"a" * CHUNK
        for _ in range(megabytes):
            handler.wfile.write(block)
        handler.wfile.write(b'", "score": 1}]')
    except (BrokenPipeError, ConnectionResetError):
        pass


def echo_form(key: str, encoding: str, query: str = "") -> str:
    """The key as a careless vendor might echo it in ``encoding`` (``query``: the first value of the URL query)."""
    raw = key.encode()
    forms = {
        "raw": key, "base64": base64.b64encode(raw).decode(), "base64url": base64.urlsafe_b64encode(raw).decode(),
        "basic": base64.b64encode(b"user:" + raw).decode(),
        "bearer_base64": base64.b64encode(b"Bearer " + raw).decode(),
        "urlencoded": quote(key, safe=""), "json": json.dumps(key)[1:-1],
        "query": next((v for _, v in parse_qsl(query)), ""),
    }
    return forms[encoding]


def send_echo(handler: BaseHTTPRequestHandler, encoding: str, pad: int) -> None:
    """A 401 whose body is ``pad`` filler characters, then the caller's key in ``encoding``, then more text."""
    auth = handler.headers.get("Authorization", "")
    key = auth.split(None, 1)[-1] if auth.strip() else ""
    echoed = echo_form(key, encoding, urlsplit(handler.path).query)
    body = ("x" * pad + echoed + " was refused").encode()
    _head(handler, 401, {"Content-Type": "text/plain", "Content-Length": str(len(body))})
    handler.wfile.write(body)
