"""The stub vendor as a fault-injecting proxy in front of the local vendor, and the local vendor's call counts.

Real HTTP on loopback: the local vendor (tiny random model) is the upstream; every expected answer is the upstream's
own answer to the same request, fetched directly.
"""

from __future__ import annotations

import http.client
import json
import math
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import random_images

from craft_adapter.reference.local_vendor import VendorHTTPServer, make_vendor_server, serve_in_thread
from craft_adapter.vendors.open_clip_backend import OpenClipBackend

# isort: split
from craft_adapter.testing.stub_vendor import StubVendor, serve_stub_in_thread
from craft_adapter.vendors.http_clients import image_base64

NAMES = ["t-shirt", "trouser", "pullover", "dress"]
TEMPLATE = "a blurry photo of a {}."


def request(url: str, method: str = "POST", body: object = None, timeout: float = 30.0,
            path: str = "/") -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: status, headers, raw body (raises on a cut-short body or a timeout)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, data, {"Content-Type": "application/json"} if data else {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def zero_shot_body(seed: int = 0, template: str = TEMPLATE) -> dict:
    """A Hugging Face zero-shot request for one random image."""
    return {"inputs": image_base64(random_images(1, seed=seed)[0]),
            "parameters": {"candidate_labels": NAMES, "hypothesis_template": template}}


@pytest.fixture(scope="module")
def upstream(tiny_model_dir: Path) -> Iterator[VendorHTTPServer]:
    srv = make_vendor_server(OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu"))
    serve_in_thread(srv)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def proxy(upstream: VendorHTTPServer) -> Iterator[StubVendor]:
    stub = StubVendor(upstream=upstream.url + "/", hang_s=1.0, retry_after="0.2")
    serve_stub_in_thread(stub)
    yield stub
    stub.shutdown()
    stub.server_close()


def direct_answer(upstream: VendorHTTPServer, body: dict) -> list[dict]:
    status, _, raw = request(upstream.url, body=body)
    assert status == 200
    return json.loads(raw)


# -- the local vendor counts its calls ------------------------------------------------------------------------------

def test_vendor_counts_calls_per_endpoint(upstream: VendorHTTPServer) -> None:
    before = upstream.call_counts()
    assert set(before) == {"zero_shot", "embed_images", "embed_texts"}
    image = image_base64(random_images(1, seed=1)[0])
    assert request(upstream.url, body=zero_shot_body(1))[0] == 200
    assert request(upstream.url, body=zero_shot_body(2), path="/zero-shot-image-classification")[0] == 200
    assert request(upstream.url, body={"inputs": [image, image]}, path="/embed/images")[0] == 200
    for _ in range(3):
        assert request(upstream.url, body={"inputs": ["a", "b"]}, path="/embed/texts")[0] == 200
    assert request(upstream.url, body={"inputs": []}, path="/embed/texts")[0] == 400  # received, so counted
    assert request(upstream.url, body={}, path="/nowhere")[0] == 404  # no endpoint: not counted
    assert request(upstream.url, "GET", path="/info")[0] == 200  # /info embeds a text internally: not a call
    status, _, raw = request(upstream.url, "GET", path="/stats")
    want = {"zero_shot": before["zero_shot"] + 2, "embed_images": before["embed_images"] + 1,
            "embed_texts": before["embed_texts"] + 4}
    assert status == 200 and json.loads(raw) == {"calls": want}
    assert upstream.calls == want


def test_vendor_counts_concurrent_calls_exactly(upstream: VendorHTTPServer) -> None:
    before = upstream.call_counts()["embed_texts"]

    def client() -> None:
        for _ in range(10):
            assert request(upstream.url, body={"inputs": ["x"]}, path="/embed/texts")[0] == 200

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert upstream.call_counts()["embed_texts"] == before + 80


# -- the stub as a fault-injecting proxy ----------------------------------------------------------------------------

def test_proxy_forwards_the_upstream_answer(proxy: StubVendor, upstream: VendorHTTPServer) -> None:
    body = zero_shot_body(3)
    want = direct_answer(upstream, body)
    before = upstream.call_counts()["zero_shot"]
    status, _, raw = request(proxy.url, body=body)
    assert status == 200 and json.loads(raw) == want
    assert upstream.call_counts()["zero_shot"] == before + 1
    assert json.loads(request(proxy.url, "GET", path="/stats")[2]) == {"calls": {"ok": 1}, "upstream_errors": 0}


@pytest.mark.parametrize("kind", ["500", "503", "429", "401"])
def test_proxy_error_statuses_do_not_reach_upstream(proxy: StubVendor, upstream: VendorHTTPServer, kind: str) -> None:
    before = upstream.call_counts()["zero_shot"]
    proxy.script[:] = [kind]
    status, headers, _ = request(proxy.url, body=zero_shot_body(4))
    assert status == int(kind)
    if kind == "429":
        assert headers["Retry-After"] == "0.2"  # fractional seconds
    assert upstream.call_counts()["zero_shot"] == before
    assert proxy.calls == {kind: 1}


@pytest.mark.parametrize("kind", ["wrong_labels", "missing_label", "not_probabilities", "nan"])
def test_proxy_damages_the_real_answer(proxy: StubVendor, upstream: VendorHTTPServer, kind: str) -> None:
    body = zero_shot_body(5)
    want = direct_answer(upstream, body)
    proxy.script[:] = [kind]
    status, _, raw = request(proxy.url, body=body)
    got = json.loads(raw)  # Python's json reads NaN
    assert status == 200 and proxy.calls == {kind: 1}
    if kind == "wrong_labels":
        assert [e["score"] for e in got] == [e["score"] for e in want]
        assert {e["label"] for e in got} != set(NAMES) and len({e["label"] for e in got} & set(NAMES)) == 3
    elif kind == "missing_label":
        assert got == want[:-1]
    elif kind == "not_probabilities":
        assert [e["score"] for e in got] == [2 * e["score"] for e in want]
    else:
        assert b"NaN" in raw and math.isnan(got[0]["score"]) and got[1:] == want[1:]
        assert got[0]["label"] == want[0]["label"]


def test_proxy_malformed_and_truncated(proxy: StubVendor) -> None:
    proxy.script[:] = ["malformed", "truncated"]
    status, _, raw = request(proxy.url, body=zero_shot_body(6))
    assert status == 200
    with pytest.raises(ValueError):
        json.loads(raw)
    with pytest.raises(http.client.IncompleteRead):
        request(proxy.url, body=zero_shot_body(6))
    assert proxy.calls == {"malformed": 1, "truncated": 1}


def test_proxy_timeout_hangs_past_the_client(proxy: StubVendor) -> None:
    proxy.script[:] = ["timeout"]
    with pytest.raises(TimeoutError):
        request(proxy.url, body=zero_shot_body(7), timeout=0.3)  # the stub hangs 1 s
    assert proxy.calls == {"timeout": 1}


def test_fault_rate_changes_while_serving(proxy: StubVendor, upstream: VendorHTTPServer) -> None:
    proxy.fault_rate, proxy.fault_kinds = 1.0, ("503",)
    assert [request(proxy.url, body=zero_shot_body(8))[0] for _ in range(3)] == [503] * 3
    proxy.fault_rate = 0.0
    assert [request(proxy.url, body=zero_shot_body(8))[0] for _ in range(2)] == [200] * 2
    proxy.fault_rate, proxy.fault_kinds = 0.5, ("500", "nan")
    statuses = [request(proxy.url, body=zero_shot_body(8))[0] for _ in range(40)]
    stats = json.loads(request(proxy.url, "GET", path="/stats")[2])["calls"]
    assert sum(stats.values()) == 45 and stats["503"] == 3
    assert statuses.count(500) == stats.get("500", 0) and 5 < stats["ok"] - 2 < 35


def test_upstream_failures_pass_through(proxy: StubVendor) -> None:
    status, _, raw = request(proxy.url, body=zero_shot_body(9, template="{} and {}"))  # the upstream refuses it
    assert status == 400 and "hypothesis_template" in json.loads(raw)["error"]
    dead = StubVendor(upstream="http://127.0.0.1:9/")  # nothing listens on the discard port
    serve_stub_in_thread(dead)
    try:
        status, _, raw = request(dead.url, body=zero_shot_body(9))
        assert status == 502 and "upstream unreachable" in json.loads(raw)["error"]
        assert dead.stats() == {"calls": {"ok": 1}, "upstream_errors": 1}
    finally:
        dead.shutdown()
        dead.server_close()
    assert proxy.stats()["upstream_errors"] == 1


def test_default_stub_is_unchanged_and_has_no_upstream_stats() -> None:
    stub = StubVendor()
    serve_stub_in_thread(stub)
    try:
        stub.script[:] = ["nan"]
        status, _, raw = request(stub.url, body=zero_shot_body(10))
        assert status == 200 and math.isnan(json.loads(raw)[0]["score"])
        assert json.loads(request(stub.url, "GET", path="/stats")[2]) == {"calls": {"nan": 1}}
    finally:
        stub.shutdown()
        stub.server_close()


def test_cli_upstream_flag(upstream: VendorHTTPServer) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "craft_adapter.testing.stub_vendor",
                             "--upstream", upstream.url + "/",
                             "--retry-after", "0.2", "--fault-rate", "0"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "proxy to" in line
        url = "http" + line.split(" at http", 1)[1].split()[0]
        body = zero_shot_body(11)
        status, _, raw = request(url, body=body)
        assert status == 200 and json.loads(raw) == direct_answer(upstream, body)
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
