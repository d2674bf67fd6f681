"""What a client may send the adapter server, read and checked: bodies, images, options; typed client errors.

Images come as raw bytes (``Content-Type: image/*`` or ``application/octet-stream``), as multipart file parts,
or as base64 strings in JSON. Each is opened with PIL and fully decoded before any vendor call: a body that is
not an image in a supported format is 415, a damaged one 400, one over the byte or pixel limit 413. The
original bytes are what the vendor receives, so it sees exactly the client's pixels.

A small file can claim a huge image (a 2 KB WebP of 6320x6320 pixels decodes to about 550 MB), so decoding is
bounded by what it will cost, not by what was sent: each image's size is read from its header first, its decode
reserves that many bytes from one per-process :class:`DecodeBudget`, and every decode but a thumbnail's runs off
the event loop.
A request that cannot fit the budget even alone is 413; others wait their turn.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
from collections.abc import Awaitable, Callable
from typing import Any

from anyio import to_thread as anyio_threads
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message

SUPPORTED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF"})  # MPO: a phone's JPEG
# the only PIL openers that may look at a body (less to attack, less to try); MPO comes from the JPEG opener
OPENERS = sorted(SUPPORTED_FORMATS - {"MPO"})
DECODE_BUDGET_BYTES = 192 << 20  # decoded bytes in flight per process, all requests together (a 40 M-pixel PNG fits)
DECODE_BYTES_PER_PIXEL = {"WEBP": 14}  # libwebp decodes through RGBA and a copy (measured: 550 MB for 40 M px)
DEFAULT_BYTES_PER_PIXEL = 4
# a request this small (a thumbnail: at most 16 K pixels, e.g. 128x128, from at most 64 KB) decodes in about as
# long as the hop to a worker thread and back costs (measured: 0.02 ms for 28x28, 0.08 ms for 128x128 PNG noise;
# a 256x256 progressive JPEG took 1.4 ms, too long), so it decodes on the event loop; all else goes off it
INLINE_MAX_DECODED = 64 << 10
INLINE_MAX_BYTES = 64 << 10
BODY_READ_TIMEOUT_S = 30.0  # a body trickled in slower than this is abandoned (408), freeing its slot
OFF_LOOP_BYTES = 64 << 10  # JSON bodies and base64 strings past this are parsed and decoded off the event loop
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


def checked_image(data: bytes, max_pixels: int) -> bytes:
    """``data`` itself once PIL has decoded it fully as a supported image within ``max_pixels``; else ApiError."""
    if not data:
        raise ApiError(400, "bad_image", "the image is empty")
    try:
        with Image.open(io.BytesIO(data), formats=OPENERS) as im:
            if im.format not in SUPPORTED_FORMATS:
                raise ApiError(415, "unsupported_image", f"{im.format} images are not accepted; send one of "
                               f"{', '.join(sorted(SUPPORTED_FORMATS))}")
            width, height = im.size
            if width * height > max_pixels:
                raise ApiError(413, "image_too_large", f"the image is {width}x{height} pixels; the limit is "
                               f"{max_pixels} pixels")
            im.load()
    except UnidentifiedImageError:
        raise ApiError(415, "unsupported_image", "the body is not an image in a supported format ("
                       f"{', '.join(sorted(SUPPORTED_FORMATS))})") from None
    except Image.DecompressionBombError:
        raise ApiError(413, "image_too_large", "the image decompresses past the pixel limit") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ApiError(400, "bad_image", f"the image is damaged or truncated ({type(e).__name__})") from None
    return data


def from_base64(value: Any, what: str) -> bytes:
    """Bytes from a base64 string (optionally a ``data:`` URI); 400 otherwise."""
    if not isinstance(value, str) or not value:
        raise ApiError(400, "bad_request", f"{what} must be a non-empty base64 string")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", f"{what} is not valid base64") from None


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
        return await _off_loop(_json_images, body, max_batch, batch, size=len(body))
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


async def _off_loop(fn: Callable[..., Any], *args: Any, size: int) -> Any:
    """``fn(*args)``, in a worker thread when ``size`` bytes make it slow enough to stall every other request."""
    return fn(*args) if size <= OFF_LOOP_BYTES else await anyio_threads.run_sync(fn, *args)


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


class DecodeBudget:
    """Decoded bytes in flight, bounded: a decode waits until its bytes fit (first come, first served)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.in_use = capacity, 0
        self._changed: asyncio.Condition | None = None  # made on first use, inside the server's event loop

    async def reserve(self, n: int) -> None:
        """Wait until ``n`` more bytes fit; 413 if they never could."""
        if n > self.capacity:
            raise ApiError(413, "image_too_large", f"decoding this request needs about {n >> 20} MB, over the "
                           f"server's {self.capacity >> 20} MB decode bound; send smaller images or fewer at once")
        self._changed = self._changed or asyncio.Condition()
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_use + n <= self.capacity)
            self.in_use += n

    async def release(self, n: int) -> None:
        """Give ``n`` bytes back and wake the waiters."""
        assert self._changed is not None
        async with self._changed:
            self.in_use -= n
            self._changed.notify_all()


DECODE_BUDGET = DecodeBudget(DECODE_BUDGET_BYTES)


def webp_canvas(data: bytes) -> tuple[int, int] | None:
    """A WebP file's canvas size from its first chunk (VP8, VP8L or VP8X), or None if the header has none.

    Read by hand because PIL's WebP opener builds libwebp's decoder, which allocates the whole canvas (160 MB for
    40 M pixels) just to report the size: on the event loop, that is what a stream of tiny WebP bombs costs.
    """
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def decode_cost(data: bytes, max_pixels: int) -> int:
    """Bytes that decoding ``data`` will take, from its header alone; the same errors as :func:`checked_image`."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":  # never through PIL's opener on the event loop (see above)
        size = webp_canvas(data)
        if size is None:
            raise ApiError(400, "bad_image", "the WebP header gives no canvas size; the image is damaged")
        width, height = size
        if width * height > max_pixels:
            return 0  # refused by checked_image before its decoder exists
        return width * height * DECODE_BYTES_PER_PIXEL["WEBP"]
    try:
        with Image.open(io.BytesIO(data), formats=OPENERS) as im:
            if im.format not in SUPPORTED_FORMATS:
                return 0  # refused by checked_image without decoding
            width, height = im.size
            fmt = im.format
    except Exception:  # noqa: BLE001 (anything unreadable is refused by checked_image, which names the cause)
        return 0
    if width * height > max_pixels:
        return 0
    return width * height * DECODE_BYTES_PER_PIXEL.get(fmt, DEFAULT_BYTES_PER_PIXEL)


async def decoded_all(images: list[bytes], max_pixels: int,
                      to_thread: Callable[..., Awaitable[Any]] | None = None,
                      budget: DecodeBudget = DECODE_BUDGET) -> list[bytes]:
    """Every image checked by :func:`checked_image`, decoded within the decode ``budget``, off the event loop
    unless the whole request is tiny (see :data:`INLINE_MAX_BYTES`)."""
    cost = sum(decode_cost(b, max_pixels) for b in images)
    await budget.reserve(cost)
    try:
        if to_thread is None or (cost <= INLINE_MAX_DECODED and sum(map(len, images)) <= INLINE_MAX_BYTES):
            return [checked_image(b, max_pixels) for b in images]
        return await to_thread(lambda: [checked_image(b, max_pixels) for b in images])
    finally:
        await budget.release(cost)


async def hf_request(request: Request, max_bytes: int) -> tuple[bytes, list[str] | None]:
    """Image bytes and candidate labels (None: all) of a Hugging Face zero-shot request, JSON or raw bytes."""
    kind = media_type(request)
    body = await read_body(request, max_bytes)
    if kind != "application/json":
        if kind.startswith("image/") or kind in RAW_TYPES:
            return body, None
        raise ApiError(415, "unsupported_media_type", f"cannot read a {kind} body; send the Hugging Face JSON "
                       '{"inputs": <base64 image>, "parameters": {"candidate_labels": [...]}} or image bytes')
    return await _off_loop(_hf_json, body, size=len(body))


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

