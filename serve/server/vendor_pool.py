"""The server's async client for a Hugging Face zero-shot vendor: timeouts, retries, a bound on calls in flight.

One call scores one image against the adapter's learned prompt. Each attempt has its own timeout, and the
whole call has a deadline (the client request's). The vendor rules are fit's (:mod:`craft_adapter.vendors`):
retried are the statuses :func:`~craft_adapter.vendors.faults.is_transient_status` names (408, 425, 429, 5xx),
timeouts, dropped connections and replies :func:`~craft_adapter.vendors.replies.parse_zero_shot` refuses
(classification is idempotent), after :func:`~craft_adapter.vendors.faults.backoff_delay` with this server's own
``backoff_base_s``/``backoff_max_s``; a ``Retry-After`` (seconds or an HTTP date) sets the least wait. The request
is :func:`~craft_adapter.vendors.replies.zero_shot_request`'s. Anything unusable fails the call with a
:class:`VendorFailure` carrying the HTTP status the client gets. The key goes only into the request header
(:func:`~craft_adapter.vendors.credentials.auth_headers`); vendor text reaches a message only through
:func:`~craft_adapter.vendors.credentials.vendor_detail`, as in fit's client.

Replies are read under :mod:`craft_adapter.vendors.http_limits`, as fit reads them: a redirect is refused (never
followed), a body is read in a stream and cut at a cap scaled by the labels, and gzip/deflate are decoded with
an output bound, so a gzip bomb or an endless reply costs this server at most the cap per call in flight. Each
call's scores are checked as the adapter's score kind (softmax or sigmoid, its ``logit_kind``), with the
first-reply rule of :class:`~craft_adapter.vendors.replies.ScoreKindCheck`; refusals that a retry cannot change
(a redirect, an oversized reply, a vendor of the wrong score kind) are not retried.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence

import httpx
import numpy as np

from craft_adapter.serve.server.metrics import ServerMetrics
from craft_adapter.serve.server.settings import ServerConfig
from craft_adapter.vendors.credentials import (
    Secret,
    auth_headers,
    header_secrets,
    redact_url,
    url_secrets,
    vendor_detail,
)
from craft_adapter.vendors.faults import VendorError, backoff_delay, is_transient_status, parse_retry_after
from craft_adapter.vendors.http_limits import send_capped_async, zero_shot_reply_cap
from craft_adapter.vendors.replies import SOFTMAX, ScoreKindCheck, zero_shot_request

POOL_SHARD_SIZE = 8  # connections per httpx pool
TRICKLE_GRACE_S = 0.5

# failure type -> HTTP status the client gets
STATUS = {"vendor_unreachable": 503, "vendor_rate_limited": 503, "vendor_busy": 503, "vendor_timeout": 504,
          "vendor_error": 502, "vendor_bad_reply": 502, "vendor_rejected": 502}


class VendorFailure(Exception):
    """The vendor could not give a usable answer; ``type`` and ``status`` say how the client is told."""

    def __init__(self, type_: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.type, self.status, self.retry_after = type_, STATUS[type_], retry_after
        self.message = message


class ZeroShotVendorClient:
    """Scores images with the adapter's labels and template at a zero-shot vendor, within the config's limits."""

    def __init__(self, config: ServerConfig, labels: Sequence[str], template: str, metrics: ServerMetrics,
                 key: Secret | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config, self.labels, self.template, self.metrics = config, list(labels), template, metrics
        self._url_shown = redact_url(config.vendor_url)
        self._slots = asyncio.Semaphore(config.max_vendor_in_flight)
        auth = auth_headers(key, config.vendor_auth_header, config.vendor_auth_scheme)
        self._secrets = header_secrets(auth.items()) + url_secrets(config.vendor_url)
        self._kind_checks: dict[str, ScoreKindCheck] = {}  # one first-reply rule per score kind
        headers = {"Content-Type": "application/json", **auth}
        # httpcore's pool does work per request that grows with its connection count times its queue, so the
        # connections are spread over small pools; each call takes the least busy one, so while the semaphore
        # admits a call, its pool has a free connection (a call never waits in a full pool beside an idle one)
        shards = -(-config.max_vendor_in_flight // POOL_SHARD_SIZE)
        per_shard = -(-config.max_vendor_in_flight // shards)
        limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard, keepalive_expiry=30)
        self._pools = [httpx.AsyncClient(headers=headers, limits=limits, timeout=config.vendor_timeout_s,
                                         transport=transport, follow_redirects=False) for _ in range(shards)]
        self._busy = [0] * shards  # calls open per pool
        self._random = random.Random()

    async def aclose(self) -> None:
        """Close pooled connections."""
        for pool in self._pools:
            await pool.aclose()

    def _payload(self, image_b64: str, labels: Sequence[str], template: str) -> bytes:
        return json.dumps(zero_shot_request(image_b64, labels, template)).encode()

    async def scores(self, image_b64: str, deadline: float, labels: Sequence[str] | None = None,
                     template: str | None = None, kind: str = SOFTMAX) -> np.ndarray:
        """Vendor probabilities ``[c]`` for one base64 image, by ``deadline`` (``time.monotonic()``), or a failure.

        ``labels`` and ``template`` default to the client's own; a multi-adapter server passes each adapter's,
        and its ``kind`` (the adapter's ``logit_kind``: ``"probabilities"`` or ``"independent_probabilities"``).
        """
        labels = self.labels if labels is None else labels
        payload = self._payload(image_b64, labels, self.template if template is None else template)
        check = self._kind_checks.get(kind) or self._kind_checks.setdefault(kind, ScoreKindCheck(kind))
        attempts = self.config.vendor_retries + 1
        for attempt in range(attempts):
            try:
                return await self._attempt(payload, deadline, labels, check)
            except VendorFailure as failure:
                retryable = failure.type not in ("vendor_rejected", "vendor_busy")
                if not retryable or attempt == attempts - 1:
                    raise
                wait = self._backoff(attempt, failure.retry_after)
                if time.monotonic() + wait >= deadline:
                    raise  # not enough time left to wait and try again; the client learns why now
                self.metrics.vendor_retries.inc()
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        return backoff_delay(attempt, self.config.backoff_base_s, self.config.backoff_max_s, retry_after,
                             self._random.random)

    async def _attempt(self, payload: bytes, deadline: float, labels: Sequence[str],
                       check: ScoreKindCheck) -> np.ndarray:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise VendorFailure("vendor_timeout", f"no answer from the vendor within the request's "
                                f"{self.config.request_timeout_s:g} s")
        try:
            async with asyncio.timeout(remaining):
                await self._slots.acquire()
        except TimeoutError:
            raise VendorFailure("vendor_busy", f"all {self.config.max_vendor_in_flight} vendor call slots stayed "
                                "busy until the request's deadline; retry later or add workers") from None
        self.metrics.vendor_in_flight.add(1)
        started = time.perf_counter()
        outcome = "cancelled"  # what is left if the call is abandoned (a batch sibling failed, the client left)
        try:
            budget = min(self.config.vendor_timeout_s, deadline - time.monotonic())
            response = await self._post(payload, budget, zero_shot_reply_cap(list(labels)))
            self._raise_for_status(response)
            scores = check.parse(response.content, labels)
            outcome = "ok"
            return scores
        except VendorError as e:  # a refused reply; one a retry cannot change is not retried
            outcome = "bad_reply" if e.transient else "rejected"
            raise VendorFailure("vendor_bad_reply" if e.transient else "vendor_rejected",
                                f"the vendor at {self._url_shown} sent an unusable reply: "
                                f"{vendor_detail(str(e), self._secrets, 600)}") from None
        except VendorFailure as f:
            outcome = f.type.removeprefix("vendor_")
            raise
        finally:
            self._slots.release()
            self.metrics.vendor_in_flight.add(-1)
            self.metrics.vendor_calls.inc(outcome)
            self.metrics.vendor_latency.observe(time.perf_counter() - started)

    async def _post(self, payload: bytes, budget: float, cap: int) -> httpx.Response:
        where = self._url_shown
        try:
            # httpx's own timeouts end a slow call cleanly; the outer one only guards against a reply that
            # trickles in byte by byte (cancelling inside httpcore can strand a pooled connection)
            async with asyncio.timeout(max(budget, 0.0) + TRICKLE_GRACE_S):
                return await self._post_on_idlest_pool(payload, max(budget, 0.001), cap)
        except (TimeoutError, httpx.TimeoutException) as e:
            if isinstance(e, httpx.ConnectTimeout):
                raise VendorFailure("vendor_unreachable", f"cannot connect to the vendor at {where} "
                                    "(connect timed out)") from None
            raise VendorFailure("vendor_timeout", f"the vendor at {where} did not answer within "
                                f"{budget:.3g} s") from None
        except httpx.ConnectError:
            raise VendorFailure("vendor_unreachable", f"cannot connect to the vendor at {where} "
                                "(connection refused or host unreachable)") from None
        except httpx.HTTPError as e:  # dropped connection, protocol error mid-reply
            raise VendorFailure("vendor_error", f"the connection to the vendor at {where} failed mid-reply "
                                f"({type(e).__name__})") from None

    async def _post_on_idlest_pool(self, payload: bytes, budget: float, cap: int) -> httpx.Response:
        shard = min(range(len(self._pools)), key=self._busy.__getitem__)
        self._busy[shard] += 1
        try:
            return await send_capped_async(self._pools[shard], "POST", self.config.vendor_url, cap=cap,
                                           content=payload, timeout=budget)
        finally:
            self._busy[shard] -= 1

    def _raise_for_status(self, response: httpx.Response) -> None:
        code = response.status_code
        if code == 200:
            return
        detail = vendor_detail(response.content, self._secrets)
        where = self._url_shown
        if is_transient_status(code):
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if code == 429:
                raise VendorFailure("vendor_rate_limited", f"the vendor at {where} is rate limiting us (HTTP 429)",
                                    retry_after)
            raise VendorFailure("vendor_error", f"the vendor at {where} failed (HTTP {code}: {detail})", retry_after)
        hint = " (check the vendor API key)" if code in (401, 403) else ""
        raise VendorFailure("vendor_rejected", f"the vendor at {where} refused the request (HTTP {code}: "
                            f"{detail}){hint}")

