"""Which failed calls are worth sending again, and how long to wait first: one rule for fit and the server."""

from __future__ import annotations

import email.utils
import time

import numpy as np
import pytest

from craft_adapter.vendors.faults import (
    MAX_RETRY_AFTER_S,
    backoff_delay,
    is_transient_status,
    parse_retry_after,
    status_error,
)


def test_transient_statuses() -> None:
    assert [c for c in (400, 401, 403, 404, 408, 409, 413, 422, 425, 429, 500, 502, 503, 504) if
            is_transient_status(c)] == [408, 425, 429, 500, 502, 503, 504]


def test_retry_after_seconds_and_dates() -> None:
    assert parse_retry_after("3") == 3.0 and parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None and parse_retry_after("") is None
    now = time.time()
    assert parse_retry_after(email.utils.formatdate(now + 20, usegmt=True), now=now) == pytest.approx(20, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 20, usegmt=True), now=now) == 0.0
    assert parse_retry_after("99999") == MAX_RETRY_AFTER_S == 300.0 and parse_retry_after("-4") == 0.0
    assert parse_retry_after("nan") is None and parse_retry_after("inf") is None


def test_status_error_reads_the_hint_only_when_a_retry_is_coming() -> None:
    e = status_error("HTTP 503", 503, "7")
    assert (e.transient, e.status, e.retry_after) == (True, 503, 7.0)
    e = status_error("HTTP 401", 401, "7")
    assert (e.transient, e.status, e.retry_after) == (False, 401, None)
    assert status_error("HTTP 408", 408, None).transient and status_error("HTTP 425", 425, None).transient


def test_backoff_is_full_jitter_under_a_doubling_cap_and_honours_retry_after() -> None:
    rng = np.random.default_rng(0)
    for attempt in range(6):
        cap = min(2.0, 0.1 * 2 ** attempt)
        waits = [backoff_delay(attempt, 0.1, 2.0, uniform=rng.random) for _ in range(400)]
        assert 0 <= min(waits) < cap / 10 and cap * 0.9 < max(waits) <= cap  # spread over the whole range
    assert backoff_delay(3, 0.1, 2.0, uniform=lambda: 0.5) == 0.4
    assert backoff_delay(0, 0.1, 2.0, retry_after=5.0, uniform=lambda: 0.5) == 5.05  # the hint, then jitter
    assert backoff_delay(0, 0.0, 2.0, retry_after=1e9) == MAX_RETRY_AFTER_S
