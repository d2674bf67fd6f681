"""A stand-in zero-shot vendor with configurable latency and faults, for rehearsing a deployment (and for tests).

It speaks the Hugging Face zero-shot protocol (``POST /``) like a real vendor, with made-up but deterministic
scores: :func:`stub_probabilities` derives each label's logit from a hash of the image and the label, so the
answer a client should get can be computed independently. ``GET /stats`` reports the calls it saw.

Given an ``upstream`` URL (a real zero-shot endpoint) it is instead a fault-injecting proxy: every call that needs
a real answer (``ok``, ``timeout`` once it has hung, and the kinds that damage an answer) forwards the request body
unchanged to the upstream and starts from the upstream's answer. An upstream that fails passes its status and body
through (counted in ``upstream_errors``).

Faults, applied per call: first any scripted in :attr:`StubVendor.script` (in order), else with probability
``fault_rate`` one drawn from ``fault_kinds`` by a seeded generator. Kinds:

- ``timeout``: sleep ``hang_s`` before answering normally (the caller should have given up);
- ``500``, ``503``, ``408``, ``425``, ``400``: that HTTP status; ``429``: HTTP 429 with ``Retry-After: retry_after``
  (seconds, or an HTTP date);
- ``malformed``: a 200 whose body is not complete JSON; ``truncated``: a 200 that promises more bytes than it
  sends, then closes the connection;
- ``wrong_labels``: a well-formed answer with one label renamed; ``missing_label``: one label left out;
- ``not_probabilities``: every score doubled; ``nan``: one score NaN (JSON ``NaN``, as Python's json writes it);
- ``401``: HTTP 401 whose body echoes the ``Authorization`` header, as careless APIs do (a leak test).

Hostile kinds (:mod:`craft_adapter.testing.hostile_replies`), to test the reply contract of
:mod:`craft_adapter.vendors.http_limits` and the scrubbing of :mod:`craft_adapter.vendors.credentials`:

- ``redirect``: HTTP ``redirect_status`` (302) to ``redirect_to``; ``gzip_bomb``: a gzip body inflating to
  ``bomb_mb`` MB; ``endless``: a 200 streaming ``bomb_mb`` MB; ``echo``: a 401 echoing the key in
  ``echo_encoding`` after ``echo_pad`` filler characters.

``scores="sigmoid"`` makes the stub answer independent per-label probabilities (SigLIP-style) instead of a softmax.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from craft_adapter.testing import hostile_replies
from craft_adapter.vendors.replies import read_zero_shot_request, zero_shot_reply

FAULT_KINDS = ("timeout", "500", "429", "malformed", "wrong_labels")
HOSTILE_KINDS = ("redirect", "gzip_bomb", "endless", "echo")
ALL_FAULT_KINDS = (*FAULT_KINDS, "503", "truncated", "missing_label", "not_probabilities", "nan", "401",
                   *HOSTILE_KINDS)
STATUS_KINDS = ("400", "408", "425")  # scripted only: plain statuses, to pin which ones a client retries
UPSTREAM_TIMEOUT_S = 120.0


def stub_probabilities(image_b64: str, labels: list[str], scores: str = "softmax") -> np.ndarray:
    """The stub's answer ``[c]`` for an image (as sent, base64) and labels: softmax of hash-derived logits, or with
    ``scores="sigmoid"`` an independent sigmoid of each (shifted so that most are well below 1/2)."""
    image_hash = hashlib.sha256(image_b64.encode()).digest()
    logits = np.array([int.from_bytes(hashlib.sha256(image_hash + label.encode()).digest()[:4], "little")
                       for label in labels], dtype=np.float64) / 2**32 * 8.0  # [c], in [0, 8)
    if scores == "sigmoid":
        return 1.0 / (1.0 + np.exp(-(logits - 6.0)))
    p = np.exp(logits - logits.max())
    return p / p.sum()


class StubVendor(ThreadingHTTPServer):
    """The stub vendor server; set ``latency_s``, ``fault_rate``, ``script`` etc. at any time, even while serving."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # socketserver's default of 5 drops bursts of new connections (1 s SYN retries)

    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency_s: float = 0.0, fault_rate: float = 0.0,
                 fault_kinds: tuple[str, ...] = FAULT_KINDS, hang_s: float = 2.0, retry_after: str | float = "1",
                 seed: int = 0, upstream: str | None = None) -> None:
        super().__init__((host, port), _Handler)
        self.latency_s, self.fault_rate, self.fault_kinds = latency_s, fault_rate, tuple(fault_kinds)
        self.hang_s, self.retry_after = hang_s, str(retry_after)  # Retry-After may be fractional, e.g. "0.2"
        self.upstream = upstream
        self.scores = "softmax"  # or "sigmoid"
        self.redirect_to, self.redirect_status = "http://127.0.0.1:9/", 302  # the hostile kinds' settings
        self.bomb_mb, self.echo_encoding, self.echo_pad = 600, "raw", 0
        self.script: list[str] = []
        self.calls: Counter[str] = Counter()  # by what was answered: ok or the fault kind
        self.upstream_errors = 0  # forwarded calls the upstream failed (its status passed through)
        self.last_headers: dict[str, str] = {}
        self.last_body = b""  # the last request body, as sent
        self.in_flight = self.max_in_flight = 0  # calls being answered now, and the most ever at once
        self._lock = threading.Lock()
        self._random = random.Random(seed)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet when a caller hung up first (it gave up on a slow answer, as it should)."""

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8080``."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def next_fault(self) -> str:
        """The behaviour for the next call: a scripted fault, a random one, or ``ok``."""
        with self._lock:
            if self.script:
                kind = self.script.pop(0)
            elif self.fault_rate > 0 and self._random.random() < self.fault_rate:
                kind = self._random.choice(self.fault_kinds)
            else:
                kind = "ok"
            self.calls[kind] += 1
            return kind

    def stats(self) -> dict[str, Any]:
        """What ``GET /stats`` answers: calls by outcome, and upstream failures when proxying."""
        with self._lock:
            stats: dict[str, Any] = {"calls": dict(self.calls)}
            if self.upstream:
                stats["upstream_errors"] = self.upstream_errors
            return stats


class _Upstream:
    """One keep-alive connection to the upstream endpoint, per handler thread (one per client connection)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._conn = cls(parts.hostname or "127.0.0.1", parts.port, timeout=UPSTREAM_TIMEOUT_S)

    def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """POST ``body`` upstream; the status and body of the answer (one reconnect if the connection went stale)."""
        for attempt in range(2):
            try:
                self._conn.request("POST", self.path, body, headers)
                response = self._conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: StubVendor

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._send(200, json.dumps(self.server.stats()).encode())

    def do_POST(self) -> None:  # noqa: N802
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.last_headers, self.server.last_body = dict(self.headers.items()), raw
        with self.server._lock:
            self.server.in_flight += 1
            self.server.max_in_flight = max(self.server.max_in_flight, self.server.in_flight)
        try:
            self._answer(raw)
        finally:
            with self.server._lock:
                self.server.in_flight -= 1

    def _answer(self, raw: bytes) -> None:
        kind = self.server.next_fault()
        if self.server.latency_s > 0:
            time.sleep(self.server.latency_s)
        if kind in HOSTILE_KINDS:  # before the request is read: any client, any protocol, meets them
            self._hostile(kind)
            return
        request = None
        if not self.server.upstream:  # a proxy forwards the body as it came; the upstream judges it
            try:
                request = read_zero_shot_request(json.loads(raw))  # the request rule every client follows
            except ValueError as e:  # not JSON, or not a zero-shot request
                self._send(400, json.dumps({"error": str(e)}).encode())
                return
        if kind == "timeout":
            time.sleep(self.server.hang_s)
        elif kind in ("500", "503", *STATUS_KINDS):
            self._send(int(kind), b'{"error": "internal vendor failure"}')
            return
        elif kind == "401":
            echoed = json.dumps({"error": f"invalid credentials {self.headers.get('Authorization', '')}"})
            self._send(401, echoed.encode())
            return
        elif kind == "429":
            self._send(429, b'{"error": "rate limited"}', {"Retry-After": self.server.retry_after})
            return
        if self.server.upstream:
            status, upstream_body = self._forward(raw)
            if status != 200:
                self._send(status, upstream_body)
                return
            if kind in ("ok", "timeout"):  # the answer as the upstream gave it, byte for byte
                self._send(200, upstream_body)
                return
            try:
                answer: list[dict[str, Any]] = json.loads(upstream_body)
            except ValueError:
                self._send(502, b'{"error": "the upstream did not answer JSON"}')
                return
        else:
            labels = request.labels  # type: ignore[union-attr] (read above whenever there is no upstream)
            answer = zero_shot_reply(labels, stub_probabilities(request.image_b64, labels,  # type: ignore[union-attr]
                                                                self.server.scores))
        if kind == "wrong_labels":
            answer[-1]["label"] = answer[-1]["label"] + " (renamed)"
        elif kind == "missing_label":
            answer = answer[:-1]
        elif kind == "not_probabilities":
            answer = [{**e, "score": 2 * e["score"]} for e in answer]
        elif kind == "nan":
            answer[0] = {**answer[0], "score": float("nan")}
        data = json.dumps(answer).encode()
        if kind == "malformed":
            self._send(200, data[: len(data) // 2])
        elif kind == "truncated":
            self.close_connection = True
            self._send(200, data[: len(data) // 2], length=len(data))
        else:
            self._send(200, data)

    def _hostile(self, kind: str) -> None:
        server = self.server
        if kind == "redirect":
            hostile_replies.send_redirect(self, server.redirect_status, server.redirect_to)
        elif kind == "gzip_bomb":
            hostile_replies.send_gzip_bomb(self, server.bomb_mb)
        elif kind == "endless":
            hostile_replies.send_endless(self, server.bomb_mb)
        else:
            hostile_replies.send_echo(self, server.echo_encoding, server.echo_pad)

    def _forward(self, raw: bytes) -> tuple[int, bytes]:
        """The upstream's status and body for this request body; a failure to reach it is a 502."""
        if getattr(self, "_upstream", None) is None:
            self._upstream = _Upstream(self.server.upstream)
        headers = {"Content-Type": "application/json"}
        if auth := self.headers.get("Authorization"):
            headers["Authorization"] = auth
        try:
            status, body = self._upstream.post(raw, headers)
        except (OSError, http.client.HTTPException) as e:
            self._upstream.close()
            status, body = 502, json.dumps({"error": f"upstream unreachable: {type(e).__name__}: {e}"}).encode()
        if status != 200:
            with self.server._lock:
                self.server.upstream_errors += 1
        return status, body

    def finish(self) -> None:
        """Close the upstream connection with the client's."""
        try:
            super().finish()
        finally:
            if getattr(self, "_upstream", None) is not None:
                self._upstream.close()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def serve_stub_in_thread(stub: StubVendor) -> threading.Thread:
    """Serve ``stub`` in a daemon thread; stop with ``stub.shutdown(); stub.server_close()``."""
    thread = threading.Thread(target=stub.serve_forever, name="stub-vendor", daemon=True)
    thread.start()
    return thread


@contextmanager
def running_stub(**settings: Any) -> Iterator[StubVendor]:
    """A :class:`StubVendor` with ``settings`` served in a thread on loopback, shut down and closed after."""
    stub = StubVendor(**settings)
    serve_stub_in_thread(stub)
    try:
        yield stub
    finally:
        stub.shutdown()
        stub.server_close()


def main(argv: list[str] | None = None) -> None:
    """``python -m craft_adapter.testing.stub_vendor --port P --latency S --fault-rate R``: serve until killed."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to every call")
    ap.add_argument("--fault-rate", type=float, default=0.0)
    ap.add_argument("--faults", default=",".join(FAULT_KINDS), help=f"comma-separated, of {ALL_FAULT_KINDS}")
    ap.add_argument("--hang", type=float, default=2.0, help="seconds a 'timeout' fault waits")
    ap.add_argument("--retry-after", default="1", help="the Retry-After of a 429, in seconds (may be fractional)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--upstream", default=None, help="a real zero-shot endpoint URL: be a fault-injecting proxy")
    ap.add_argument("--scores", choices=("softmax", "sigmoid"), default="softmax", help="the score kind answered")
    ap.add_argument("--redirect-to", default="http://127.0.0.1:9/", help="where a 'redirect' fault points")
    ap.add_argument("--bomb-mb", type=int, default=600, help="decoded size of a 'gzip_bomb' or 'endless' reply")
    args = ap.parse_args(argv)
    kinds = tuple(k for k in args.faults.split(",") if k)
    if unknown := set(kinds) - set(ALL_FAULT_KINDS):
        ap.error(f"unknown fault kinds {sorted(unknown)}")
    stub = StubVendor(args.host, args.port, args.latency, args.fault_rate, kinds, args.hang, args.retry_after,
                      args.seed, args.upstream)
    stub.scores, stub.redirect_to, stub.bomb_mb = args.scores, args.redirect_to, args.bomb_mb
    print(f"stub vendor at {stub.url}" + (f" (proxy to {args.upstream})" if args.upstream else ""), flush=True)
    try:
        stub.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stub.server_close()


if __name__ == "__main__":
    main()
