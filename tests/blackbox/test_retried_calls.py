"""Vendor calls during a fit: which faults are retried, how long it waits, when it gives up, what it counts."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from craft_adapter.blackbox.box import BlackBox
from craft_adapter.blackbox.meter import QueryMeter
from craft_adapter.blackbox.query_cache import QueryCache
from craft_adapter.blackbox.retried_calls import Caller, RetryPolicy, VendorUnavailable, classify
from craft_adapter.vendors.faults import VendorError
from craft_adapter.vendors.replies import check_answer


def http_error(status: int, retry_after: str | None = None) -> Exception:
    """An exception shaped like requests'/httpx's/huggingface_hub's HTTP errors."""
    e = RuntimeError(f"HTTP {status}")
    e.response = SimpleNamespace(status_code=status, headers={"Retry-After": retry_after} if retry_after else {})
    return e


@pytest.mark.parametrize(("exc", "expected"), [
    (VendorError("503"), (True, None)),
    (VendorError("401", transient=False, status=401), (False, None)),
    (VendorError("429", status=429, retry_after=2.0), (True, 2.0)),
    (http_error(429, "3"), (True, 3.0)),
    (http_error(429, "Wed, 21 Oct 2015 07:28:00 GMT"), (True, 0.0)),  # an HTTP date, long past: no wait
    (http_error(408), (True, None)),
    (http_error(425), (True, None)),
    (http_error(502), (True, None)),
    (http_error(400), (False, None)),
    (http_error(404, "3"), (False, None)),
    (TimeoutError(), (True, None)),
    (ConnectionResetError(), (True, None)),
    (VendorError("the reply is not complete JSON"), (True, None)),  # a refused reply: a transient VendorError
    (ValueError("a bug in our code"), None),
    (KeyError("x"), None),
])
def test_classify(exc: Exception, expected: tuple | None) -> None:
    assert classify(exc) == expected


class Flaky:
    """Fails with each of ``faults`` in turn, then answers ``value``."""

    def __init__(self, *faults: Exception, value: object = 1.0) -> None:
        self.faults, self.value, self.calls = list(faults), value, 0

    def __call__(self) -> object:
        self.calls += 1
        if self.faults:
            raise self.faults.pop(0)
        return self.value


def test_transient_faults_are_retried_with_backoff_and_retry_after() -> None:
    slept: list[float] = []
    meter = QueryMeter()
    caller = Caller(meter, RetryPolicy(retries=3, backoff_s=0.1), sleep=slept.append)
    with pytest.raises(VendorError) as refused:  # a NaN answer, refused by the one score check
        check_answer([np.nan], (1,))
    fn = Flaky(TimeoutError(), VendorError("429", status=429, retry_after=7.0), refused.value)
    assert caller.call(fn, lambda a: a, "a call") == 1.0
    assert fn.calls == 4 and meter.failed_calls == 3 and meter.paid_calls == 1
    # full jitter under the doubling cap (0.1, 0.2, 0.4 s); the vendor's hint is the least wait, jitter on top
    assert 0 <= slept[0] <= 0.1 and 7.0 <= slept[1] <= 7.2 and 0 <= slept[2] <= 0.4


def test_gives_up_after_the_retries_and_then_sends_nothing() -> None:
    meter = QueryMeter()
    caller = Caller(meter, RetryPolicy(retries=2, backoff_s=0), sleep=lambda s: None)
    fn = Flaky(*[VendorError("500")] * 10)
    with pytest.raises(VendorUnavailable, match="failed 3 times in a row"):
        caller.call(fn, lambda a: a, "a scoring call")
    assert fn.calls == 3 and meter.failed_calls == 3 and meter.paid_calls == 0
    with pytest.raises(VendorUnavailable):  # stopped for good: nothing more is sent
        caller.call(Flaky(), lambda a: a, "another call")
    assert meter.paid_calls == 0


def test_a_refusal_is_not_retried_and_bugs_are_not_swallowed() -> None:
    caller = Caller(QueryMeter(), RetryPolicy(retries=5), sleep=lambda s: pytest.fail("must not wait"))
    fn = Flaky(VendorError("HTTP 401: bad key", transient=False, status=401))
    with pytest.raises(VendorUnavailable, match="refused"):
        caller.call(fn, lambda a: a, "a call")
    assert fn.calls == 1
    with pytest.raises(ZeroDivisionError):
        Caller(QueryMeter()).call(lambda: 1 / 0, lambda a: a, "a call")


def test_the_cap_on_failed_calls_stops_the_fit() -> None:
    meter = QueryMeter()
    caller = Caller(meter, RetryPolicy(retries=5, backoff_s=0, max_failed_calls=3), sleep=lambda s: None)
    for _ in range(3):  # each call fails once, then succeeds: three failures are within the cap
        caller.call(Flaky(TimeoutError()), lambda a: a, "a call")
    with pytest.raises(VendorUnavailable, match="over the limit of 3"):
        caller.call(Flaky(TimeoutError()), lambda a: a, "a call")
    assert meter.failed_calls == 4 and meter.paid_calls == 3


@pytest.mark.parametrize(("bad", "shape", "probs"), [
    ([0.2, float("nan")], (2,), False), ([0.5, 1.5], (2,), True), ([1, 2, 3], (2,), False), ("x", (1,), False),
    ([[1.0]], (1, 2), False)])
def test_every_answer_check_failure_is_retried(bad: object, shape: tuple, probs: bool) -> None:
    """Whatever the one score check refuses, the caller retries: no special case for malformed answers."""
    meter = QueryMeter()
    answers = iter([bad, np.zeros(shape, np.float32)])
    got = Caller(meter, RetryPolicy(retries=1, backoff_s=0), sleep=lambda s: None).call(
        lambda: next(answers), lambda a: check_answer(a, shape, probabilities=probs), "a call")
    assert got.shape == shape and meter.failed_calls == 1 and meter.paid_calls == 1


class NanOnceEmbedder:
    """An embedding vendor whose first text answer holds a NaN (a glitch) and whose answers are otherwise fixed."""

    capabilities = SimpleNamespace(style="embedding", text_prompts=True, soft_prompts=False, returns="logits")
    logit_scale = 10.0
    identity = {"name": "nan-once"}

    def __init__(self) -> None:
        self.text_calls: list[list[str]] = []

    def embed_images(self, images):
        return np.eye(len(images), 4, dtype=np.float32) + 0.1

    def embed_texts(self, texts):
        self.text_calls.append(list(texts))
        out = np.stack([np.frombuffer(t.ljust(16)[:16].encode(), np.uint8)[:4].astype(np.float32) for t in texts])
        if len(self.text_calls) == 1:
            out[0, 0] = np.nan
        return out


def test_embedding_answers_are_checked_retried_cached_and_replayed(tmp_path) -> None:
    from PIL import Image

    images = [Image.new("L", (4, 4), v) for v in (10, 20, 30)]
    vendor = NanOnceEmbedder()
    with QueryCache(tmp_path / "c.sqlite") as cache:
        meter = QueryMeter()
        box = BlackBox(vendor, images, ["cat", "dog"], meter, cache=cache, retry=RetryPolicy(backoff_s=0))
        first = box.logits_text(["a {}.", "b {}."])
        assert np.isfinite(first).all() and meter.failed_calls == 1 and meter.paid_calls == 2  # images, texts
        assert len(vendor.text_calls) == 2
        again_meter = QueryMeter()
        again = BlackBox(vendor, images, ["cat", "dog"], again_meter, cache=cache)
        np.testing.assert_array_equal(again.logits_text(["b {}.", "a {}."]), first[::-1])
        assert again_meter.paid_calls == 0 and again_meter.cached_calls == 2  # images and texts: all replayed
        assert (again_meter.queries, again_meter.vendor_calls) == (meter.queries, meter.vendor_calls)
        again.logits_text(["a {}.", "c {}."])  # one new template: only its texts are sent
        assert vendor.text_calls[-1] == ["c cat.", "c dog."] and again_meter.paid_calls == 1


class InterruptedScorer:
    """A scoring vendor the user interrupts (Ctrl-C) during its third call."""

    capabilities = SimpleNamespace(style="scoring", text_prompts=True, soft_prompts=False, returns="probabilities")
    identity = {"name": "interrupted"}

    def __init__(self) -> None:
        import threading

        self.calls, self._lock = 0, threading.Lock()

    def score(self, image, labels, template):
        import time

        with self._lock:
            self.calls += 1
            n = self.calls
        time.sleep(0.01)
        if n == 3:
            raise KeyboardInterrupt
        return np.full(len(labels), 1 / len(labels), np.float32)


def test_an_interrupt_sends_nothing_more_and_keeps_what_was_paid(tmp_path) -> None:
    from PIL import Image

    vendor = InterruptedScorer()
    images = [Image.new("L", (4, 4), v) for v in range(30)]
    with QueryCache(tmp_path / "c.sqlite") as cache:
        box = BlackBox(vendor, images, ["cat", "dog"], QueryMeter(), concurrency=4, cache=cache)
        with pytest.raises(KeyboardInterrupt):
            box.logits_text(["a {}.", "b {}."])  # 60 calls queued
        assert vendor.calls <= 3 + 4  # the interrupted one and those already in flight, not the 53 others
        assert cache.stats()["entries"] == vendor.calls - 1  # every answer paid was kept
