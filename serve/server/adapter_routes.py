"""The routes of a multi-adapter server: every endpoint of the single-adapter server, per adapter name.

- ``POST /v1/adapters/{name}/classify`` and ``POST /v1/adapters/{name}/classify/batch``: as ``/v1/classify``
  and its batch form, with ``"adapter": {"name", "version"}`` added to the answer;
- ``POST /v1/adapters/{name}`` and ``POST /v1/adapters/{name}/zero-shot-image-classification``: the Hugging
  Face shape, so ``InferenceClient(model="http://HOST:PORT/v1/adapters/{name}")`` works unchanged;
- ``GET /v1/adapters`` lists the adapters (name, current version, versions kept, classes, loaded or not);
  ``GET /v1/adapters/{name}`` describes one (its class names and prompt).

``{name}`` is ``NAME`` (the current version) or ``NAME@VERSION`` (a pinned one). Every answer carries the
header ``X-Adapter-Version: NAME@VERSION``. The version is fixed when the request starts: the first thing a
handler does is acquire the adapter, and the request keeps that object until it has answered.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from craft_adapter.serve.server.adapter_store import AdapterStore, Loaded
from craft_adapter.serve.server.image_decoding import decoded_all
from craft_adapter.serve.server.inputs import classify_options, request_images
from craft_adapter.serve.server.metrics import ServerMetrics
from craft_adapter.serve.server.off_loop import off_loop
from craft_adapter.serve.server.service import refined_zero_shot, top_answer
from craft_adapter.serve.server.settings import ServerConfig
from craft_adapter.vendors.credentials import redact_url

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class MultiOptions:
    """How a multi-adapter server holds its adapters (each becomes a ``ServerConfig`` field later)."""

    memory_budget_mb: float = 0.0  # estimated memory of loaded adapters; 0: no bound
    poll_s: float = 2.0  # how often the folder is checked for new, changed and removed files
    keep_versions: int = 3  # versions per adapter kept pinnable after its file moves on
    metrics_top_n: int = 50  # adapters with their own metrics label; the rest are "other"

    def __post_init__(self) -> None:
        if self.memory_budget_mb < 0 or self.poll_s <= 0 or self.keep_versions < 1 or self.metrics_top_n < 0:
            raise ValueError("memory_budget_mb >= 0, poll_s > 0, keep_versions >= 1 and metrics_top_n >= 0")


def multi_info(config: ServerConfig, store: AdapterStore | None, authenticated: bool, version: str) -> dict:
    """What ``GET /v1/info`` answers for a multi-adapter server: adapters, vendor, limits, endpoints."""
    assert store is not None
    return {
        "version": version,
        "adapters": {"source": str(store.root), "count": store.known(), "loaded": store.loaded_count(),
                     "memory_budget_bytes": store.budget_bytes or None},
        "vendor": {"url": redact_url(config.vendor_url), "protocol": config.vendor_api,
                   "authenticated": authenticated},
        "limits": {"max_body_bytes": config.max_body_bytes, "max_batch": config.max_batch,
                   "max_image_pixels": config.max_image_pixels, "request_timeout_s": config.request_timeout_s},
        "endpoints": {"classify": "POST /v1/adapters/{name}/classify", "batch": "POST /v1/adapters/{name}/"
                      "classify/batch", "hugging_face": "POST /v1/adapters/{name}", "list": "GET /v1/adapters",
                      "health": "GET /healthz", "ready": "GET /readyz", "metrics": "GET /metrics"}}


async def read_images(request: Request, config: ServerConfig, batch: bool) -> list[bytes]:
    """The request's images, read within the config's limits and fully decoded (big ones off the loop)."""
    raw = await request_images(request, config.max_body_bytes, config.max_batch, batch)
    request.state.images = len(raw)
    return await decoded_all(raw, config.max_image_pixels, off_loop)


class AdapterEndpoints:
    """Request handlers over an :class:`AdapterStore` whose loaded adapters share one vendor client."""

    def __init__(self, config: ServerConfig, store: AdapterStore, metrics: ServerMetrics) -> None:
        self.config, self.store, self.metrics = config, store, metrics

    def _measured(self, handler: Callable[[Request, Loaded, float], Awaitable[Response]]) -> Handler:
        async def measured(request: Request) -> Response:
            deadline = time.monotonic() + self.config.request_timeout_s  # a cold load counts in the request
            started, label, outcome = time.perf_counter(), "other", "internal"
            try:
                loaded = await self.store.acquire(request.path_params["name"])  # the version is fixed here
                label = self.metrics.adapters.label(loaded.version.name) if self.metrics.adapters else label
                response = await handler(request, loaded, deadline)
                response.headers["X-Adapter-Version"] = loaded.version.ref
                outcome = "ok"
                return response
            except Exception as e:
                outcome = getattr(e, "type", "internal")  # ApiError and VendorFailure carry a fixed type
                raise
            finally:
                if self.metrics.adapters is not None:
                    self.metrics.adapters.requests.inc(label, outcome)
                    self.metrics.adapters.latency.observe(time.perf_counter() - started, label)
        return measured

    def routes(self) -> list[tuple[str, Handler, str]]:
        """(path, handler, method) for every route."""
        base = "/v1/adapters/{name}"
        return [(f"{base}/classify", self._measured(self._classify), "POST"),
                (f"{base}/classify/batch", self._measured(self._classify_batch), "POST"),
                (base, self._measured(self._hf_zero_shot), "POST"),
                (f"{base}/zero-shot-image-classification", self._measured(self._hf_zero_shot), "POST"),
                ("/v1/adapters", self.listing, "GET"), (base, self.describe, "GET")]

    def _count(self, loaded: Loaded, n: int) -> None:
        self.metrics.images.inc(amount=n)
        if self.metrics.adapters is not None:
            self.metrics.adapters.images.inc(self.metrics.adapters.label(loaded.version.name), amount=n)

    async def _classify(self, request: Request, loaded: Loaded, deadline: float) -> Response:
        service = loaded.service
        top_k, with_vendor = classify_options(request, len(service.class_names), self.config.top_k)
        result = await service.classify(await read_images(request, self.config, batch=False), deadline)
        self._count(loaded, 1)
        answer = top_answer(service.class_names, result.probabilities[0],
                            result.vendor_scores[0] if with_vendor else None, top_k)
        return JSONResponse({**answer, "adapter": {"name": loaded.version.name, "version": loaded.version.id}})

    async def _classify_batch(self, request: Request, loaded: Loaded, deadline: float) -> Response:
        service = loaded.service
        top_k, with_vendor = classify_options(request, len(service.class_names), self.config.top_k)
        result = await service.classify(await read_images(request, self.config, batch=True), deadline)
        self._count(loaded, len(result.probabilities))
        names = service.class_names
        return JSONResponse({"adapter": {"name": loaded.version.name, "version": loaded.version.id}, "results": [
            top_answer(names, p, v if with_vendor else None, top_k)
            for p, v in zip(result.probabilities, result.vendor_scores, strict=True)]})

    async def _hf_zero_shot(self, request: Request, loaded: Loaded, deadline: float) -> Response:
        answer = await refined_zero_shot(loaded.service, request, self.config, deadline,
                                         f"adapter {loaded.version.name}")
        self._count(loaded, 1)
        return JSONResponse(answer)

    async def listing(self, request: Request) -> Response:
        """GET /v1/adapters: every adapter, its versions and what is loaded."""
        s = self.store
        return JSONResponse({"adapters": s.listing(), "loaded_bytes_estimate": s.loaded_bytes,
                             "memory_budget_bytes": s.budget_bytes or None})

    async def describe(self, request: Request) -> Response:
        """GET /v1/adapters/{name}: one adapter version's classes and prompt (without loading it)."""
        v = self.store.resolve(request.path_params["name"])
        row = next((r for r in self.store.listing() if r["name"] == v.name), {})
        return JSONResponse({"name": v.name, "version": v.id, "classes": list(v.class_names), "template": v.template,
                             "source": row.get("source"), "versions": row.get("versions", []),
                             "estimated_bytes_loaded": v.cost})
