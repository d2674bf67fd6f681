"""The one retry loop for synchronous vendor calls, shared by fit (:mod:`craft_adapter.blackbox.retried_calls`) and
the runtime (:mod:`craft_adapter.serve.vendor_binding`); the server's async pool follows the same rules.

A failed call is first made a :class:`~craft_adapter.vendors.faults.VendorError` (:func:`as_vendor_error`), whatever
raised it: our own clients' errors as they are, requests/httpx/huggingface_hub HTTP errors by their status
(:func:`~craft_adapter.vendors.faults.is_transient_status`, ``Retry-After``), timeouts and network errors as
transient. A transient one is sent again after :func:`~craft_adapter.vendors.faults.backoff_delay`, up to
``policy.retries`` times; a non-transient one, or the last, is raised. Anything else is a bug and is re-raised
unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from craft_adapter.vendors.faults import VendorError, backoff_delay, is_transient_status, parse_retry_after

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``retries`` per call, backoff from ``backoff_s`` doubling up to ``max_backoff_s``, a cap on
    failures."""

    retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_failed_calls: int | None = None  # None: no cap beyond the per-call retries (fit's meter enforces it)

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("retries and backoff times must be non-negative")
        if self.max_failed_calls is not None and self.max_failed_calls < 0:
            raise ValueError("max_failed_calls must be non-negative")

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based), the vendor's ``retry_after`` at least."""
        return backoff_delay(attempt, self.backoff_s, self.max_backoff_s, retry_after)


def as_vendor_error(exc: BaseException) -> VendorError | None:
    """``exc`` as a :class:`VendorError` (transient or not, status, Retry-After), or None if it is no vendor fault.

    The message is only the exception's type and status: a foreign exception's text may carry a key, so callers
    that know the secrets add it through :func:`~craft_adapter.vendors.credentials.vendor_detail`.
    """
    if isinstance(exc, VendorError):
        return exc
    transient = getattr(exc, "transient", None)
    if isinstance(transient, bool):  # shaped like a VendorError
        return VendorError(type(exc).__name__, transient=transient, status=getattr(exc, "status", None),
                           retry_after=getattr(exc, "retry_after", None))
    response = getattr(exc, "response", None)  # requests / httpx errors, huggingface_hub's HfHubHTTPError
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        transient = is_transient_status(status)
        hint = (getattr(response, "headers", None) or {}).get("Retry-After") if transient else None
        return VendorError(f"{type(exc).__name__} (HTTP {status})", transient=transient, status=status,
                           retry_after=parse_retry_after(hint))
    if isinstance(exc, TimeoutError | ConnectionError | OSError):
        return VendorError(type(exc).__name__)
    try:
        import httpx
    except ImportError:  # pragma: no cover (httpx is a dependency; the check keeps this module import-light)
        return None
    if isinstance(exc, httpx.TransportError):  # timeouts, refused and dropped connections, protocol errors
        return VendorError(type(exc).__name__)
    return None


def call_with_retries(fn: Callable[[], T], policy: RetryPolicy, *, sleep: Callable[[float], None] = time.sleep,
                      on_failure: Callable[[VendorError, BaseException, float], None] | None = None) -> T:
    """``fn()``, sent again on transient vendor faults under ``policy``; the last fault as a :class:`VendorError`.

    ``on_failure(error, original, seconds)`` sees every failed attempt first (fit counts it, and may stop by
    raising); a non-vendor exception (a bug) is re-raised unchanged.
    """
    for attempt in range(policy.retries + 1):
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 (sorted out by as_vendor_error; a bug re-raises unchanged)
            error = as_vendor_error(e)
            if error is None:
                raise
            if on_failure is not None:
                on_failure(error, e, time.perf_counter() - t0)
            if not error.transient or attempt == policy.retries:
                raise error from (None if error is e else e)
            sleep(policy.delay(attempt, error.retry_after))
    raise AssertionError("unreachable")
