"""Calling a vendor during a fit: check every answer, retry transient faults, stop cleanly on persistent ones.

A fault is *transient* when sending the same call again may succeed: a timeout, a refused or reset connection,
an HTTP status :func:`~craft_adapter.vendors.faults.is_transient_status` names (408, 425, 429, 5xx), or any reply
the vendor rules refuse (a transient :class:`~craft_adapter.vendors.faults.VendorError`: cut short, not JSON,
missing or unknown labels, NaN or out-of-range scores). Those are retried after
:func:`~craft_adapter.vendors.faults.backoff_delay` (jittered exponential, honouring ``Retry-After``): the same
rules the adapter server follows. Anything else the vendor says (HTTP 400, 401, 403, 404...) will not change on
a retry, so the fit stops at once. So does a
transient fault that outlasts the retries, or more failed calls than the policy allows in all. Stopping raises
:class:`VendorUnavailable`; every answer paid before it is already in the cache, so ``fit --resume`` goes on.

A failed attempt is counted on the meter (``failed_calls``) but not against the budget: the budget counts the
answers a fit uses, which is what makes a fit with faults end with the same adapter as one without.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from craft_adapter.vendors.faults import backoff_delay, is_transient_status, parse_retry_after

if TYPE_CHECKING:
    from craft_adapter.blackbox.meter import QueryMeter


T = TypeVar("T")


class VendorUnavailable(RuntimeError):
    """The vendor failed persistently; nothing more was sent. Answers paid so far are kept."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``retries`` per call, backoff from ``backoff_s`` doubling up to ``max_backoff_s``, a cap on
    failures."""

    retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_failed_calls: int | None = None  # None: no cap beyond the per-call retries

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("retries and backoff times must be non-negative")
        if self.max_failed_calls is not None and self.max_failed_calls < 0:
            raise ValueError("max_failed_calls must be non-negative")

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based), the vendor's ``retry_after`` at least."""
        return backoff_delay(attempt, self.backoff_s, self.max_backoff_s, retry_after)


def classify(exc: BaseException) -> tuple[bool, float | None] | None:
    """``(transient, retry_after)`` for a vendor fault, or ``None`` when ``exc`` is not one (a bug: re-raise)."""
    transient = getattr(exc, "transient", None)
    if isinstance(transient, bool):  # VendorError (every refused reply among them) and anything shaped like it
        return transient, getattr(exc, "retry_after", None)
    response = getattr(exc, "response", None)  # requests / httpx errors, huggingface_hub's HfHubHTTPError
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        if not is_transient_status(status):
            return False, None
        return True, parse_retry_after((getattr(response, "headers", None) or {}).get("Retry-After"))
    if isinstance(exc, (TimeoutError, ConnectionError, OSError)):
        return True, None
    return None


class Caller:
    """Makes vendor calls under a :class:`RetryPolicy`, counting every attempt on the meter; thread-safe."""

    def __init__(self, meter: QueryMeter, policy: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.meter, self.policy, self.sleep = meter, policy or RetryPolicy(), sleep
        self._lock = threading.Lock()
        self.stopped: VendorUnavailable | None = None  # once set, no further call is sent

    def call(self, fn: Callable[[], T], check: Callable[[T], T], what: str) -> T:
        """``check(fn())``, retried on transient faults; raises :class:`VendorUnavailable` when it gives up."""
        for attempt in range(self.policy.retries + 1):
            if self.stopped is not None:
                raise self.stopped
            t0 = time.perf_counter()
            try:
                answer = check(fn())
            except Exception as e:  # noqa: BLE001 (sorted out by classify; a bug re-raises unchanged)
                kind = classify(e)
                if kind is None:
                    raise
                transient, retry_after = kind
                self._failed(time.perf_counter() - t0)
                reason = f"{type(e).__name__}: {e}"
                if not transient:
                    raise self._stop(f"the vendor refused {what}; a retry would not change that: {reason}") from None
                if attempt == self.policy.retries:
                    raise self._stop(f"{what} failed {attempt + 1} times in a row; last: {reason}") from None
                self.sleep(self.policy.delay(attempt, retry_after))
                continue
            with self._lock:
                self.meter.vendor_seconds += time.perf_counter() - t0
                self.meter.paid_calls += 1
            return answer
        raise AssertionError("unreachable")

    def _failed(self, seconds: float) -> None:
        with self._lock:
            self.meter.failed_calls += 1
            self.meter.vendor_seconds += seconds
            cap = self.policy.max_failed_calls
            if cap is not None and self.meter.failed_calls > cap and self.stopped is None:
                self.stopped = VendorUnavailable(f"{self.meter.failed_calls} vendor calls failed, over the limit of "
                                                 f"{cap} (--max-failed-calls)")
        if self.stopped is not None:
            raise self.stopped

    def _stop(self, message: str) -> VendorUnavailable:
        with self._lock:
            if self.stopped is None:
                self.stopped = VendorUnavailable(message)
            return self.stopped

