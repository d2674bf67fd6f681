"""Connections and load the server can survive: request-head deadlines, a connection cap, an in-flight bound.

uvicorn's HTTP/1.1 protocol times out a connection only once it has answered a request on it, so a socket that
connects and sends nothing (or one byte a second) holds its place forever; and its ``limit_concurrency`` counts
those sockets, so about a thousand of them turned every request, ``/healthz`` included, into a plain-text 503.
Here instead:

- :class:`GuardedH11Protocol` gives every request head (request line and headers) ``HEAD_TIMEOUT_S`` from the
  moment the connection opens or the previous answer is sent; a head not complete by then closes the socket.
  Past ``MAX_CONNECTIONS`` open sockets, a new one makes room by closing the socket that has waited longest
  without sending a complete head (what an attacker holds), never one with a request in progress.
- :class:`InFlightLimit` bounds the requests being handled (not the sockets) and answers the excess with the
  server's JSON error, 503 and ``Retry-After``; health, readiness and metrics are always answered.

Body reads have their own deadline (:func:`craft_adapter.serve.server.inputs.read_body`).
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 4096
ALWAYS_ANSWERED = frozenset({"/healthz", "/readyz", "/metrics"})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on every request head and a cap on open sockets."""

    head_timeout_s = HEAD_TIMEOUT_S
    max_connections = MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        """Accept the socket (making room if over the cap) and start its head deadline."""
        super().connection_made(transport)  # type: ignore[arg-type]
        self._head_timer: asyncio.TimerHandle | None = None
        self._waiting_since = time.monotonic()
        self._arm()
        if len(self.connections) > self.max_connections:
            _close_longest_waiting(self.connections, keep=self)

    def data_received(self, data: bytes) -> None:
        """Feed uvicorn; once a request head is complete, its deadline is off."""
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()

    def on_response_complete(self) -> None:
        """The answer is sent: the next request head gets a fresh deadline."""
        super().on_response_complete()
        if not self.transport.is_closing():
            self._waiting_since = time.monotonic()
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the socket and its timer."""
        self._disarm()
        super().connection_lost(exc)

    def waiting_for_head(self) -> bool:
        """True while this socket has no request in progress (between requests, or before its first)."""
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        if self.waiting_for_head() and not self.transport.is_closing():
            self.transport.close()


def _close_longest_waiting(connections: set[Any], keep: Any) -> None:
    idle = [c for c in connections if c is not keep and isinstance(c, GuardedH11Protocol) and c.waiting_for_head()
            and not c.transport.is_closing()]
    if idle:
        min(idle, key=lambda c: c._waiting_since).transport.close()


class InFlightLimit:
    """At most ``limit`` requests handled at once; the rest get a JSON 503 with ``Retry-After`` (health excepted)."""

    def __init__(self, app: ASGIApp, limit: int, retry_after_s: int = 1) -> None:
        self.app, self.limit, self.retry_after_s = app, limit, retry_after_s
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle the request, or refuse it when the server is full."""
        if scope["type"] != "http" or scope["path"] in ALWAYS_ANSWERED:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            body = json.dumps({"error": f"the server is handling its limit of {self.limit} requests; retry "
                               "shortly", "type": "overloaded"}).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(self.retry_after_s).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def raise_open_file_limit() -> int:
    """Raise this process's open-file limit to its hard limit (sockets are files); return the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
