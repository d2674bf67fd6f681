"""Connections and load the server can survive: request-head deadlines, a connection cap, an in-flight bound.

uvicorn's HTTP/1.1 protocol times out a connection only once it has answered a request on it, so a socket that
connects and sends nothing (or one byte a second) holds its place forever; and its ``limit_concurrency`` counts
those sockets, so about a thousand of them turned every request, ``/healthz`` included, into a plain-text 503.
Here instead:

- :class:`GuardedH11Protocol`, and :class:`GuardedHttpToolsProtocol` (the same guard on uvicorn's C parser, used
  when ``httptools`` is installed: :func:`guarded_protocol`), give every request head (request line and headers)
  ``HEAD_TIMEOUT_S`` (plus up to 20% jitter) from the moment the connection opens or the previous answer is sent;
  a head not complete by then closes the socket.
  Past ``MAX_CONNECTIONS`` open sockets, a new one makes room by closing the socket that has waited longest
  without sending a complete head (what an attacker holds), never one with a request in progress.
- :class:`InFlightLimit` bounds the requests being handled (not the sockets) and answers the excess with the
  server's JSON error, 503 and ``Retry-After``; health, readiness and metrics are always answered.
- It also bounds the memory that request bodies take, all requests together (:data:`BODY_BUDGET_BYTES`): a body
  is buffered, copied, parsed and base64-decoded, about ``BODY_COPIES`` times its size, for as long as its request
  runs, so a thousand in-flight requests of 16 MB each would need gigabytes. Each chunk is charged as it
  arrives, not by its declared length (a slow body declaring 16 MB would otherwise hold 64 MB for 30 s at no
  cost to its sender), and a request ends with its charge given back. A chunk that does not fit is a JSON 503
  with ``Retry-After`` at once: waiting instead could wedge the budget with half-read bodies.

Body reads have their own deadline (:func:`craft_adapter.serve.server.inputs.read_body`).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import random
import resource
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

try:  # uvicorn's C-parser protocol: the ``server`` extra installs httptools, a bare uvicorn may lack it
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - exercised only without httptools
    HttpToolsProtocol = None

from craft_adapter.serve.server.corked_transport import CorkedTransport
from craft_adapter.serve.server.inputs import ApiError

HEAD_TIMEOUT_S = 10.0
HEAD_TIMEOUT_JITTER = 0.2  # a head deadline is HEAD_TIMEOUT_S to 1.2 x that
BODY_BUDGET_BYTES = 128 << 20
MMAP_THRESHOLD_BYTES = 1 << 20
BODY_COPIES = 4  # the read buffer and its bytes, the parsed JSON string and its base64-decoded bytes
MAX_CONNECTIONS = 4096
ALWAYS_ANSWERED = frozenset({"/healthz", "/readyz", "/metrics"})


class _HeadGuard:
    """A deadline on every request head and a cap on open sockets, for either of uvicorn's HTTP/1.1 protocols.

    Both keep the request in progress in ``self.cycle`` and call ``on_response_complete`` once it is answered.
    """

    head_timeout_s = HEAD_TIMEOUT_S
    max_connections = MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        """Accept the socket (making room if over the cap) and start its head deadline."""
        super().connection_made(CorkedTransport(transport, self.loop))  # type: ignore[arg-type]
        self._head_timer: asyncio.TimerHandle | None = None
        self._waiting = _waiting_heads(self.server_state)
        self._waiting_since = time.monotonic()
        self._arm()
        if len(self.connections) > self.max_connections:
            _close_longest_waiting(self._waiting, keep=self)

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
        # jittered: sockets opened together (a flood) time out spread over a while, not in one burst of closes
        # that holds the event loop (2,000 at once took about 100 ms, and /healthz waited behind them)
        delay = self.head_timeout_s * (1.0 + HEAD_TIMEOUT_JITTER * random.random())  # noqa: S311 (not a secret)
        self._head_timer = self.loop.call_later(delay, self._head_timed_out)
        self._waiting[self] = None  # now the newest waiter

    def _disarm(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None
        waiting = getattr(self, "_waiting", None)
        if waiting is not None:
            waiting.pop(self, None)

    def _head_timed_out(self) -> None:
        if self.waiting_for_head() and not self.transport.is_closing():
            self.transport.close()


class GuardedH11Protocol(_HeadGuard, H11Protocol):
    """uvicorn's pure-Python HTTP/1.1 protocol (h11), guarded."""


if HttpToolsProtocol is not None:
    class GuardedHttpToolsProtocol(_HeadGuard, HttpToolsProtocol):
        """uvicorn's httptools (C parser) HTTP/1.1 protocol, guarded."""
else:  # pragma: no cover - exercised only without httptools
    GuardedHttpToolsProtocol = None


def guarded_protocol() -> type:
    """The guarded protocol class to serve with: httptools' when it is installed (about 6% less server CPU a
    request than h11's in the soak A/B)."""
    return GuardedHttpToolsProtocol or GuardedH11Protocol


def _waiting_heads(server_state: Any) -> dict[_HeadGuard, None]:
    """The server's sockets that wait for a request head, oldest first (a dict keeps insertion order)."""
    waiting = getattr(server_state, "waiting_heads", None)
    if waiting is None:
        waiting = server_state.waiting_heads = {}
    return waiting


def _close_longest_waiting(waiting: dict[_HeadGuard, None], keep: _HeadGuard) -> None:
    # the oldest waiter is first: no scan of every socket per connection past the cap (that was quadratic, and
    # at a 4,096 cap each new socket of a flood held the event loop for milliseconds)
    for c in waiting:
        if c is not keep and not c.transport.is_closing():
            c.transport.close()
            return


class ByteBudget:
    """Bytes in use, bounded; a reservation that does not fit is refused at once, so nothing ever waits on it."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.in_use = capacity, 0

    def try_reserve(self, n: int) -> bool:
        """Take ``n`` bytes if they fit."""
        if self.in_use + n > self.capacity:
            return False
        self.in_use += n
        return True

    def release(self, n: int) -> None:
        """Give ``n`` bytes back."""
        self.in_use -= n


class InFlightLimit:
    """At most ``limit`` requests handled at once, their bodies within ``body_budget``; the rest get a JSON 503
    with ``Retry-After`` (health excepted)."""

    def __init__(self, app: ASGIApp, limit: int, retry_after_s: int = 1, body_budget: ByteBudget | None = None) -> None:
        self.app, self.limit, self.retry_after_s = app, limit, retry_after_s
        self.body_budget = body_budget or ByteBudget(BODY_BUDGET_BYTES)
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
        held = [0]
        try:
            await self.app(scope, self._budgeted(receive, held), send)
        finally:
            self.in_flight -= 1
            if held[0]:
                self.body_budget.release(held[0])

    def _budgeted(self, receive: Receive, held: list[int]) -> Receive:
        """``receive``, charging each body chunk to the budget as it arrives (503 once the budget is full)."""
        async def counted() -> Message:
            message = await receive()
            need = BODY_COPIES * len(message.get("body", b""))
            if need:
                if not self.body_budget.try_reserve(need):
                    raise ApiError(503, "busy", "the server holds its limit of request bodies in memory; retry "
                                   "shortly", {"Retry-After": str(self.retry_after_s)})
                held[0] += need
            return message

        return counted


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


def return_big_frees() -> None:
    """Have glibc serve allocations of 1 MB and more from their own mappings, so freeing one returns it at once.

    By default glibc raises that threshold as big blocks are freed, after which decoded images, bodies and their
    copies come from the heap and per-thread arenas, which keep freed memory: after a burst of bombs the server
    stayed hundreds of MB above its working set. A no-op where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return
    if mallopt is not None:
        mallopt(-3, MMAP_THRESHOLD_BYTES)  # M_MMAP_THRESHOLD, fixed: no more dynamic raising
