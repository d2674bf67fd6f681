"""A local vendor: any in-process embedding backend (an open_clip model) served over HTTP, for rehearsal and tests.

Endpoints, all JSON:

- ``POST /`` (also ``/zero-shot-image-classification``): the Hugging Face zero-shot-image-classification
  protocol. Request ``{"inputs": <base64 image>, "parameters": {"candidate_labels": [...],
  "hypothesis_template": "..."}}``; answer ``[{"label": ..., "score": ...}, ...]``, best first, where the scores
  are ``softmax(logit_scale * cos(image, template.format(label)))`` over the candidate labels. The template
  defaults to Hugging Face's ``"This is a photo of {}."``.
- ``POST /embed/images`` ``{"inputs": [<base64 image>, ...]}`` and ``POST /embed/texts`` ``{"inputs": [text,
  ...]}``: answer ``{"embeddings": [[...], ...]}``, L2-normalised.
- ``GET /info``: the model's identity, ``logit_scale`` and ``embed_dim``.
- ``GET /stats``: ``{"calls": {"zero_shot": n, "embed_images": n, "embed_texts": n}}``, the POST requests received
  per endpoint since start, counted on arrival (answered or not), so a test can count what a client paid for.

Errors answer ``{"error": message}`` with status 400, 404, 413 or 500. Binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import socket
import threading
from collections import OrderedDict
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from craft_adapter.vendors.protocols import EmbeddingBackend, fill
from craft_adapter.vendors.replies import read_zero_shot_request, zero_shot_reply

MAX_BODY_BYTES = 32 << 20
MAX_INPUTS = 4096
TEXT_CACHE_SIZE = 64
IDLE_TIMEOUT_S = 60
ENDPOINTS = {"/": "zero_shot", "/zero-shot-image-classification": "zero_shot", "/embed/images": "embed_images",
             "/embed/texts": "embed_texts"}


class RequestError(ValueError):
    """A client sent something this vendor cannot answer; becomes HTTP 400."""


class UnknownEndpoint(LookupError):
    """No endpoint at this path; becomes HTTP 404."""


def decode_image(data: Any) -> Image.Image:
    """A PIL image from base64 (optionally a ``data:`` URI), fully loaded."""
    if not isinstance(data, str):
        raise RequestError("an image must be a base64 string")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as im:
            im.load()
            return im.copy()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as e:
        raise RequestError(f"cannot decode the image: {e}") from None


class VendorService:
    """The answers, independent of HTTP. One request at a time reaches the backend."""

    def __init__(self, backend: EmbeddingBackend) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        self._texts: OrderedDict[tuple[str, ...], np.ndarray] = OrderedDict()  # prompts -> [c, d]

    def info(self) -> dict[str, Any]:
        """Identity, logit scale and embedding width."""
        return {"model": self.backend.identity, "logit_scale": float(self.backend.logit_scale),
                "embed_dim": int(self.embed_texts(["x"]).shape[1]),
                "endpoints": {"zero_shot": "POST /", "embed_images": "POST /embed/images",
                              "embed_texts": "POST /embed/texts"}}

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Image embeddings ``[n, d]``."""
        with self._lock:
            return self.backend.embed_images(list(images))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text embeddings ``[t, d]``, cached by prompt list (fit sends one prompt for many images)."""
        key = tuple(texts)
        with self._lock:
            if key not in self._texts:
                self._texts[key] = self.backend.embed_texts(list(texts))
                while len(self._texts) > TEXT_CACHE_SIZE:
                    self._texts.popitem(last=False)
            self._texts.move_to_end(key)
            return self._texts[key]

    def zero_shot(self, image: Image.Image, labels: list[str], template: str) -> list[dict[str, Any]]:
        """Hugging Face zero-shot answer: softmax over the labels, best first."""
        text = self.embed_texts([fill(template, label) for label in labels])  # [c, d]
        logits = self.backend.logit_scale * (self.embed_images([image]) @ text.T)[0]  # [c]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        return zero_shot_reply(labels, probs)

    def handle(self, path: str, body: Any) -> Any:
        """The JSON answer to a POST of ``body`` to ``path``; raises RequestError or UnknownEndpoint."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        if path in ("/", "/zero-shot-image-classification"):
            try:
                request = read_zero_shot_request(body)
            except ValueError as e:
                raise RequestError(str(e)) from None
            if len(request.labels) > MAX_INPUTS:
                raise RequestError(f"candidate_labels must be at most {MAX_INPUTS}")
            return self.zero_shot(decode_image(request.image_b64), request.labels, request.template)
        if path in ("/embed/images", "/embed/texts"):
            inputs = body.get("inputs")
            if not isinstance(inputs, list) or not inputs or len(inputs) > MAX_INPUTS:
                raise RequestError(f"inputs must be a non-empty list of at most {MAX_INPUTS} items")
            if path == "/embed/images":
                emb = self.embed_images([decode_image(x) for x in inputs])
            elif all(isinstance(x, str) for x in inputs):
                emb = self.embed_texts(inputs)
            else:
                raise RequestError("text inputs must be strings")
            return {"embeddings": emb.astype(np.float32).tolist()}
        raise UnknownEndpoint(path)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a fit sends thousands of small requests
    timeout = IDLE_TIMEOUT_S  # an idle keep-alive connection gives its thread back
    disable_nagle_algorithm = True  # headers and body go out as two writes; Nagle would hold the body ~40 ms
    server: VendorHTTPServer

    def _reply(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") in ("/info", "/health"):
            self._reply(200, self.server.service.info())
        elif self.path.rstrip("/") == "/stats":
            self._reply(200, {"calls": self.server.call_counts()})
        else:
            self._reply(404, {"error": f"no GET endpoint {self.path}; try GET /info or /stats"})

    def do_POST(self) -> None:  # noqa: N802
        self.server.count_call(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read, so the connection cannot be reused
            self._reply(413, {"error": f"request body over {MAX_BODY_BYTES} bytes"})
            return
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            self._reply(400, {"error": "the body must be JSON: {\"inputs\": <base64 image>, \"parameters\": "
                                       "{\"candidate_labels\": [...]}} (raw image bytes carry no labels)"})
            return
        try:
            self._reply(200, self.server.service.handle(self.path, body))
        except RequestError as e:
            self._reply(400, {"error": str(e)})
        except UnknownEndpoint:
            self._reply(404, {"error": f"no POST endpoint {self.path}; use /, /embed/images or /embed/texts"})
        except Exception as e:  # the model failed; say so rather than drop the connection
            self._reply(500, {"error": f"{type(e).__name__}: {e}"})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.verbose:
            super().log_message(format, *args)


class VendorHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server around a :class:`VendorService`; closing it also ends open keep-alive connections."""

    daemon_threads = True
    request_queue_size = 128  # the stdlib default of 5 resets connections when a fit sends bursts of calls

    def __init__(self, service: VendorService, host: str = "127.0.0.1", port: int = 0,
                 verbose: bool = False) -> None:
        self.service, self.verbose = service, verbose
        self.calls: dict[str, int] = dict.fromkeys(("zero_shot", "embed_images", "embed_texts"), 0)
        self._calls_lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._connections_lock = threading.Lock()
        super().__init__((host, port), _Handler)

    def count_call(self, path: str) -> None:
        """Count one POST to ``path`` if it names an endpoint (on arrival, before it is answered)."""
        if (endpoint := ENDPOINTS.get(path)) is not None:
            with self._calls_lock:
                self.calls[endpoint] += 1

    def call_counts(self) -> dict[str, int]:
        """A consistent copy of :attr:`calls`: POST requests received per endpoint."""
        with self._calls_lock:
            return dict(self.calls)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        """Handle one connection, remembering it so :meth:`server_close` can end it."""
        with self._connections_lock:
            self._connections[request] = threading.current_thread()
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.pop(request, None)

    def server_close(self) -> None:
        """Stop listening, end open connections, and wait for their threads.

        A thread left waiting on an idle keep-alive connection would still hold the model's thread-local state
        when the interpreter exits, which can abort the process.
        """
        super().server_close()
        with self._connections_lock:
            open_connections = list(self._connections.items())
        for sock, _ in open_connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for _, thread in open_connections:
            thread.join(timeout=5)

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8080``."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_vendor_server(backend: EmbeddingBackend, host: str = "127.0.0.1", port: int = 0,
                       verbose: bool = False) -> VendorHTTPServer:
    """A bound (not yet serving) vendor server for ``backend``; port 0 picks a free port."""
    return VendorHTTPServer(VendorService(backend), host, port, verbose)


def serve_in_thread(server: VendorHTTPServer) -> threading.Thread:
    """Serve in a daemon thread (tests, notebooks); stop with ``server.shutdown()``."""
    thread = threading.Thread(target=server.serve_forever, name="craft-vendor", daemon=True)
    thread.start()
    return thread
