"""One copy of every rule about a vendor call that went wrong: the error type, transient statuses, Retry-After, backoff.

Fit (:mod:`craft_adapter.blackbox.retried_calls`), the HTTP clients and the adapter server all decide through
these functions whether a failed call is worth sending again and how long to wait first, so a vendor that one of
them retries, all of them retry, and a vendor's hint is read the same way everywhere.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable

TRANSIENT_STATUSES = frozenset({408, 425, 429})  # and every 5xx: the same request may succeed later
MAX_RETRY_AFTER_S = 300.0  # a vendor's hint beyond this is a misconfiguration, not a plan


class VendorError(RuntimeError):
    """A vendor answered something the adapter cannot use; the message says what and how to fix it.

    ``transient`` says whether the same call may succeed if sent again (timeouts, 408, 425, 429, 5xx, garbled or
    incomplete replies); ``retry_after`` is the vendor's own hint in seconds, ``status`` the HTTP status when there
    was one.
    """

    def __init__(self, message: str, *, transient: bool = True, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient, self.status, self.retry_after = transient, status, retry_after


def is_transient_status(code: int) -> bool:
    """Whether an HTTP error status may go away on a retry: 408, 425, 429 and 5xx; any other refusal will not."""
    return code in TRANSIENT_STATUSES or code >= 500


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or an HTTP date), capped; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S) if math.isfinite(seconds) else None


def status_error(message: str, status: int, retry_after_header: str | None) -> VendorError:
    """The :class:`VendorError` for an HTTP error ``status``: transient or not, with the vendor's Retry-After."""
    transient = is_transient_status(status)
    return VendorError(message, transient=transient, status=status,
                       retry_after=parse_retry_after(retry_after_header) if transient else None)


def backoff_delay(attempt: int, base_s: float, cap_s: float, retry_after: float | None = None,
                  uniform: Callable[[], float] = random.random) -> float:
    """Seconds before retry number ``attempt`` (0-based): full jitter up to ``min(cap_s, base_s * 2**attempt)``.

    A vendor's ``retry_after`` is the least wait (capped at :data:`MAX_RETRY_AFTER_S`); the jitter comes on top of
    it, so callers that were all told "wait 2 s" do not all come back in the same instant.
    """
    jitter = uniform() * min(cap_s, base_s * 2 ** attempt)
    return jitter if retry_after is None else min(max(retry_after, 0.0), MAX_RETRY_AFTER_S) + jitter
