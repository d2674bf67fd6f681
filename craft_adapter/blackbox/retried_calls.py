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
from typing import TYPE_CHECKING, TypeVar

from craft_adapter.vendors.faults import VendorError
from craft_adapter.vendors.retries import RetryPolicy, as_vendor_error, call_with_retries

if TYPE_CHECKING:
    from craft_adapter.blackbox.meter import QueryMeter

__all__ = ["Caller", "RetryPolicy", "VendorUnavailable", "classify"]

T = TypeVar("T")


class VendorUnavailable(RuntimeError):
    """The vendor failed persistently; nothing more was sent. Answers paid so far are kept."""


def classify(exc: BaseException) -> tuple[bool, float | None] | None:
    """``(transient, retry_after)`` for a vendor fault, or ``None`` when ``exc`` is not one (a bug: re-raise)."""
    error = as_vendor_error(exc)
    return None if error is None else (error.transient, error.retry_after)


class Caller:
    """Makes vendor calls under a :class:`RetryPolicy` (the shared loop in :mod:`craft_adapter.vendors.retries`),
    counting every attempt on the meter; thread-safe."""

    def __init__(self, meter: QueryMeter, policy: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.meter, self.policy, self.sleep = meter, policy or RetryPolicy(), sleep
        self._lock = threading.Lock()
        self.stopped: VendorUnavailable | None = None  # once set, no further call is sent

    def call(self, fn: Callable[[], T], check: Callable[[T], T], what: str) -> T:
        """``check(fn())``, retried on transient faults; raises :class:`VendorUnavailable` when it gives up."""
        started = [0.0]

        def attempt() -> T:
            if self.stopped is not None:
                raise self.stopped
            started[0] = time.perf_counter()
            return check(fn())

        last: list[BaseException] = []

        def failed(error: VendorError, original: BaseException, seconds: float) -> None:
            last[:] = [original]
            self._failed(seconds)

        try:
            answer = call_with_retries(attempt, self.policy, sleep=self.sleep, on_failure=failed)
        except VendorError as error:
            e = last[0] if last else error
            reason = f"{type(e).__name__}: {e}"
            if not error.transient:
                raise self._stop(f"the vendor refused {what}; a retry would not change that: {reason}") from None
            raise self._stop(f"{what} failed {self.policy.retries + 1} times in a row; last: {reason}") from None
        with self._lock:
            self.meter.vendor_seconds += time.perf_counter() - started[0]
            self.meter.paid_calls += 1
        return answer

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
