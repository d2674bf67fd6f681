"""How the server answers a failure: one JSON error body for every status, and handlers that never leak a traceback.

Every failure answers ``{"error": message, "type": type}`` (``error`` is what Hugging Face clients show): a client
mistake (:class:`ApiError`) with its own status, a vendor failure with 502/503/504 and ``Retry-After`` when the vendor
gave one, and anything else, a bug, as 500 with nothing internal in the body (the server log has it, scrubbed).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from craft_adapter.serve.server.inputs import ApiError
from craft_adapter.serve.server.logs import SERVER_LOGGER
from craft_adapter.serve.server.metrics import ServerMetrics
from craft_adapter.serve.server.vendor_pool import VendorFailure

Handler = Callable[[Request], Awaitable[Response]]


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error body every failure uses (``error`` is what Hugging Face clients show)."""
    return JSONResponse({"error": message, "type": type_}, status_code=status, headers=headers)


def guarded(handler: Handler, metrics: ServerMetrics) -> Handler:
    """``handler`` answering every exception with the JSON error (and logging a bug), its frames released."""
    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as e:  # noqa: BLE001 (every failure gets the JSON error; a bug is also logged)
            try:
                return _failure_response(request, e, metrics)
            finally:
                # a failure can close a reference cycle with the frames it came through, which hold the request's
                # body: through a future or task that keeps it (anyio's worker threads, asyncio's task groups), or
                # through the failure it replaced; cut here, the body is freed now, not at a later collection
                e.__traceback__ = e.__context__ = e.__cause__ = None
    return run


def _failure_response(request: Request, e: Exception, metrics: ServerMetrics) -> Response:
    if isinstance(e, ApiError):
        request.state.error_type = e.type
        return error_response(e.status, e.type, e.message, e.headers)
    if isinstance(e, VendorFailure):
        request.state.error_type = e.type
        metrics.vendor_errors.inc(e.type)
        headers = {"Retry-After": str(max(1, round(e.retry_after)))} if e.retry_after is not None else None
        return error_response(e.status, e.type, e.message, headers)
    request.state.error_type = "internal"  # a bug, not the client's fault: log it (scrubbed), say nothing internal
    logging.getLogger(SERVER_LOGGER).error("unhandled error", exc_info=e)
    return error_response(500, "internal", "internal server error; see the server log")


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own HTTP errors (404, 405) in the JSON error body, pointing at the endpoint list."""
    status = getattr(exc, "status_code", 500)
    type_ = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
    return error_response(status, type_, f"{request.method} {request.url.path}: {getattr(exc, 'detail', '')}; "
                          "see GET /v1/info for the endpoints", getattr(exc, "headers", None))
