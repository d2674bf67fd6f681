"""Loopback servers that speak the published shapes of three embedding APIs, backed by a real embedding model.

Each server wraps an in-process :class:`~craft_adapter.vendors.protocols.EmbeddingBackend` (an open_clip model) and
answers one protocol as its documentation describes it: the route, the auth check, request validation, the input
caps, and error replies with the documented status and body shape. They count the requests they receive, so tests
can check that a client's meter is honest. Documentation each follows:

- ``openai-embeddings``: Infinity's ``POST /embeddings`` (https://michaelfeil.github.io/infinity; the schemas in
  ``libs/infinity_emb/infinity_emb/fastapi_schemas/pymodels.py`` and the route in ``infinity_server.py``), with
  the OpenAI envelope (https://platform.openai.com/docs/api-reference/embeddings/create). 422 with FastAPI's
  ``{"detail": [{"type", "loc", "msg"}]}`` for a bad request or one over the cap (32 images, 2,048 texts); 400
  ``{"error": {"message", "type", "param", "code"}}`` for an image that does not decode; 401 ``{"detail":
  "Unauthorized"}`` when a key is set and the bearer token differs.
- ``cohere``: Cohere Embed v2, ``POST /v2/embed`` (https://docs.cohere.com/reference/embed, the OpenAPI spec
  ``cohere-openapi.yaml``; errors https://docs.cohere.com/errors-reference). Every error is ``{"message", "id"}``;
  400 for a bad request, over 96 texts, or more than one image on an Embed v3 model (20 MB of images on v4).
- ``voyage``: Voyage multimodal embeddings, ``POST /v1/multimodalembeddings``
  (https://docs.voyageai.com/reference/multimodal-embeddings-api; errors https://docs.voyageai.com/docs/error-codes).
  Every error is ``{"detail": str}``; 400 for a bad request, over 1,000 inputs or 320,000 tokens, or an image over
  16 million pixels. Accepts ``output_encoding`` (documented) and ``encoding_format`` (what the SDK sends).

What a fake cannot do is said where it matters: no image URLs are fetched (offline), ``input_type`` does not change
an embedding, and a Voyage input of several items is the mean of their unit embeddings. :attr:`faults` scripts
429/5xx answers in each protocol's error shape, for retry tests.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from craft_adapter.vendors.protocols import EmbeddingBackend

DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)(;charset=[\w-]+)?;base64,(?P<data>.*)$", re.S)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")


class Answer(Exception):
    """A reply other than 200, raised from the protocol handlers."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def decode_data_uri(uri: str) -> tuple[str, Image.Image]:
    """``(mediatype, image)`` from a base64 data URI; ValueError if it is not one or does not decode."""
    m = DATA_URI.match(uri)
    if not m:
        raise ValueError("not a base64 data URI")
    try:
        with Image.open(io.BytesIO(base64.b64decode(m["data"], validate=True))) as im:
            im.load()
            return m["type"], im.copy()
    except (binascii.Error, UnidentifiedImageError, OSError) as e:
        raise ValueError(f"the image does not decode ({e})") from None


def _vectors(emb: np.ndarray, base64_out: bool) -> list[Any]:
    rows = np.asarray(emb, dtype="<f4")
    return [base64.b64encode(r.tobytes()).decode() if base64_out else r.tolist() for r in rows]


class FakeEmbeddingServer(ThreadingHTTPServer):
    """One protocol's server on 127.0.0.1; :attr:`url` is the base a client or SDK is given."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, protocol: str, backend: EmbeddingBackend, *, key: str | None = None, port: int = 0,
                 model_name: str | None = None, max_batch: int | None = None) -> None:
        if protocol not in HANDLERS:
            raise ValueError(f"unknown protocol {protocol!r}; one of {sorted(HANDLERS)}")
        self.protocol, self.backend, self.key = protocol, backend, key
        self.model_name = model_name or {"openai-embeddings": "craft-reference-clip", "cohere": "embed-v4.0",
                                         "voyage": "voyage-multimodal-3.5"}[protocol]
        # openai-embeddings: INFINITY_MAX_CLIENT_BATCH_SIZE (texts; images min(32, it)); cohere: texts; voyage: inputs
        self.max_batch = max_batch
        self.requests = 0  # POSTs to the endpoint, counted on arrival (answered or not)
        self.served = 0  # of those, answered 200
        self.faults: list[int] = []  # statuses to answer next, in order (429 carries Retry-After: 0)
        self._lock, self._model_lock = threading.Lock(), threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL: ``http://127.0.0.1:PORT``, with ``/v1`` for Voyage (its SDK's base includes it)."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}" + ("/v1" if self.protocol == "voyage" else "")

    def start(self) -> FakeEmbeddingServer:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name=f"fake-{self.protocol}")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FakeEmbeddingServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def embed(self, kind: str, items: list[Any]) -> np.ndarray:
        """Unit embeddings ``[n, d]`` of images or texts, one request at a time through the model."""
        with self._model_lock:
            return self.backend.embed_images(items) if kind == "image" else self.backend.embed_texts(items)

    def count(self, ok: bool | None = None) -> None:
        """Count a request on arrival (``ok`` None) or an answered one (``ok`` True)."""
        with self._lock:
            if ok is None:
                self.requests += 1
            elif ok:
                self.served += 1


# -- openai-embeddings (Infinity) --------------------------------------------------------------------------
def _unprocessable(loc: str, msg: str, kind: str = "value_error") -> Answer:
    return Answer(422, {"detail": [{"type": kind, "loc": ["body", loc], "msg": msg}]})


def _infinity_error(status: int, message: str) -> Answer:
    return Answer(status, {"error": {"message": message, "type": None, "param": None, "code": status}})


def _openai(server: FakeEmbeddingServer, headers: Any, body: Any) -> dict[str, Any]:
    if server.key is not None and headers.get("Authorization") != f"Bearer {server.key}":
        raise Answer(401, {"detail": "Unauthorized"}, {"WWW-Authenticate": "Bearer"})
    if not isinstance(body, dict):
        raise _unprocessable("", "Input should be a valid dictionary", "model_attributes_type")
    modality = body.get("modality", "text")
    if modality not in ("text", "image", "audio"):
        raise _unprocessable("modality", f"Input tag '{modality}' found using 'modality' does not match any of the "
                             "expected tags: 'text', 'image', 'audio'", "union_tag_invalid")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise _unprocessable("encoding_format", "Input should be 'float' or 'base64'", "enum")
    inputs = body.get("input")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    batch = server.max_batch or 2048
    cap = batch if modality == "text" else min(32, batch)
    if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
        raise _unprocessable("input", "Input should be a valid list of strings", "list_type")
    if not 1 <= len(inputs) <= cap:
        raise _unprocessable("input", f"List should have at least 1 item and at most {cap} items after "
                             f"validation, not {len(inputs)}", "too_long" if inputs else "too_short")
    if modality == "audio":
        raise _infinity_error(400, f"ModelNotDeployedError: model={server.model_name} does not support embed for "
                              "modality audio")
    if modality == "image":
        if not all(DATA_URI.match(x) or x.startswith(("http://", "https://")) for x in inputs):
            raise _unprocessable("input", "Input should be a valid data URI or URL", "url_parsing")
        try:
            items: list[Any] = [decode_data_uri(x)[1] for x in inputs]
        except ValueError as e:  # an http(s) URL lands here too: this server is offline
            raise _infinity_error(400, f"ImageCorruption: {e}") from None
    else:
        items = [x.strip() for x in inputs]
    emb = server.embed(modality, items)
    used = sum(len(x) for x in inputs)
    return {"object": "list", "model": server.model_name, "id": f"infinity-{uuid.uuid4()}", "created": int(time.time()),
            "data": [{"object": "embedding", "embedding": v, "index": i}
                     for i, v in enumerate(_vectors(emb, fmt == "base64"))],
            "usage": {"prompt_tokens": used, "total_tokens": used}}


# -- cohere (Embed v2) -------------------------------------------------------------------------------------
def _cohere_error(status: int, message: str) -> Answer:
    return Answer(status, {"id": str(uuid.uuid4()), "message": message})


def _cohere(server: FakeEmbeddingServer, headers: Any, body: Any) -> dict[str, Any]:
    auth = headers.get("Authorization") or ""
    if not auth.startswith("Bearer ") or not auth[7:].strip():
        raise _cohere_error(401, "no api key supplied")
    if server.key is not None and auth != f"Bearer {server.key}":
        raise _cohere_error(401, "invalid api token")
    if not isinstance(body, dict):
        raise _cohere_error(400, "invalid request: the body must be a JSON object")
    model, input_type = body.get("model"), body.get("input_type")
    if not isinstance(model, str) or not model:
        raise _cohere_error(400, "invalid request: model must be provided")
    if input_type not in ("search_document", "search_query", "classification", "clustering", "image"):
        raise _cohere_error(400, "invalid request: valid input_type must be provided with the provided model")
    given = [k for k in ("texts", "images", "inputs") if body.get(k) is not None]
    if len(given) != 1:
        raise _cohere_error(400, "invalid request: exactly one of texts, images or inputs must be provided")
    types = body.get("embedding_types") or ["float"]
    if not isinstance(types, list) or not set(types) <= {"float", "int8", "uint8", "binary", "ubinary", "base64"}:
        raise _cohere_error(400, f"invalid request: invalid embedding_types {types}")
    if not set(types) <= {"float", "base64"}:  # a fake's limit, said plainly rather than answered wrongly
        raise _cohere_error(501, "this fake server answers only the float and base64 embedding types")
    items = body[given[0]]
    if given[0] == "inputs":
        raise _cohere_error(501, "this fake server answers texts and images, not inputs")
    if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
        raise _cohere_error(400, f"invalid request: {given[0]} must be a non-empty list of strings")
    meta: dict[str, Any] = {"api_version": {"version": "2"}}
    if given[0] == "texts":
        cap = server.max_batch or 96
        if len(items) > cap:
            raise _cohere_error(400, f"invalid request: total number of texts must be at most {cap} - received "
                                f"{len(items)}")
        emb, described = server.embed("text", items), None
        meta["billed_units"] = {"input_tokens": sum(len(t.split()) for t in items)}
    else:
        v3 = "-v3" in model
        if v3 and len(items) > 1:
            raise _cohere_error(400, "invalid request: only one image is supported per request for this model")
        if sum(len(x) for x in items) > (5 if v3 else 20) * 2**20:
            raise _cohere_error(400, f"invalid request: images exceed the {5 if v3 else 20} MB limit")
        decoded = []
        for x in items:
            try:
                mediatype, image = decode_data_uri(x)
            except ValueError as e:
                raise _cohere_error(400, f"invalid request: image is not a valid base64 data URI ({e})") from None
            if mediatype not in IMAGE_TYPES:
                raise _cohere_error(400, f"invalid request: unsupported image type {mediatype}")
            decoded.append((mediatype, image))
        emb = server.embed("image", [im for _, im in decoded])
        described = [{"width": im.width, "height": im.height, "format": t.split("/")[1], "bit_depth": 8}
                     for t, im in decoded]
        meta["billed_units"] = {"images": len(items)}
    return {"id": str(uuid.uuid4()), "response_type": "embeddings_by_type", "meta": meta,
            "embeddings": {t: _vectors(emb, t == "base64") for t in types},
            "texts": items if given[0] == "texts" else [], **({"images": described} if described else {})}


# -- voyage (multimodal embeddings) ------------------------------------------------------------------------
def _voyage_error(status: int, message: str) -> Answer:
    return Answer(status, {"detail": message})


def _voyage(server: FakeEmbeddingServer, headers: Any, body: Any) -> dict[str, Any]:
    if server.key is None or headers.get("Authorization") != f"Bearer {server.key}":
        raise _voyage_error(401, "Provided API key is invalid.")
    if not isinstance(body, dict):
        raise _voyage_error(400, "Request body must be a JSON object.")
    inputs, model = body.get("inputs"), body.get("model")
    if not isinstance(model, str) or not model:
        raise _voyage_error(400, "Field 'model' is required.")
    if body.get("input_type") not in (None, "query", "document"):
        raise _voyage_error(400, "Value of 'input_type' must be one of None, 'query', 'document'.")
    fmt = body.get("output_encoding", body.get("encoding_format"))
    if fmt not in (None, "base64"):
        raise _voyage_error(400, "Value of 'output_encoding' must be None or 'base64'.")
    cap = server.max_batch or 1000
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= cap:
        raise _voyage_error(400, f"The batch size limit is {cap}: 'inputs' must hold 1 to {cap} inputs.")
    kinds, rows, pixels, words = set(), [], 0, 0
    for n, entry in enumerate(inputs):
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, list) or not content:
            raise _voyage_error(400, f"inputs[{n}].content must be a non-empty list.")
        parts: list[np.ndarray] = []
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            kinds.add(kind)
            if kind == "text" and isinstance(item.get("text"), str):
                words += len(item["text"].split())
                parts.append(server.embed("text", [item["text"]])[0])
            elif kind == "image_base64" and isinstance(item.get("image_base64"), str):
                try:
                    mediatype, image = decode_data_uri(item["image_base64"])
                except ValueError as e:
                    raise _voyage_error(400, f"inputs[{n}]: image_base64 must be a valid data URL ({e}).") from None
                if mediatype not in IMAGE_TYPES or image.width * image.height > 16_000_000:
                    raise _voyage_error(400, f"inputs[{n}]: images must be PNG, JPEG, WEBP or GIF of at most "
                                        "16 million pixels.")
                pixels += image.width * image.height
                parts.append(server.embed("image", [image])[0])
            elif kind == "image_url":
                raise _voyage_error(400, f"inputs[{n}]: the image URL could not be fetched.")  # offline
            else:
                raise _voyage_error(400, f"inputs[{n}]: content items are text, image_url or image_base64.")
        fused = np.mean(parts, axis=0)
        rows.append(fused / max(float(np.linalg.norm(fused)), 1e-12))
    if {"image_url", "image_base64"} <= kinds:
        raise _voyage_error(400, "A request may use image_url or image_base64, not both.")
    tokens = words + pixels // 560
    if tokens > 320_000:
        raise _voyage_error(400, f"The request has {tokens} tokens, over the limit of 320000.")
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "embedding": v, "index": i}
                     for i, v in enumerate(_vectors(np.stack(rows), fmt == "base64"))],
            "usage": {"text_tokens": words, "image_pixels": pixels, "video_pixels": 0, "total_tokens": tokens}}


Handler = Callable[[FakeEmbeddingServer, Any, Any], dict[str, Any]]
HANDLERS: dict[str, tuple[str, Handler, Callable[[int, str], Answer], int]] = {
    # protocol: (route, handler, error in the protocol's shape, status for a body that is not JSON)
    "openai-embeddings": ("/embeddings", _openai, _infinity_error, 422),
    "cohere": ("/v2/embed", _cohere, _cohere_error, 400),
    "voyage": ("/v1/multimodalembeddings", _voyage, _voyage_error, 400),
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeEmbeddingServer

    def _reply(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.server.protocol == "openai-embeddings" and self.path == "/health":
            self._reply(200, {"unix": time.time()})
        elif self.server.protocol == "openai-embeddings" and self.path == "/models":
            self._reply(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                          "owned_by": "infinity", "created": int(time.time())}]})
        else:
            self._reply(404, {"detail": "Not Found"})

    def do_POST(self) -> None:  # noqa: N802
        route, handle, error, not_json = HANDLERS[self.server.protocol]
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != route:
            self._reply(404, {"detail": "Not Found"} if self.server.protocol != "cohere" else
                        {"id": str(uuid.uuid4()), "message": f"no route {self.path}"})
            return
        self.server.count()
        try:
            with self.server._lock:
                fault = self.server.faults.pop(0) if self.server.faults else None
            if fault is not None:
                e = error(fault, "rate limited, slow down" if fault == 429 else "the service is unavailable")
                raise Answer(fault, e.body, {"Retry-After": "0"} if fault == 429 else {})
            try:
                body = json.loads(raw)
            except ValueError:
                raise (_unprocessable("", "JSON decode error", "json_invalid") if not_json == 422
                       else error(400, "invalid request: the body is not valid JSON")) from None
            payload = handle(self.server, self.headers, body)
        except Answer as a:
            self._reply(a.status, a.body, a.headers)
            return
        except Exception as e:  # the model failed: the protocol's 500, as the real service would answer
            self._reply(500, error(500, f"InternalServerError: {type(e).__name__}: {e}").body)
            return
        self.server.count(ok=True)
        self._reply(200, payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass
