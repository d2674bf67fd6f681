"""One contract for reading a vendor's HTTP reply: no redirects, a byte cap, and bounded decompression.

Every vendor client (fit's urllib client, the embedding API clients on httpx, the server's aiohttp session) reads
replies through this module, so a hostile or broken vendor meets the same limits everywhere:

- **No redirect is ever followed.** urllib re-sends a redirected POST as a GET *with the Authorization header* to
  whatever host the ``Location`` names; a 3xx here is a non-transient :class:`VendorError` naming the status, so the
  key never travels to another address.
- **Replies are read in a stream under a byte cap** (:data:`MAX_REPLY_BYTES`; embedding replies scale with their
  inputs, :func:`embedding_reply_cap`); an error body is read only up to :data:`MAX_ERROR_BYTES`, enough for its
  message.
- **Compressed replies are decoded here, bounded.** Only ``gzip`` and ``deflate`` are asked for, and they are
  decoded with ``zlib``'s ``max_length`` so a 600 KB gzip bomb stops at the cap instead of inflating to gigabytes;
  any other ``Content-Encoding`` (br, zstd...) is refused, since a decoder without an output bound is a bomb fuse.

An oversized or undecodable reply is not transient: the same call would get the same reply, and each retry pays.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from craft_adapter.vendors.credentials import redact_url
from craft_adapter.vendors.faults import VendorError

if TYPE_CHECKING:  # aiohttp comes with the server extra only; this module is also the bare runtime's
    import aiohttp

MAX_REPLY_BYTES = 8 << 20  # a zero-shot reply for 20,000 classes is ~1 MB of JSON
MAX_ERROR_BYTES = 64 << 10  # of an error body: its message is in the first few hundred bytes
MAX_EMBED_DIMS = 4096  # widest embedding of any API supported (OpenAI: 3072)
JSON_BYTES_PER_VALUE = 24  # "-0.012345678901234567, " at worst; base64 floats take 5.4 bytes
ZERO_SHOT_BASE_BYTES = 64 << 10  # plus 4x each label's '{"label": ..., "score": ...}' entry
ACCEPT_ENCODING = "gzip, deflate"  # the encodings decoded here, with an output bound
READ_CHUNK = 64 << 10


def embedding_reply_cap(n_inputs: int) -> int:
    """The byte cap for an embedding reply of ``n_inputs`` vectors: the base cap plus the widest JSON vectors."""
    return MAX_REPLY_BYTES + max(n_inputs, 0) * MAX_EMBED_DIMS * JSON_BYTES_PER_VALUE


def zero_shot_reply_cap(labels: list[str]) -> int:
    """The byte cap for a zero-shot reply over ``labels``: each label echoed with its score, generously spaced."""
    return min(MAX_REPLY_BYTES, ZERO_SHOT_BASE_BYTES + 4 * sum(len(x.encode("utf-8", "replace")) + 48 for x in labels))


def is_redirect(status: int) -> bool:
    """Whether ``status`` asks the client to go elsewhere (3xx), which a vendor client never does."""
    return 300 <= status < 400


def redirect_error(where: str, status: int, location: str | None) -> VendorError:
    """The non-transient :class:`VendorError` for a redirect: names the status, says the key stayed here."""
    target = f" to {redact_url(location)}" if location and "://" in location else ""
    return VendorError(f"{where} answered HTTP {status}, a redirect{target}; redirects are never followed, so the "
                       "API key is not sent to another address. Point the client at the final vendor URL",
                       transient=False, status=status)


class BodyReader:
    """Collects a reply body from raw (possibly compressed) chunks, decoding as it goes, within ``cap`` bytes.

    With ``truncate`` (error bodies), bytes past the cap are dropped; otherwise going past it is a
    :class:`VendorError`. The cap holds for the raw bytes and for the decoded ones alike.
    """

    def __init__(self, encoding: str | None, cap: int, where: str, truncate: bool = False) -> None:
        self.cap, self.where, self.truncate = cap, where, truncate
        self.full = False  # with truncate: the cap is reached, stop reading
        self._raw = 0
        self._out = bytearray()
        codings = [c.strip().lower() for c in (encoding or "").split(",") if c.strip()]
        codings = [c for c in codings if c != "identity"]
        if len(codings) > 1 or (codings and codings[0] not in ("gzip", "x-gzip", "deflate")):
            raise VendorError(f"{where} answered in Content-Encoding {str(encoding)[:40]!r}, which was not asked for "
                              f"(only {ACCEPT_ENCODING} are decoded, with a size bound)", transient=False)
        self._coding = codings[0] if codings else None
        self._zlib = None if self._coding is None else zlib.decompressobj(
            zlib.MAX_WBITS | 16 if self._coding != "deflate" else zlib.MAX_WBITS)
        self._first = True

    def feed(self, raw: bytes) -> None:
        """Add a raw chunk; raises :class:`VendorError` once the body passes the cap (unless truncating)."""
        if self.full or not raw:
            return
        self._raw += len(raw)
        if self._raw > self.cap and not self.truncate:
            self._too_big()
        if self._zlib is None:
            self._add(raw)
            return
        try:
            self._inflate(raw)
        except zlib.error:
            if not (self._first and self._coding == "deflate"):
                raise VendorError(f"{self.where} sent a {self._coding} body that does not decode") from None
            self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)  # "deflate" is often sent raw, without zlib's header
            self._inflate(raw)
        self._first = False

    def _inflate(self, data: bytes) -> None:
        while data and not self.full:
            room = self.cap - len(self._out)
            self._add(self._zlib.decompress(data, room + 1))  # never more than one byte past the cap
            data = self._zlib.unconsumed_tail

    def _add(self, data: bytes) -> None:
        room = self.cap - len(self._out)
        if len(data) > room:
            if not self.truncate:
                self._too_big()
            data, self.full = data[:room], True
        self._out += data

    def _too_big(self) -> None:
        raise VendorError(f"{self.where} sent a reply over the {self.cap}-byte limit (decoded); a vendor reply is "
                          "never that large: check the vendor URL", transient=False)

    def finish(self) -> bytes:
        """The decoded body."""
        if self._zlib is not None and not self.full:
            try:
                self._add(self._zlib.flush())
            except zlib.error:
                raise VendorError(f"{self.where} sent a {self._coding} body that does not decode") from None
        return bytes(self._out)


def _read_all(reader: BodyReader, chunks: Iterable[bytes], deadline: float) -> bytes:
    for chunk in chunks:
        reader.feed(chunk)
        if reader.full:
            break
        if time.monotonic() > deadline:  # a reply that trickles in byte by byte
            raise VendorError(f"{reader.where} did not finish its reply in time")
    return reader.finish()


def _without_coding(headers: httpx.Headers) -> list[tuple[str, str]]:
    drop = ("content-encoding", "content-length", "transfer-encoding")
    return [(k, v) for k, v in headers.multi_items() if k.lower() not in drop]


def send_capped(client: httpx.Client, method: str, url: str, *, cap: int = MAX_REPLY_BYTES,
                timeout: float = 60.0, **kwargs: Any) -> httpx.Response:
    """``client.request`` under this module's contract; the returned response holds the decoded, capped body.

    Redirects and oversized replies raise :class:`VendorError`; network failures raise httpx's errors as before.
    """
    where = redact_url(url)
    headers = {**(kwargs.pop("headers", None) or {}), "Accept-Encoding": ACCEPT_ENCODING}
    deadline = time.monotonic() + 2 * timeout
    with client.stream(method, url, headers=headers, follow_redirects=False, timeout=timeout, **kwargs) as r:
        if is_redirect(r.status_code):
            raise redirect_error(where, r.status_code, r.headers.get("Location"))
        error = r.status_code >= 400
        reader = BodyReader(r.headers.get("Content-Encoding"), MAX_ERROR_BYTES if error else cap, where, error)
        body = _read_all(reader, r.iter_raw(READ_CHUNK), deadline)
        return httpx.Response(r.status_code, headers=_without_coding(r.headers), content=body, request=r.request)


@dataclass(frozen=True)
class CappedReply:
    """A reply read under this module's contract: its status and headers, and its decoded body within the cap."""

    status: int
    headers: Mapping[str, str]
    content: bytes


async def send_capped_async(session: aiohttp.ClientSession, method: str, url: Any, *, cap: int = MAX_REPLY_BYTES,
                            where: str | None = None, **kwargs: Any) -> CappedReply:
    """:func:`send_capped` for an aiohttp session; the caller bounds the time (``timeout=``, ``asyncio.timeout``).

    The session must leave bodies compressed (``auto_decompress=False``): they are decoded here, with the output
    bound, where aiohttp's own decoder has none. ``where`` names the vendor in messages (default: ``url``
    redacted). Network failures raise aiohttp's errors as they are.
    """
    if session.auto_decompress:
        raise ValueError("send_capped_async needs a session made with auto_decompress=False (bounded decoding)")
    where = where or redact_url(str(url))
    headers = {**(kwargs.pop("headers", None) or {}), "Accept-Encoding": ACCEPT_ENCODING}
    async with session.request(method, url, headers=headers, allow_redirects=False, **kwargs) as r:
        if is_redirect(r.status):
            raise redirect_error(where, r.status, r.headers.get("Location"))
        error = r.status >= 400
        reader = BodyReader(r.headers.get("Content-Encoding"), MAX_ERROR_BYTES if error else cap, where, error)
        while not reader.full and (chunk := await r.content.readany()):  # chunks as they arrive, each bounded
            reader.feed(chunk)
        if reader.full:
            r.close()  # the rest is never read: the connection is dropped, not pooled with a body half-read
        return CappedReply(r.status, r.headers, reader.finish())


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None  # urllib then raises HTTPError(3xx), which open_capped turns into a redirect_error


_OPENER = urllib.request.build_opener(_NoRedirect)


def open_capped(request: urllib.request.Request, timeout: float,
                cap: int = MAX_REPLY_BYTES) -> tuple[int, Any, bytes]:
    """``(status, headers, body)`` of a urllib request under this module's contract (redirects refused, capped).

    An HTTP error status is returned, not raised, with its body read up to :data:`MAX_ERROR_BYTES`; network
    failures raise urllib's and http.client's own errors.
    """
    where = redact_url(request.full_url)
    request.add_header("Accept-Encoding", ACCEPT_ENCODING)
    deadline = time.monotonic() + 2 * timeout
    try:
        response = _OPENER.open(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        response = e
    with response:
        status = getattr(response, "status", None) or response.code
        if is_redirect(status):
            raise redirect_error(where, status, response.headers.get("Location"))
        error = status >= 400
        reader = BodyReader(response.headers.get("Content-Encoding"), MAX_ERROR_BYTES if error else cap, where,
                            error)
        body = _read_all(reader, iter(lambda: response.read(READ_CHUNK), b""), deadline)
        return status, response.headers, body
