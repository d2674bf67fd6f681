"""What a client may send the adapter server, read and checked: bodies, images, options; typed client errors.

Images come as raw bytes (``Content-Type: image/*`` or ``application/octet-stream``), as multipart file parts,
or as base64 strings in JSON; :mod:`.image_decoding` checks and decodes them within a memory bound before any
vendor call. The original bytes are what the vendor receives, so it sees exactly the client's pixels.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message

from craft_adapter.serve.server.off_loop import off_loop

BODY_READ_TIMEOUT_S = 30.0  # a body trickled in slower than this is abandoned (408), freeing its slot
OFF_LOOP_BYTES = 64 << 10  # JSON bodies and base64 strings past this are parsed and decoded off the event loop
B64_STEP_CHARS = 1 << 18  # under 1 ms of decoding a step
RAW_TYPES = frozenset({"application/octet-stream", ""})
TRUE = frozenset({"1", "true", "yes", "on"})


class ApiError(Exception):
    """A request the server refuses: HTTP ``status``, a stable ``type`` and a message that says how to fix it."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers or {}


def media_type(request: Request) -> str:
    """The request's media type, lower case, without parameters."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refusing (413) past ``max_bytes`` without reading further."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, "body_too_large", f"the body is {declared} bytes; the limit is {max_bytes}")
    # one growing buffer, not a list of 64 KB chunks joined at the end: past 1 MB it is its own mapping (see
    # connections.return_big_frees), so a burst of big bodies leaves no fragmented heap behind
    body = bytearray()
    try:
        async with asyncio.timeout(BODY_READ_TIMEOUT_S):
            async for chunk in request.stream():
                if len(body) + len(chunk) > max_bytes:
                    raise ApiError(413, "body_too_large", f"the body is over the {max_bytes}-byte limit")
                body += chunk
    except TimeoutError:
        raise ApiError(408, "request_timeout", f"the body did not arrive within {BODY_READ_TIMEOUT_S:g} s") from None
    except ClientDisconnect:  # the client's fault and no bug: logged as 499 (nginx's code), never a 500
        raise ApiError(499, "client_disconnected", "the client closed the connection before its body "
                       "arrived") from None
    return bytes(body)


def from_base64(value: Any, what: str) -> bytes:
    """Bytes from a base64 string (optionally a ``data:`` URI); 400 otherwise."""
    if not isinstance(value, str) or not value:
        raise ApiError(400, "bad_request", f"{what} must be a non-empty base64 string")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:
        return b64decode_in_steps(value)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", f"{what} is not valid base64") from None


def b64decode_in_steps(value: str, step: int = B64_STEP_CHARS) -> bytes:
    """Strict base64 (whitespace ignored), decoded ``step`` characters at a time.

    The same answer and the same refusals as one ``b64decode(..., validate=True)``, but no single call holds the
    GIL for long: decoding a 16 MB body in one call held it for about 40 ms, during which the event loop (which
    needs the GIL to answer anything, ``/healthz`` included) stood still.
    """
    out, carry = bytearray(), ""
    for start in range(0, len(value), step):
        part = carry + "".join(value[start:start + step].split())
        if start + step >= len(value) or "=" in part:
            # the tail, or a part with padding in it: one call on everything left, so every rule of the one-call
            # decoder (where padding may stand, what may follow it) applies as it would to the whole string
            out += base64.b64decode(part + "".join(value[start + step:].split()), validate=True)
            return bytes(out)
        # whole quads without padding decode the same alone as in the whole; the last one waits for the next part
        # (padding right after a complete quad is accepted only when that quad goes with it)
        cut = max(0, len(part) - len(part) % 4 - 4)
        out += base64.b64decode(part[:cut], validate=True)
        carry = part[cut:]
    return base64.b64decode(carry, validate=True)  # an empty value


def json_body(body: bytes) -> Any:
    """The parsed JSON body; 400 if it is not JSON (or nested too deep to parse)."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad_json", "the body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "bad_json", "the body's JSON is nested too deep") from None


async def multipart_files(request: Request, body: bytes, max_files: int) -> list[bytes]:
    """The file parts of a multipart body already read, in order; 400 if malformed, 413 past ``max_files``."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    replay = Request(request.scope, receive)
    try:
        form = await replay.form(max_files=max_files, max_fields=100)
    except (MultiPartException, HTTPException) as e:  # Starlette wraps the parser's error when run in an app
        detail = str(getattr(e, "detail", e))
        status = 413 if "Too many files" in detail else 400
        raise ApiError(status, "bad_multipart", f"cannot read the multipart body: {detail}") from None
    try:
        return [await v.read() for _, v in form.multi_items() if not isinstance(v, str)]
    finally:
        await form.close()


async def request_images(request: Request, max_bytes: int, max_batch: int, batch: bool) -> list[bytes]:
    """The undecoded image bytes of a classify request: raw body, multipart file parts or base64 JSON."""
    kind = media_type(request)
    body = await read_body(request, max_bytes)
    if kind == "application/json":
        return await _maybe_off_loop(_json_images, body, max_batch, batch, size=len(body))
    if kind == "multipart/form-data":
        files = await multipart_files(request, body, max_batch)
        if not files:
            raise ApiError(400, "bad_request", "the multipart body has no file part")
        if not batch and len(files) > 1:
            raise ApiError(400, "bad_request", f"{len(files)} file parts sent for one image; use the batch endpoint")
        return files
    if kind.startswith("image/") or kind in RAW_TYPES:
        if batch:
            raise ApiError(415, "unsupported_media_type", "a batch is sent as multipart/form-data (one file part "
                           'per image) or JSON {"images": [...]}')
        return [body]
    raise ApiError(415, "unsupported_media_type", f"cannot read a {kind} body; send image bytes (image/* or "
                   "application/octet-stream), multipart/form-data, or application/json")


def _json_images(body: bytes, max_batch: int, batch: bool) -> list[bytes]:
    doc = json_body(body)
    key = "images" if batch else "image"
    value = doc.get(key) if isinstance(doc, dict) else None
    if batch:
        if not isinstance(value, list) or not value:
            raise ApiError(400, "bad_request", 'a JSON batch is {"images": [<base64>, ...]}')
        _check_count(len(value), max_batch)
        return [from_base64(v, f"images[{i}]") for i, v in enumerate(value)]
    if value is None:
        raise ApiError(400, "bad_request", 'a JSON request is {"image": <base64>}; for several use the batch '
                       "endpoint")
    return [from_base64(value, "image")]


async def _maybe_off_loop(fn: Callable[..., Any], *args: Any, size: int) -> Any:
    """``fn(*args)``, in a worker thread when ``size`` bytes make it slow enough to stall every other request."""
    return fn(*args) if size <= OFF_LOOP_BYTES else await off_loop(fn, *args)


def _check_count(n: int, max_batch: int) -> None:
    if n > max_batch:
        raise ApiError(413, "batch_too_large", f"{n} images in one request; the limit is {max_batch}")


def classify_options(request: Request, n_classes: int, default_top_k: int) -> tuple[int, bool]:
    """``top_k`` (1..classes) and ``vendor_scores`` (include the vendor's raw scores) from the query string."""
    raw = request.query_params.get("top_k")
    try:
        top_k = int(raw) if raw is not None else min(default_top_k, n_classes)
    except ValueError:
        raise ApiError(400, "bad_request", f"top_k must be an integer, got {raw!r}") from None
    if not 1 <= top_k <= n_classes:
        raise ApiError(400, "bad_request", f"top_k must be between 1 and {n_classes}")
    return top_k, request.query_params.get("vendor_scores", "").lower() in TRUE


async def hf_request(request: Request, max_bytes: int) -> tuple[bytes, list[str] | None]:
    """Image bytes and candidate labels (None: all) of a Hugging Face zero-shot request, JSON or raw bytes."""
    kind = media_type(request)
    body = await read_body(request, max_bytes)
    if kind != "application/json":
        if kind.startswith("image/") or kind in RAW_TYPES:
            return body, None
        raise ApiError(415, "unsupported_media_type", f"cannot read a {kind} body; send the Hugging Face JSON "
                       '{"inputs": <base64 image>, "parameters": {"candidate_labels": [...]}} or image bytes')
    return await _maybe_off_loop(_hf_json, body, size=len(body))


def _hf_json(body: bytes) -> tuple[bytes, list[str] | None]:
    doc = json_body(body)
    if not isinstance(doc, dict):
        raise ApiError(400, "bad_request", 'the body must be {"inputs": <base64 image>, "parameters": {...}}')
    params = doc.get("parameters") or {}
    labels = params.get("candidate_labels") if isinstance(params, dict) else None
    if labels is not None and (not isinstance(labels, list) or not labels
                               or not all(isinstance(x, str) for x in labels) or len(set(labels)) != len(labels)):
        raise ApiError(400, "bad_request", "parameters.candidate_labels must be a list of distinct strings")
    return from_base64(doc.get("inputs"), "inputs"), labels

