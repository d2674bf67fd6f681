"""The runtime under vendor faults: the stub vendor in its own process failing 20% of calls, a batch of 1,000 images
gives exactly the fault-free answers (retries), bounded concurrency, and every vendor fault leaves as VendorError."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from conftest import random_images

from craft_adapter.artifact.synthetic import synthetic_adapter
from craft_adapter.testing.stub_vendor import StubVendor, serve_stub_in_thread, stub_probabilities
from craft_adapter.vendors.faults import VendorError
from craft_adapter.vendors.http_clients import HttpZeroShotVendor, image_base64
from craft_adapter.vendors.retries import RetryPolicy

# isort: split
from craft_adapter.serve import CallableVendor, load_runtime

NAMES = ["ant", "bee", "cat", "dog", "eel", "fox"]
# every fault a retry can cure; "not_probabilities" is left out: before the first good reply it means "this vendor
# is not softmax" and stops at once (tests/vendors/test_score_kinds.py)
FAULTS = "timeout,500,503,429,malformed,truncated,wrong_labels,missing_label,nan"
FAST = RetryPolicy(retries=8, backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(scope="module")
def adapter_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    a = synthetic_adapter(len(NAMES), seed=21)
    a.class_names = list(NAMES)
    return a.save(tmp_path_factory.mktemp("a") / "a.safetensors")


@pytest.fixture(scope="module")
def faulty_stub() -> Iterator[str]:
    """``python -m craft_adapter.testing.stub_vendor --fault-rate 0.2`` in its own process."""
    proc = subprocess.Popen([sys.executable, "-m", "craft_adapter.testing.stub_vendor", "--fault-rate", "0.2",
                             "--faults", FAULTS, "--hang", "3", "--retry-after", "0.05", "--seed", "7"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("stub vendor at "), line
        yield line.split(" at ")[1].strip()
    finally:
        proc.terminate()
        proc.wait(10)


def stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/stats", timeout=5) as r:
        return json.loads(r.read())["calls"]


def test_a_batch_of_1000_under_20_percent_faults_gives_the_fault_free_answers(adapter_path: Path,
                                                                              faulty_stub: str) -> None:
    images = random_images(1000, size=24, seed=4)
    runtime = load_runtime(adapter_path, HttpZeroShotVendor(faulty_stub + "/", timeout=1.0), retry=FAST,
                           concurrency=16)
    t0 = time.perf_counter()
    before = stats(faulty_stub)
    got = runtime.predict(images)
    seconds = time.perf_counter() - t0
    after = stats(faulty_stub)
    counts = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    # the fault-free answer: the stub's scores computed here, refined by the same adapter
    want = np.stack([stub_probabilities(image_base64(im), NAMES) for im in images]).astype(np.float32)
    expected = runtime.predict_scores(want)
    assert got.labels == expected.labels
    np.testing.assert_allclose(got.probabilities, expected.probabilities, rtol=1e-5, atol=1e-6)
    faults = sum(v for k, v in counts.items() if k != "ok")
    print(f"\n1000 images, {sum(counts.values())} vendor calls, {faults} faults {counts}, {seconds:.1f} s")
    assert counts["ok"] == 1000 and 150 <= faults <= 400  # every image answered once, after ~20% faults


def test_when_retries_run_out_the_batch_fails_with_one_clear_error(adapter_path: Path) -> None:
    stub = StubVendor(fault_rate=1.0, fault_kinds=("503",))
    serve_stub_in_thread(stub)
    try:
        runtime = load_runtime(adapter_path, HttpZeroShotVendor(stub.url + "/", timeout=2.0),
                               retry=RetryPolicy(retries=2, backoff_s=0), concurrency=4)
        with pytest.raises(VendorError, match="HTTP 503") as e:
            runtime.predict(random_images(20, size=16))
        assert e.value.transient and e.value.status == 503
        assert sum(stub.calls.values()) <= 3 * 4  # after the first image gives up, nothing new is sent
        stub.fault_kinds = ("400",)
        stub.script = ["400"]
        with pytest.raises(VendorError, match="HTTP 400") as e:
            runtime.predict(random_images(1, size=16))
        assert not e.value.transient and e.value.status == 400
    finally:
        stub.shutdown()
        stub.server_close()


def test_calls_in_flight_are_bounded_and_answers_placed_by_index(adapter_path: Path) -> None:
    stub = StubVendor(latency_s=0.05)
    serve_stub_in_thread(stub)
    try:
        images = random_images(24, size=16, seed=9)
        runtime = load_runtime(adapter_path, HttpZeroShotVendor(stub.url + "/"), concurrency=4)
        got = runtime.vendor_scores(images)
        assert 2 <= stub.max_in_flight <= 4
        want = np.stack([stub_probabilities(image_base64(im), NAMES) for im in images])
        np.testing.assert_allclose(got, want, rtol=1e-6)
    finally:
        stub.shutdown()
        stub.server_close()


def http_error(status: int, retry_after: str | None = None) -> Exception:
    """Shaped like requests'/huggingface_hub's HTTP errors."""
    e = RuntimeError(f"HTTP {status} for a key sk-abc123456789")
    e.response = SimpleNamespace(status_code=status, headers={"Retry-After": retry_after} if retry_after else {})
    return e


@pytest.mark.parametrize(("fault", "transient", "status"), [
    (http_error(503, "0"), True, 503), (http_error(401), False, 401), (ConnectionResetError("reset"), True, None),
    (TimeoutError("slow"), True, None), (httpx.ReadTimeout("slow"), True, None),
])
def test_every_vendor_class_fails_with_one_exception_type(adapter_path: Path, fault: Exception, transient: bool,
                                                          status: int | None) -> None:
    calls = []

    def vendor(images: list, prompts: list[str]) -> np.ndarray:
        calls.append(1)
        raise fault

    runtime = load_runtime(adapter_path, CallableVendor(vendor), retry=RetryPolicy(retries=2, backoff_s=0))
    with pytest.raises(VendorError) as e:
        runtime.predict(random_images(2, size=16))
    assert (e.value.transient, e.value.status) == (transient, status)
    assert len(calls) == (3 if transient else 1)
    assert "sk-abc" not in str(e.value)  # a foreign exception's text is not copied into the message


def test_a_bug_in_a_callable_is_not_disguised(adapter_path: Path) -> None:
    def vendor(images: list, prompts: list[str]) -> np.ndarray:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        load_runtime(adapter_path, CallableVendor(vendor)).predict(random_images(1, size=16))


def test_a_garbled_callable_answer_is_retried(adapter_path: Path) -> None:
    answers = [np.full((2, len(NAMES)), np.nan), np.full((2, len(NAMES)), 1 / len(NAMES))]
    runtime = load_runtime(adapter_path, CallableVendor(lambda images, prompts: answers.pop(0)),
                           retry=RetryPolicy(retries=1, backoff_s=0))
    assert len(runtime.predict(random_images(2, size=16))) == 2 and not answers
