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
429/5xx answers in each protocol's error shape, for retry tests. The per-protocol request handlers live in
:mod:`craft_adapter.testing.fake_embedding_protocols`; this module is the HTTP server around them.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from craft_adapter.testing.fake_embedding_protocols import HANDLERS, Answer, unprocessable
from craft_adapter.vendors.protocols import EmbeddingBackend


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
                raise (unprocessable("", "JSON decode error", "json_invalid") if not_json == 422
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
