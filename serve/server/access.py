"""ASGI middleware: request id, in-flight gauge, request count and latency by endpoint, and the JSON access log."""

from __future__ import annotations

import itertools
import logging
import os
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from craft_adapter.serve.server.logs import ACCESS_LOGGER
from craft_adapter.serve.server.metrics import ServerMetrics

# fixed endpoint names keep the metrics' label sets small whatever paths clients try
ENDPOINTS = {("POST", "/"): "hf_zero_shot", ("POST", "/zero-shot-image-classification"): "hf_zero_shot",
             ("POST", "/v1/classify"): "classify", ("POST", "/v1/classify/batch"): "classify_batch",
             ("GET", "/"): "info", ("GET", "/v1/info"): "info", ("GET", "/healthz"): "healthz",
             ("GET", "/readyz"): "readyz", ("GET", "/metrics"): "metrics"}


def endpoint_name(method: str, path: str) -> str:
    """The metrics label for a request: a known endpoint's name, else ``other``."""
    return ENDPOINTS.get((method, path), "other")


def _declared_length(headers: dict[bytes, bytes]) -> int | None:
    length = headers.get(b"content-length", b"0")
    return int(length) if length.isdigit() else None


class AccessMiddleware:
    """Counts, times and logs every HTTP request; the handler may put ``error_type`` in ``request.state``."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, access_log: bool = True) -> None:
        self.app, self.metrics, self.access_log = app, metrics, access_log
        self.logger = logging.getLogger(ACCESS_LOGGER)
        # request ids: 32 hex digits, random per process then counted (a uuid4 cost a system call per request)
        self._id_prefix, self._ids = os.urandom(8).hex(), itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request through the app, measuring it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")
        if not (0 < len(request_id) <= 64 and request_id.isprintable()):  # else the client's own id is kept
            request_id = f"{self._id_prefix}{next(self._ids):016x}"
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        reply = {"status": 500, "bytes": 0}

        async def send_measured(message: Message) -> None:
            if message["type"] == "http.response.start":
                reply["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body":
                reply["bytes"] += len(message.get("body", b""))
            await send(message)

        self.metrics.in_flight.add(1)
        try:
            await self.app(scope, receive, send_measured)
        finally:
            self.metrics.in_flight.add(-1)
            elapsed = time.perf_counter() - started
            endpoint = endpoint_name(scope["method"], scope["path"])
            self.metrics.requests.inc(endpoint, str(reply["status"]))
            self.metrics.latency.observe(elapsed, endpoint)
            if self.access_log:
                client = scope.get("client")
                fields = {"event": "request", "request_id": request_id, "method": scope["method"],
                          "path": scope["path"], "endpoint": endpoint, "status": reply["status"],
                          "duration_ms": round(elapsed * 1000, 3), "response_bytes": reply["bytes"],
                          "request_bytes": _declared_length(headers),
                          "client": f"{client[0]}:{client[1]}" if client else None}
                if state.get("error_type"):
                    fields["error_type"] = state["error_type"]
                if state.get("images"):
                    fields["images"] = state["images"]
                self.logger.info("%s %s %s", scope["method"], scope["path"], reply["status"],
                                 extra={"fields": fields})
