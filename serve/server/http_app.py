"""The adapter server: a shipped adapter in front of its vendor, over HTTP (Starlette on uvicorn).

The vendor speaks ``--protocol``: Hugging Face zero-shot through the async client (:mod:`.vendor_pool`), any other
protocol (embedding APIs, plug-ins) through the runtime's vendor binding on worker threads (:mod:`.runtime_service`).

Endpoints (errors answer ``{"error": message, "type": type}`` with the status below):

- ``POST /v1/classify``: one image as raw bytes (``image/*``, ``application/octet-stream``), a multipart file
  part, or JSON ``{"image": <base64>}``. Answers ``{"label", "probability", "top": [{"label", "probability"}],
  "vendor_scores"?}``. Query: ``top_k`` (default 5), ``vendor_scores=true`` adds the vendor's raw scores.
- ``POST /v1/classify/batch``: several images as multipart file parts or JSON ``{"images": [<base64>, ...]}``;
  answers ``{"results": [<one image's answer>, ...]}`` in order. All or nothing.
- ``POST /`` and ``POST /zero-shot-image-classification``: the Hugging Face zero-shot-image-classification
  request; answers ``[{"label", "score"}]``, best first, with the *refined* probabilities. Candidate labels must
  be classes of the adapter (the answer is renormalised over them); the hypothesis template is ignored, because
  the adapter's learned prompt is what it was fitted with.
- ``GET /healthz`` (alive), ``GET /readyz`` (adapter loaded and vendor reachable), ``GET /metrics``
  (Prometheus), ``GET /`` and ``GET /v1/info`` (version, classes, prompt, limits).

With a folder (or registry file) of adapters, one server serves them all behind one vendor client pool:
``POST /v1/adapters/{name}/classify`` and the rest, per adapter name (:mod:`.adapter_routes`), loaded on
demand, hot reloaded and versioned (:mod:`.adapter_store`); the single-adapter routes are then absent.

Statuses: 400 bad request or damaged image, 413 body/image/batch too large, 415 not a supported image or body
type, 502 vendor failed or replied unusably, 503 vendor unreachable, rate limiting or busy (with Retry-After
when known), 504 vendor timeout. The server keeps no state between requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from craft_adapter import __version__
from craft_adapter.serve.server.access import AccessMiddleware
from craft_adapter.serve.server.adapter_routes import AdapterEndpoints, MultiOptions, multi_info, read_images
from craft_adapter.serve.server.adapter_store import AdapterStore, poll_forever
from craft_adapter.serve.server.connections import InFlightLimit, guarded_protocol, return_big_frees
from craft_adapter.serve.server.failures import Handler, error_response, guarded, http_error
from craft_adapter.serve.server.heap import settle_heap
from craft_adapter.serve.server.inputs import ApiError, classify_options
from craft_adapter.serve.server.logs import SERVER_LOGGER, setup_logging
from craft_adapter.serve.server.metrics import AdapterMetrics, ServerMetrics
from craft_adapter.serve.server.runtime_service import RuntimeService, ThreadedVendor, protocol_vendor
from craft_adapter.serve.server.service import (
    AdapterService,
    ServedAdapter,
    check_servable,
    refined_zero_shot,
    top_answer,
)
from craft_adapter.serve.server.settings import ServerConfig
from craft_adapter.serve.server.vendor_pool import ZeroShotVendorClient
from craft_adapter.serve.shipped import ShippedAdapter
from craft_adapter.vendors.credentials import Secret, redact_url

READY_CACHE_S = 2.0


class _Endpoints:
    """Request handlers over one :class:`AdapterService` or an :class:`AdapterStore` (live once started)."""

    def __init__(self, config: ServerConfig, adapter: ShippedAdapter | None, metrics: ServerMetrics,
                 key: Secret | None, store: AdapterStore | None = None) -> None:
        self.config, self.adapter, self.metrics, self.key, self.store = config, adapter, metrics, key, store
        self.service: ServedAdapter | None = None
        self.live = False
        self._ready: tuple[float, str | None] = (0.0, "starting")  # (checked at, reason not ready)

    def _service(self) -> ServedAdapter:
        if self.service is None:
            raise ApiError(503, "not_ready", "the server is starting or stopping")
        return self.service

    def _deadline(self) -> float:
        return time.monotonic() + self.config.request_timeout_s

    async def _images(self, request: Request, batch: bool) -> list[bytes]:
        return await read_images(request, self.config, batch)

    async def classify(self, request: Request) -> Response:
        """POST /v1/classify: one image."""
        service = self._service()
        top_k, with_vendor = classify_options(request, len(service.class_names), self.config.top_k)
        deadline = self._deadline()
        result = await service.classify(await self._images(request, batch=False), deadline)
        self.metrics.images.inc()
        return JSONResponse(top_answer(service.class_names, result.probabilities[0],
                                       result.vendor_scores[0] if with_vendor else None, top_k))

    async def classify_batch(self, request: Request) -> Response:
        """POST /v1/classify/batch: several images, all answered or none."""
        service = self._service()
        top_k, with_vendor = classify_options(request, len(service.class_names), self.config.top_k)
        deadline = self._deadline()
        result = await service.classify(await self._images(request, batch=True), deadline)
        self.metrics.images.inc(amount=len(result.probabilities))
        names = service.class_names
        return JSONResponse({"results": [
            top_answer(names, p, v if with_vendor else None, top_k)
            for p, v in zip(result.probabilities, result.vendor_scores, strict=True)]})

    async def hf_zero_shot(self, request: Request) -> Response:
        """POST / (Hugging Face zero-shot-image-classification shape), answered with refined probabilities."""
        answer = await refined_zero_shot(self._service(), request, self.config, self._deadline(), "this adapter")
        self.metrics.images.inc()
        return JSONResponse(answer)

    async def info(self, request: Request) -> Response:
        """GET /v1/info: what this server serves, and its limits."""
        a, c = self.adapter, self.config
        if a is None:
            return JSONResponse(multi_info(self.config, self.store, self.key is not None, __version__))
        return JSONResponse({
            "version": __version__,
            "adapter": {"source": a.source, "classes": a.class_names, "template": a.template, "mode": a.mode,
                        "format_version": a.format_version, "refiner_providers": a.providers},
            "vendor": {"url": redact_url(c.vendor_url), "protocol": c.vendor_api,
                       "authenticated": self.key is not None},
            "limits": {"max_body_bytes": c.max_body_bytes, "max_batch": c.max_batch,
                       "max_image_pixels": c.max_image_pixels, "request_timeout_s": c.request_timeout_s},
            "endpoints": {"classify": "POST /v1/classify", "batch": "POST /v1/classify/batch",
                          "hugging_face": "POST /", "health": "GET /healthz", "ready": "GET /readyz",
                          "metrics": "GET /metrics"}})

    async def healthz(self, request: Request) -> Response:
        """GET /healthz: the process answers."""
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """GET /readyz: ready to classify (adapter loaded, vendor accepts connections); 503 with the reason."""
        checked_at, reason = self._ready
        if time.monotonic() - checked_at > READY_CACHE_S:
            reason = "starting or stopping" if not self.live else await self._vendor_reason()
            self._ready = (time.monotonic(), reason)
        if reason is None:
            return JSONResponse({"status": "ready"})
        return error_response(503, "not_ready", reason)

    async def _vendor_reason(self) -> str | None:
        url = urlsplit(self.config.vendor_url)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:  # a TCP connect costs the vendor nothing, unlike a scoring call
            async with asyncio.timeout(1.0):
                _, writer = await asyncio.open_connection(url.hostname, port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        except (OSError, TimeoutError):
            return f"the vendor at {redact_url(self.config.vendor_url)} does not accept connections"
        return None

    async def metrics_text(self, request: Request) -> Response:
        """GET /metrics: Prometheus text format."""
        if self.store is not None and self.metrics.adapters is not None:
            self.metrics.adapters.observe_store(self.store.known(), self.store.loaded_count(), self.store.loaded_bytes)
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def create_app(config: ServerConfig, key: Secret | None = None, adapters: str | Path | None = None,
               options: MultiOptions | None = None, store: AdapterStore | None = None) -> Starlette:
    """The ASGI app for ``config.adapter``, or, given ``adapters`` (a folder or registry file), for all of them.

    Adapters are loaded and checked now (every file's header, for a folder); the vendor is connected on startup.
    ``store`` replaces the store built from ``adapters`` (the Ray Serve ingress passes one that answers remotely).
    """
    key = config.vendor_key() if key is None else key
    setup_logging(config.log_level, key)
    return_big_frees()
    adapters = adapters if adapters is not None else (config.adapters or None)
    metrics, options = ServerMetrics(), options or MultiOptions(
        config.adapters_memory_mb, config.adapters_poll_s, config.adapters_keep_versions, config.adapter_metrics_top_n)
    adapter: ShippedAdapter | None = None
    vendor = protocol_vendor(config, key)  # None: hf-zero-shot, through the async client
    if adapters is None and store is None:
        adapter = ShippedAdapter.load(config.adapter, config.device)
        check_servable(adapter, vendor)
    else:
        if store is None:
            store = AdapterStore(adapters, config.device, int(options.memory_budget_mb * 2**20),
                                 options.keep_versions, vendor=vendor)
            store.refresh()
        metrics.adapters = AdapterMetrics(options.metrics_top_n)
        store.on_event = metrics.adapters.events.inc
    endpoints = _Endpoints(config, adapter, metrics, key, store)
    log = logging.getLogger(SERVER_LOGGER)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        labels, template = (adapter.class_names, adapter.template) if adapter else ([], "{}")
        client: ZeroShotVendorClient | ThreadedVendor  # one pool for every adapter
        make_service: Callable[[ShippedAdapter], ServedAdapter]
        if vendor is None:
            client = ZeroShotVendorClient(config, labels, template, metrics, key)
            make_service = partial(AdapterService, client=client)
        else:
            client = ThreadedVendor(vendor, config, metrics)
            make_service = partial(RuntimeService, vendor=client)
        poller = None
        if adapter is not None:
            endpoints.service = make_service(adapter)
            log.info("serving %s (%d classes) in front of %s", adapter.source, adapter.n_classes,
                     redact_url(config.vendor_url), extra={"fields": {"event": "startup"}})
        elif store is not None:
            store.make_service = make_service
            poller = asyncio.create_task(poll_forever(store, options.poll_s))
            log.info("serving %d adapters from %s in front of %s", store.known(), store.root,
                     redact_url(config.vendor_url), extra={"fields": {"event": "startup"}})
        settle_heap()  # what startup built stays out of every garbage collection from now on
        endpoints.live = True
        try:
            yield
        finally:
            endpoints.live, endpoints.service = False, None
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            if store is not None:
                store.close()
            await client.aclose()
            log.info("stopped", extra={"fields": {"event": "shutdown"}})

    e = endpoints

    def route(path: str, handler: Handler, method: str) -> Route:
        return Route(path, guarded(handler, metrics), methods=[method])

    if store is None:
        served = [route("/v1/classify", e.classify, "POST"), route("/v1/classify/batch", e.classify_batch, "POST"),
                  route("/", e.hf_zero_shot, "POST"),
                  route("/zero-shot-image-classification", e.hf_zero_shot, "POST")]
    else:
        served = [route(*r) for r in AdapterEndpoints(config, store, metrics).routes()]
    routes = [*served, route("/", e.info, "GET"), route("/v1/info", e.info, "GET"),
              route("/healthz", e.healthz, "GET"), route("/readyz", e.readyz, "GET"),
              route("/metrics", e.metrics_text, "GET")]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.add_middleware(InFlightLimit, limit=config.max_requests_in_flight)  # inside the log: refusals are counted
    app.add_middleware(AccessMiddleware, metrics=metrics, access_log=config.access_log)
    app.state.config, app.state.metrics, app.state.store = config, metrics, store
    return app


def app_from_env() -> Starlette:
    """The app configured from ``CRAFT_SERVE_*`` variables: the factory each worker process calls."""
    return create_app(ServerConfig.from_env())


def uvicorn_options(config: ServerConfig) -> dict[str, Any]:
    """The uvicorn settings for ``config``: graceful shutdown, request-head deadlines, our own logging.

    No ``limit_concurrency``: uvicorn counts open sockets there, so idle ones would shut every request out;
    :class:`InFlightLimit` bounds the requests instead (see :mod:`.connections`).
    """
    from craft_adapter.serve.server.logs import uvicorn_log_config

    return {"log_config": uvicorn_log_config(), "access_log": False, "log_level": config.log_level,
            "timeout_graceful_shutdown": int(config.graceful_timeout_s), "server_header": False,
            "http": guarded_protocol(), "lifespan": "on", "backlog": 4096}
