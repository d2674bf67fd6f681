"""The server in front of any vendor protocol but Hugging Face zero-shot: the runtime's vendor binding, off the loop.

:class:`ThreadedVendor` holds the one vendor :func:`~craft_adapter.vendors.registry.make_vendor` built for
``--protocol`` (embedding clients are synchronous httpx and thread-safe) and a thread pool of
``max_vendor_in_flight`` workers shared by every adapter. :class:`RuntimeService` scores a request's images
exactly as :meth:`AdapterRuntime.vendor_outputs <craft_adapter.serve.runtime.AdapterRuntime.vendor_outputs>` does
(same prompt, same retry rules under the server's ``--retries``/``--backoff``, same checks, and the image
embeddings an embedding vendor returned, which an adapter with an embedding head reads), then refines them as
every service does (:class:`~.service.ServedAdapter`), so an answer equals the runtime's ``predict``.

Why a dedicated pool rather than ``anyio.to_thread``: a request that reaches its deadline is answered at once
and its call is abandoned, and anyio hands an abandoned call's limiter slot back before its thread ends. Here a
worker stays taken until its call really ends, so the bound counts every call still open at the vendor, and a
call that never started is withdrawn. The decoded pixels of a call count in the process's decode budget
(:data:`~.inputs.DECODE_BUDGET`) until it ends.

A :class:`~craft_adapter.vendors.faults.VendorError` becomes the server's :class:`~.vendor_pool.VendorFailure`
by the contract of :mod:`.http_app`: not transient -> 502 ``vendor_rejected``; 429 -> 503 ``vendor_rate_limited``
and another transient HTTP status -> 502 ``vendor_error``, both with ``Retry-After`` when the vendor gave one; a
timeout -> 504; a refused or dropped connection -> 503 ``vendor_unreachable``; a garbled reply -> 502. Waiting
past the deadline for a free worker -> 503 ``vendor_busy``; past it in the call -> 504 ``vendor_timeout``.
The metrics count one vendor call per request here: the text embeddings (once per adapter) and the chunks
of an embedding request are inside it, and its retries are the runtime's, not counted apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
from PIL import Image

from craft_adapter.artifact.adapter_file import AdapterError
from craft_adapter.serve.runtime import AdapterRuntime
from craft_adapter.serve.server.image_decoding import DECODE_BUDGET, decode_cost
from craft_adapter.serve.server.inputs import ApiError
from craft_adapter.serve.server.metrics import ServerMetrics
from craft_adapter.serve.server.service import Classified, ServedAdapter, check_servable
from craft_adapter.serve.server.settings import HF_ZERO_SHOT, ServerConfig
from craft_adapter.serve.server.vendor_pool import VendorFailure
from craft_adapter.serve.shipped import ShippedAdapter
from craft_adapter.vendors.credentials import Secret
from craft_adapter.vendors.faults import VendorError
from craft_adapter.vendors.registry import BUILTIN, make_vendor
from craft_adapter.vendors.retries import RetryPolicy

T = TypeVar("T")  # what a vendor call gives back


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:  # our clients raise ``from None``: the cause stays in __context__
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def vendor_failure(error: VendorError) -> VendorFailure:
    """The failure the client is told for a vendor call that failed for good (see the module's table)."""
    message = f"the vendor failed: {error}"
    if not error.transient:
        hint = " (check the vendor API key)" if error.status in (401, 403) else ""
        return VendorFailure("vendor_rejected", f"the vendor refused the request: {error}{hint}")
    if error.status == 429:
        return VendorFailure("vendor_rate_limited", f"the vendor is rate limiting us: {error}", error.retry_after)
    if error.status is not None:
        return VendorFailure("vendor_error", message, error.retry_after)
    causes = list(_causes(error))
    if any(isinstance(c, httpx.ConnectError | httpx.ConnectTimeout | ConnectionRefusedError) for c in causes):
        return VendorFailure("vendor_unreachable", message)
    if any(isinstance(c, TimeoutError | httpx.TimeoutException) for c in causes):
        return VendorFailure("vendor_timeout", message)
    if any(isinstance(c, httpx.TransportError | OSError) for c in causes):
        return VendorFailure("vendor_unreachable", message)
    return VendorFailure("vendor_bad_reply", message)


def decode(images: list[bytes]) -> list[Image.Image]:
    """Checked image bytes as RGB pictures, what a CLIP vendor makes of them (an embedding API takes pixels)."""
    out = []
    for data in images:
        with Image.open(io.BytesIO(data)) as im:
            out.append(im.convert("RGB"))
    return out


class ThreadedVendor:
    """One vendor of any protocol and the worker threads that call it, shared by every adapter of a server."""

    def __init__(self, vendor: Any, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.vendor, self.config, self.metrics = vendor, config, metrics
        self.retry = RetryPolicy(retries=config.vendor_retries, backoff_s=config.backoff_base_s,
                                 max_backoff_s=config.backoff_max_s)
        self._pool = ThreadPoolExecutor(config.max_vendor_in_flight, thread_name_prefix="vendor")

    async def run(self, work: Callable[[], T], cost: int, deadline: float) -> T:
        """``work()`` on a worker thread by ``deadline``, ``cost`` decoded bytes held until it ends; or a failure."""
        loop, started = asyncio.get_running_loop(), threading.Event()
        remaining = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(remaining, 0.0)):
                await DECODE_BUDGET.reserve(cost)
        except TimeoutError:
            raise VendorFailure("vendor_busy", "the server's decode budget stayed full until the request's "
                                "deadline; retry later") from None

        def call() -> T:
            started.set()
            loop.call_soon_threadsafe(self.metrics.vendor_in_flight.add, 1)
            try:
                return work()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed at shutdown
                    loop.call_soon_threadsafe(self.metrics.vendor_in_flight.add, -1)

        def ended(_: Future) -> None:  # when the call ends, or is withdrawn before it started
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: loop.create_task(DECODE_BUDGET.release(cost)))

        try:
            future = self._pool.submit(call)
        except RuntimeError:  # the pool was shut down: the server is stopping
            await DECODE_BUDGET.release(cost)
            raise ApiError(503, "not_ready", "the server is starting or stopping") from None
        future.add_done_callback(ended)
        t0, outcome = time.perf_counter(), "cancelled"
        try:
            scores = await asyncio.wait_for(asyncio.wrap_future(future), max(deadline - time.monotonic(), 0.0))
            outcome = "ok"
            return scores
        except TimeoutError:
            outcome = "timeout" if started.is_set() else "busy"
            if started.is_set():
                raise VendorFailure("vendor_timeout", f"no answer from the vendor within the request's "
                                    f"{self.config.request_timeout_s:g} s") from None
            raise VendorFailure("vendor_busy", f"all {self.config.max_vendor_in_flight} vendor call slots stayed "
                                "busy until the request's deadline; retry later or add workers") from None
        except VendorError as e:
            failure = vendor_failure(e)
            outcome = failure.type.removeprefix("vendor_")
            raise failure from None
        finally:
            self.metrics.vendor_calls.inc(outcome)
            if outcome != "busy":
                self.metrics.vendor_latency.observe(time.perf_counter() - t0)

    async def aclose(self) -> None:
        """Withdraw calls not started, let running ones end on their own, and close the vendor's connections."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.vendor, "close", None)
        if callable(close):
            close()


class RuntimeService(ServedAdapter):
    """An adapter in front of a :class:`ThreadedVendor`: the runtime's vendor scores, refined as every service."""

    def __init__(self, adapter: ShippedAdapter, vendor: ThreadedVendor) -> None:
        check_servable(adapter, vendor.vendor)
        super().__init__(adapter)
        self.vendor = vendor
        # concurrency 1: a worker is one call in flight (a scoring plug-in's images go one after another)
        self.runtime = AdapterRuntime(adapter, vendor.vendor, vendor.retry, concurrency=1)

    async def classify(self, images: list[bytes], deadline: float) -> Classified:
        """Refined predictions for checked image bytes, or a :class:`VendorFailure`; all the batch or nothing."""
        cost = sum(decode_cost(b, self.vendor.config.max_image_pixels) for b in images)
        scores, embeddings = await self.vendor.run(lambda: self.runtime.vendor_outputs(decode(images)), cost,
                                                   deadline)
        return self.classified(scores, embeddings)


def protocol_vendor(config: ServerConfig, key: Secret | None) -> Any | None:
    """The vendor for ``config.vendor_protocol``, made by the registry; None for hf-zero-shot (the async client's).

    A protocol that will not take these settings (a plug-in without a model, say) is an :class:`AdapterError`
    naming it, refused at start-up like an adapter that cannot be served.
    """
    protocol = config.vendor_protocol
    if protocol == HF_ZERO_SHOT:
        return None
    options = {"timeout": config.vendor_timeout_s} if protocol in BUILTIN else {}  # a plug-in may take none
    try:
        return make_vendor(protocol, config.vendor_url, key=key, model=config.vendor_model or None, **options)
    except ValueError as e:  # the registry's refusals; the URL was checked by the config already
        raise AdapterError(f"--protocol {protocol}: {e}") from None
