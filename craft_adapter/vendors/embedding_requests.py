"""What every hosted embedding API client shares: chunked requests, one counted call per chunk, typed errors.

An embedding API caps the inputs of one request (Infinity: 32 images; Cohere: 96 texts; Voyage: 1,000 inputs), so
:meth:`EmbeddingHttpClient.embed_images` and :meth:`~EmbeddingHttpClient.embed_texts` split a request into chunks
of at most the cap, and every chunk is one HTTP request, one vendor call. :meth:`~EmbeddingHttpClient.calls_for`
says beforehand what a request of ``n`` inputs costs, so a meter can refuse it before anything is sent, and
:attr:`~EmbeddingHttpClient.calls` counts the requests actually sent.

Each protocol module (:mod:`.openai_embeddings`, :mod:`.cohere_embed`, :mod:`.voyage_embed`) says only how a chunk
becomes a request body and how a reply becomes rows; this module owns the transport (httpx, keep-alive), the
error rule (HTTP 408/425/429/5xx and network faults are transient; the vendor's own message and ``Retry-After``
are kept; keys are scrubbed from every message), and the row checks (one finite vector per input, L2-normalised
float32). Torch-free: the runtime and the server use these clients too.
"""

from __future__ import annotations

import base64
import json
import math
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import httpx
import numpy as np
from PIL import Image

from craft_adapter.vendors.credentials import (
    Secret,
    auth_headers,
    header_secrets,
    redact_url,
    url_secrets,
    vendor_detail,
)
from craft_adapter.vendors.faults import VendorError, status_error
from craft_adapter.vendors.http_clients import EMBEDDING, image_png
from craft_adapter.vendors.http_limits import embedding_reply_cap, send_capped
from craft_adapter.vendors.replies import unit_rows


def data_uri(image: Image.Image) -> str:
    """``image`` as a lossless PNG data URI, the image form every embedding API here accepts."""
    return "data:image/png;base64," + base64.b64encode(image_png(image)).decode("ascii")


def float32_base64(text: str) -> np.ndarray:
    """A vector sent as base64 of little-endian float32 bytes (the OpenAI/Infinity/Voyage ``base64`` encoding)."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) % 4:
        raise ValueError(f"{len(raw)} bytes is not a whole number of float32 values")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def vendor_message(body: bytes) -> str:
    """The human part of an error body in any of the shapes these APIs use, else the start of the raw body.

    Shapes: ``{"error": {"message"}}`` (OpenAI, Infinity), ``{"message"}`` (Cohere), ``{"detail": str}`` (Voyage,
    FastAPI 401) and ``{"detail": [{"msg", "loc"}, ...]}`` (FastAPI 422 validation, Infinity's request limits).
    """
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body[:300].decode("utf-8", "replace")
    if isinstance(answer, dict):
        error, detail = answer.get("error"), answer.get("detail")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(answer.get("message"), str):
            return answer["message"]
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):
            return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" if isinstance(d, dict)
                             else str(d) for d in detail[:5])
    return json.dumps(answer)[:300]


def indexed_rows(data: Any, n: int) -> list[Any]:
    """The embeddings of an OpenAI-style ``data`` list ``[{"embedding", "index"}]``, placed by ``index``."""
    rows: list[Any] = [None] * n
    for item in data:
        i = item["index"]
        if not isinstance(i, int) or not 0 <= i < n or rows[i] is not None:
            raise ValueError(f"index {i!r} is not one of the {n} inputs, or comes twice")
        rows[i] = item["embedding"]
    if any(r is None for r in rows):
        raise ValueError("the reply leaves out some inputs' embeddings")
    return rows


class EmbeddingHttpClient:
    """Base of the embedding API clients: an :class:`~craft_adapter.vendors.protocols.EmbeddingBackend` over HTTP.

    ``logit_scale`` is what turns cosine similarity into logits. These APIs do not publish one: leave it ``None``
    and the fit chooses the temperature from the few-shot data (:mod:`craft_adapter.training.temperature`), which
    the adapter records and the runtime uses; or pass the value the model is known to have.
    """

    capabilities = EMBEDDING
    protocol: ClassVar[str] = ""  # the registry name (craft_adapter.vendors.registry)
    default_url: ClassVar[str] = ""

    def __init__(self, url: str | None = None, *, key: Secret | str | None = None, model: str | None = None,
                 logit_scale: float | None = None, max_images: int = 32, max_texts: int = 32,
                 timeout: float = 60.0, headers: dict[str, str] | None = None) -> None:
        if max_images < 1 or max_texts < 1:
            raise ValueError("max_images and max_texts must be at least 1 input per request")
        self.url = (url or self.default_url).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"a {self.protocol} vendor needs an http(s) base URL, got {redact_url(self.url)!r}")
        key = Secret(key) if isinstance(key, str) else key
        self.model, self.logit_scale, self.timeout = model, logit_scale, timeout
        self.max_inputs = {"image": int(max_images), "text": int(max_texts)}
        self._headers = {"Content-Type": "application/json", **(headers or {}), **auth_headers(key)}
        self._secrets = header_secrets(self._headers.items()) + url_secrets(self.url)
        self._client = httpx.Client(timeout=timeout)
        self._calls_lock = threading.Lock()
        self.calls = 0  # HTTP requests sent (failed ones too): every one is a vendor call
        self.identity = {"name": self.protocol, "url": redact_url(self.url), "model": model}

    def calls_for(self, n_inputs: int, kind: str = "text") -> int:
        """Vendor calls (HTTP requests) that embedding ``n_inputs`` images or texts costs: one per chunk."""
        return math.ceil(n_inputs / self.max_inputs[kind]) if n_inputs > 0 else 0

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised image embeddings ``[n, d]``, in :meth:`calls_for` ``(n, "image")`` calls."""
        return self._embed("image", [data_uri(im) for im in images])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings ``[t, d]``, in :meth:`calls_for` ``(t, "text")`` calls."""
        return self._embed("text", list(texts))

    def close(self) -> None:
        """Close the keep-alive connections."""
        self._client.close()

    # -- what each protocol says ---------------------------------------------------------------------
    def endpoint(self) -> str:
        """The URL every request is posted to."""
        raise NotImplementedError

    def request_body(self, kind: str, inputs: list[str]) -> dict[str, Any]:
        """The JSON body for one chunk of image data URIs or texts."""
        raise NotImplementedError

    def reply_rows(self, answer: Any, n: int) -> list[Any]:
        """The ``n`` embeddings of a reply, in input order (lists of floats or base64 strings)."""
        raise NotImplementedError

    # -- shared mechanics ----------------------------------------------------------------------------
    def _embed(self, kind: str, inputs: list[str]) -> np.ndarray:
        if not inputs:
            raise ValueError(f"nothing to embed: a {kind} request needs at least one input")
        cap = self.max_inputs[kind]
        parts = [self._chunk(kind, inputs[i:i + cap]) for i in range(0, len(inputs), cap)]
        if len({p.shape[1] for p in parts}) != 1:
            raise VendorError(f"{self.identity['url']} answered embeddings of different widths across chunks")
        return unit_rows(np.concatenate(parts))

    def _chunk(self, kind: str, inputs: list[str]) -> np.ndarray:
        url = self.endpoint()
        shown = redact_url(url)
        with self._calls_lock:
            self.calls += 1
        try:
            # no redirects, a size cap scaled by the inputs, bounded gzip (craft_adapter.vendors.http_limits)
            response = send_capped(self._client, "POST", url, cap=embedding_reply_cap(len(inputs)),
                                   timeout=self.timeout, headers=self._headers,
                                   content=json.dumps(self.request_body(kind, inputs)).encode())
        except httpx.HTTPError as e:  # refused, reset, timed out, cut short: worth another try
            reason = vendor_detail(e, self._secrets)
            raise VendorError(f"cannot reach the {self.protocol} vendor at {shown} ({reason})") from None
        if response.status_code >= 400:
            status = response.status_code
            detail = vendor_detail(vendor_message(response.content), self._secrets)
            raise status_error(f"{shown} answered HTTP {status}: {detail}", status, response.headers.get("Retry-After"))
        try:
            rows = self.reply_rows(response.json(), len(inputs))
            emb = np.stack([float32_base64(r) if isinstance(r, str) else np.asarray(r, dtype=np.float32)
                            for r in rows])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise VendorError(f"{shown} answered a body that is not a {self.protocol} embedding reply for "
                              f"{len(inputs)} inputs: {vendor_detail(response.content, self._secrets)}") from None
        if emb.ndim != 2 or len(emb) != len(inputs) or not np.isfinite(emb).all():
            raise VendorError(f"{shown} answered embeddings of shape {emb.shape} for {len(inputs)} inputs, or "
                              "non-finite values; expected one finite vector per input")
        return emb
