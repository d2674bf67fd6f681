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

Calls go through one aiohttp session (a pool of at most ``max_vendor_in_flight`` keep-alive connections): it costs
about a fifth of httpx's CPU per call (``benchmarks/vendor_client_cost.py``), and the vendor call was the largest
part of a request's. Replies are read under :mod:`craft_adapter.vendors.http_limits`, as fit reads them: a redirect
is refused (never followed), a body is read in a stream and cut at a cap scaled by the labels, and gzip/deflate are
decoded with an output bound (the session itself decodes nothing), so a gzip bomb or an endless reply costs this
server at most the cap per call in flight. A proxy that the environment names (``HTTPS_PROXY``, ``ALL_PROXY``,
``NO_PROXY``) is used, as httpx used it, but read once, not per call; ``~/.netrc`` is never read. Each call's
scores are checked as the adapter's score kind (softmax or sigmoid, its ``logit_kind``), with the first-reply rule
of :class:`~craft_adapter.vendors.replies.ScoreKindCheck`; refusals that a retry cannot change (a redirect, an
oversized reply, a vendor of the wrong score kind) are not retried.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from collections.abc import Sequence

import aiohttp
import numpy as np
from yarl import URL

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
from craft_adapter.vendors.http_limits import CappedReply, send_capped_async, zero_shot_reply_cap
from craft_adapter.vendors.replies import SOFTMAX, ScoreKindCheck, zero_shot_request

TRICKLE_GRACE_S = 0.5
KEEPALIVE_S = 30.0

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
                 key: Secret | None = None) -> None:
        self.config, self.labels, self.template, self.metrics = config, list(labels), template, metrics
        self._url, self._url_shown = URL(config.vendor_url), redact_url(config.vendor_url)
        self._proxy = env_proxy(config.vendor_url)
        self._slots = asyncio.Semaphore(config.max_vendor_in_flight)
        auth = auth_headers(key, config.vendor_auth_header, config.vendor_auth_scheme)
        self._secrets = header_secrets(auth.items()) + url_secrets(config.vendor_url)
        self._kind_checks: dict[str, ScoreKindCheck] = {}  # one first-reply rule per score kind
        self._headers = {"Content-Type": "application/json", **auth}
        self._session: aiohttp.ClientSession | None = None  # made on first use: it belongs to the running loop
        self._random = random.Random()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # the semaphore admits a call only when a connection is free, so a call never waits in the pool
            connector = aiohttp.TCPConnector(limit=self.config.max_vendor_in_flight, limit_per_host=0,
                                             keepalive_timeout=KEEPALIVE_S)
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers, auto_decompress=False, trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def aclose(self) -> None:
        """Close pooled connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

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

    async def _post(self, payload: bytes, budget: float, cap: int) -> CappedReply:
        where = self._url_shown
        budget = max(budget, 0.001)
        # aiohttp's timeouts end a silent connect or read, the connect one not rounded up to a whole second so that
        # it comes before the outer one; the outer one bounds a reply that trickles in byte by byte
        timeout = aiohttp.ClientTimeout(sock_connect=budget, sock_read=budget, ceil_threshold=budget)
        try:
            async with asyncio.timeout(budget + TRICKLE_GRACE_S):
                return await send_capped_async(self._client(), "POST", self._url, cap=cap, where=where, data=payload,
                                               timeout=timeout, proxy=self._proxy)
        except aiohttp.ConnectionTimeoutError:
            raise VendorFailure("vendor_unreachable", f"cannot connect to the vendor at {where} "
                                "(connect timed out)") from None
        except TimeoutError:
            raise VendorFailure("vendor_timeout", f"the vendor at {where} did not answer within "
                                f"{budget:.3g} s") from None
        except aiohttp.ClientConnectorError:
            raise VendorFailure("vendor_unreachable", f"cannot connect to the vendor at {where} "
                                "(connection refused or host unreachable)") from None
        except (aiohttp.ClientError, OSError) as e:  # dropped connection, protocol error mid-reply
            raise VendorFailure("vendor_error", f"the connection to the vendor at {where} failed mid-reply "
                                f"({type(e).__name__})") from None

    def _raise_for_status(self, response: CappedReply) -> None:
        code = response.status
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


def env_proxy(url: str) -> str | None:
    """The proxy that the environment names for ``url`` (``HTTP(S)_PROXY`` or ``ALL_PROXY``, unless ``NO_PROXY``
    covers its host), or None."""
    parsed = URL(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    return None if proxy is None or urllib.request.proxy_bypass(parsed.host or "") else proxy
