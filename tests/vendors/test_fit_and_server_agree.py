"""Fit and the adapter server follow the same vendor rules, shown against the stub vendor over real HTTP.

Fit's path is the HTTP client under fit's retrying caller (as :class:`~craft_adapter.blackbox.pair_scorer.PairScorer`
calls it); the server's is its async pool client. Each test sends both the same vendor behaviour and checks they
agree: which statuses are retried, how a Retry-After date is read, which replies are refused, what goes out on
the wire, and that a key echoed back never reaches a message.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import random_images

from craft_adapter.blackbox.meter import QueryMeter
from craft_adapter.blackbox.retried_calls import Caller, RetryPolicy, VendorUnavailable
from craft_adapter.testing.stub_vendor import StubVendor, running_stub, stub_probabilities
from craft_adapter.vendors.credentials import Secret, auth_headers
from craft_adapter.vendors.faults import VendorError
from craft_adapter.vendors.http_clients import HttpZeroShotVendor, image_base64
from craft_adapter.vendors.replies import check_answer

# isort: split
# (serve/ installs as craft_adapter.serve; ruff cannot place it, so it sorts apart)
from craft_adapter.serve.server.metrics import ServerMetrics
from craft_adapter.serve.server.settings import ServerConfig
from craft_adapter.serve.server.vendor_pool import VendorFailure, ZeroShotVendorClient

LABELS = ["cat", "dog", "fox"]
TEMPLATE = "a photo of a {}."
KEY = "sk-live-0123456789abcdef"
IMAGE = random_images(1, seed=5)[0]


@pytest.fixture
def stub() -> Iterator[StubVendor]:
    with running_stub() as vendor:
        yield vendor


def expected() -> np.ndarray:
    return stub_probabilities(image_base64(IMAGE), LABELS).astype(np.float32)


def fit_call(stub: StubVendor, retries: int = 2, key: Secret | None = None, header: str = "Authorization",
             scheme: str = "Bearer") -> tuple[np.ndarray, list[float], QueryMeter]:
    """One scoring call as fit makes it: the HTTP client under fit's caller; the waits are recorded, not slept."""
    vendor = HttpZeroShotVendor(stub.url, headers=auth_headers(key, header, scheme), timeout=5)
    meter, slept = QueryMeter(), []
    caller = Caller(meter, RetryPolicy(retries=retries, backoff_s=0.01, max_backoff_s=0.02), sleep=slept.append)
    scores = caller.call(lambda: vendor.score(IMAGE, LABELS, TEMPLATE),
                         lambda a: check_answer(a, (len(LABELS),), probabilities=True), "a scoring call")
    return scores, slept, meter


def server_call(stub: StubVendor, retries: int = 2, key: Secret | None = None, header: str = "Authorization",
                scheme: str = "Bearer") -> np.ndarray:
    """One vendor call as the adapter server makes it, with a 10 s request deadline."""
    config = ServerConfig(adapter="a.onnx", vendor_url=stub.url, vendor_retries=retries, backoff_base_s=0.01,
                          backoff_max_s=0.02, vendor_auth_header=header, vendor_auth_scheme=scheme)

    async def go() -> np.ndarray:
        client = ZeroShotVendorClient(config, LABELS, TEMPLATE, ServerMetrics(), key=key)
        try:
            return await client.scores(image_base64(IMAGE), time.monotonic() + 10)
        finally:
            await client.aclose()
    return asyncio.run(go())


@pytest.mark.parametrize("status", ["408", "425", "429", "500", "503"])
def test_transient_statuses_are_retried_by_both(stub: StubVendor, status: str) -> None:
    stub.retry_after = "0"
    stub.script = [status, "ok"]
    scores, _, meter = fit_call(stub)
    np.testing.assert_allclose(scores, expected(), rtol=1e-6)
    assert meter.failed_calls == 1 and meter.paid_calls == 1
    stub.script = [status, "ok"]
    np.testing.assert_allclose(server_call(stub), expected(), rtol=1e-6)
    assert stub.calls[status] == 2 and stub.calls["ok"] == 2


@pytest.mark.parametrize("status", ["400", "401"])
def test_refusals_are_not_retried_by_either(stub: StubVendor, status: str) -> None:
    stub.script = [status, "ok"]
    with pytest.raises(VendorUnavailable, match="refused"):
        fit_call(stub)
    stub.script = [status, "ok"]
    with pytest.raises(VendorFailure) as failure:
        server_call(stub)
    assert failure.value.type == "vendor_rejected" and stub.calls == {status: 2}


def test_an_http_date_retry_after_is_honoured_by_both(stub: StubVendor) -> None:
    stub.retry_after = email.utils.formatdate(time.time() + 30, usegmt=True)
    stub.script = ["429", "ok"]
    _, slept, _ = fit_call(stub)
    assert 28 <= slept[0] <= 30.1  # the date, read; fit waits it out
    stub.script = ["429", "ok"]
    with pytest.raises(VendorFailure) as failure:  # 30 s is past the request's 10 s deadline: it says so at once
        server_call(stub)
    assert failure.value.type == "vendor_rate_limited" and 28 <= failure.value.retry_after <= 30.1
    assert stub.calls == {"429": 2, "ok": 1}


@pytest.mark.parametrize("kind", ["malformed", "truncated", "wrong_labels", "missing_label", "not_probabilities",
                                  "nan"])
def test_a_reply_the_server_refuses_fit_refuses_too(stub: StubVendor, kind: str) -> None:
    stub.script = [kind]
    with pytest.raises(VendorFailure) as failure:
        server_call(stub, retries=0)
    assert failure.value.type == ("vendor_error" if kind == "truncated" else "vendor_bad_reply")  # both retried
    stub.script = [kind]
    vendor = HttpZeroShotVendor(stub.url, timeout=5)
    with pytest.raises(VendorError) as refused:
        vendor.score(IMAGE, LABELS, TEMPLATE)
    assert refused.value.transient  # so fit retries it, as the server does
    stub.script = [kind, "ok"]
    scores, _, meter = fit_call(stub)
    np.testing.assert_allclose(scores, expected(), rtol=1e-6)
    assert meter.failed_calls == 1


def test_both_send_the_same_request_and_key_header(stub: StubVendor) -> None:
    key = Secret(KEY)
    fit_call(stub, key=key, header="X-Api-Key", scheme="")
    fit_body, fit_headers = stub.last_body, stub.last_headers
    server_call(stub, key=key, header="X-Api-Key", scheme="")
    assert stub.last_body == fit_body and stub.last_headers["X-Api-Key"] == fit_headers["X-Api-Key"] == KEY
    assert "Authorization" not in stub.last_headers


def test_a_key_the_vendor_echoes_is_scrubbed_by_both(stub: StubVendor) -> None:
    stub.script = ["401"]  # its body echoes the Authorization header
    vendor = HttpZeroShotVendor(stub.url, headers=auth_headers(Secret(KEY)), timeout=5)
    with pytest.raises(VendorError) as refused:
        vendor.score(IMAGE, LABELS, TEMPLATE)
    stub.script = ["401"]
    with pytest.raises(VendorFailure) as failure:
        server_call(stub, key=Secret(KEY))
    for message in (str(refused.value), failure.value.message):
        assert "401" in message and "Bearer ***" in message and KEY not in message  # one scrubbing path
