"""The adapter server as deployed: `craft-adapter serve` in a subprocess on loopback, a stub vendor, real clients.

Every expected answer is computed independently: the stub's scores come from ``stub_probabilities`` and the
refinement from the adapter's numpy reference forward.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import random_images
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from server_process import ServerProcess

from craft_adapter.artifact.adapter_file import Adapter
from craft_adapter.artifact.synthetic import synthetic_adapter

# isort: split
# (serve/ installs as craft_adapter.serve; ruff cannot place it, so it sorts apart)
from craft_adapter.testing.stub_vendor import StubVendor, running_stub, stub_probabilities

NAMES = ["t-shirt", "trouser", "pullover", "dress"]
SECRET = "sk-test-9f3b2c71d4e8a6"  # must never appear in anything the server says or logs
SERVER_ARGS = ["--port", "0", "--vendor-timeout", "0.5", "--request-timeout", "4", "--retries", "1",
               "--backoff", "0.01", "--max-batch", "4", "--max-body-bytes", "60000", "--max-image-pixels", "20000"]
STOPPED = (0, -15)  # uvicorn re-raises SIGTERM once its graceful shutdown is done
SEEN: list[str] = []  # every response body and header the tests received, scanned for the key at the end


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Adapter, Path]:
    a = synthetic_adapter(len(NAMES), seed=11)
    a.class_names = list(NAMES)
    return a, a.save(tmp_path_factory.mktemp("adapter") / "a.safetensors")


@pytest.fixture(scope="module")
def stub() -> Iterator[StubVendor]:
    with running_stub(hang_s=1.0, retry_after="0") as s:
        yield s


@pytest.fixture(autouse=True)
def clean_stub(stub: StubVendor) -> Iterator[None]:
    stub.script.clear()
    stub.latency_s, stub.retry_after = 0.0, "0"
    yield
    stub.script.clear()


@pytest.fixture(scope="module")
def server(adapter: tuple[Adapter, Path], stub: StubVendor, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    srv = ServerProcess([str(adapter[1]), "--vendor", stub.url + "/", *SERVER_ARGS], log,
                        env={"CRAFT_VENDOR_API_KEY": SECRET})
    yield srv
    srv.stop()


def call(method: str, url: str, **kw: object) -> httpx.Response:
    r = httpx.request(method, url, timeout=20, **kw)
    SEEN.append(r.text + json.dumps(dict(r.headers)))
    return r


def expected(adapter: Adapter, image_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The stub's scores for these bytes and the refined probabilities the server must answer."""
    vendor = stub_probabilities(base64.b64encode(image_bytes).decode(), NAMES).astype(np.float32)
    return vendor, softmax(adapter.refine(vendor[None]))[0]


def assert_answer(answer: dict, adapter: Adapter, image_bytes: bytes, top_k: int = 4) -> None:
    _, want = expected(adapter, image_bytes)
    assert answer["label"] == NAMES[int(want.argmax())]
    assert answer["probability"] == pytest.approx(float(want.max()), abs=1e-5)
    assert [e["label"] for e in answer["top"]] == [NAMES[i] for i in np.argsort(-want, kind="stable")[:top_k]]
    assert [e["probability"] for e in answer["top"]] == pytest.approx(sorted(want, reverse=True)[:top_k], abs=1e-5)


# -- classify ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["raw", "octet", "multipart", "json"])
def test_classify_one_image_every_encoding(server: ServerProcess, adapter: tuple, how: str) -> None:
    data = png(random_images(1, seed=21)[0])
    kw = {"raw": {"content": data, "headers": {"Content-Type": "image/png"}},
          "octet": {"content": data, "headers": {"Content-Type": "application/octet-stream"}},
          "multipart": {"files": {"image": ("x.png", data, "image/png")}},
          "json": {"json": {"image": base64.b64encode(data).decode()}}}[how]
    r = call("POST", server.url + "/v1/classify", **kw)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] and "vendor_scores" not in r.json()
    assert_answer(r.json(), adapter[0], data)


def test_classify_top_k_and_vendor_scores(server: ServerProcess, adapter: tuple) -> None:
    data = png(random_images(1, seed=22)[0])
    r = call("POST", server.url + "/v1/classify?top_k=2&vendor_scores=true", content=data,
             headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert_answer(r.json(), adapter[0], data, top_k=2)
    vendor, _ = expected(adapter[0], data)
    assert [r.json()["vendor_scores"][c] for c in NAMES] == pytest.approx(vendor.tolist(), abs=1e-6)


@pytest.mark.parametrize("how", ["multipart", "json"])
def test_batch_answers_every_image_in_order(server: ServerProcess, adapter: tuple, how: str) -> None:
    datas = [png(im) for im in random_images(3, seed=23)]
    kw = {"files": [("images", (f"{i}.png", d, "image/png")) for i, d in enumerate(datas)]} if how == "multipart" \
        else {"json": {"images": [base64.b64encode(d).decode() for d in datas]}}
    r = call("POST", server.url + "/v1/classify/batch?vendor_scores=1", **kw)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3
    for answer, d in zip(results, datas, strict=True):
        assert_answer(answer, adapter[0], d)
        assert answer["vendor_scores"]["dress"] == pytest.approx(float(expected(adapter[0], d)[0][3]), abs=1e-6)


# -- the Hugging Face shape, driven by the real client ---------------------------------------------------------

def test_hugging_face_client_gets_refined_answers(server: ServerProcess, adapter: tuple) -> None:
    data = png(random_images(1, seed=24)[0])
    _, want = expected(adapter[0], data)
    client = InferenceClient(model=server.url)
    answer = client.zero_shot_image_classification(data, candidate_labels=list(NAMES))
    assert [e.label for e in answer] == [NAMES[i] for i in np.argsort(-want, kind="stable")]
    assert [e.score for e in answer] == pytest.approx(sorted(want, reverse=True), abs=1e-5)
    subset = client.zero_shot_image_classification(data, candidate_labels=["dress", "trouser"])
    pair = want[[3, 1]] / want[[3, 1]].sum()
    assert {e.label: e.score for e in subset} == pytest.approx({"dress": pair[0], "trouser": pair[1]}, abs=1e-5)


def test_hugging_face_client_sees_clear_errors(server: ServerProcess) -> None:
    client = InferenceClient(model=server.url)
    with pytest.raises(HfHubHTTPError) as e:
        client.zero_shot_image_classification(png(random_images(1)[0]), candidate_labels=["dress", "cat"])
    assert e.value.response.status_code == 400 and "not classes of this adapter" in str(e.value)


def test_hugging_face_json_on_the_task_path(server: ServerProcess, adapter: tuple) -> None:
    data = png(random_images(1, seed=25)[0])
    r = call("POST", server.url + "/zero-shot-image-classification",
             json={"inputs": base64.b64encode(data).decode(), "parameters": {"hypothesis_template": "x {}"}})
    assert r.status_code == 200, r.text
    _, want = expected(adapter[0], data)
    want_by_label = dict(zip(NAMES, want.tolist(), strict=True))
    assert {e["label"]: e["score"] for e in r.json()} == pytest.approx(want_by_label, abs=1e-5)


def test_hugging_face_raw_image_bytes(server: ServerProcess, adapter: tuple) -> None:
    data = png(random_images(1, seed=28)[0])
    r = call("POST", server.url + "/", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    _, want = expected(adapter[0], data)
    assert [e["label"] for e in r.json()] == [NAMES[i] for i in np.argsort(-want, kind="stable")]


# -- health, readiness, info, metrics ------------------------------------------------------------------------------

def test_health_ready_info(server: ServerProcess, stub: StubVendor) -> None:
    assert call("GET", server.url + "/healthz").json() == {"status": "ok"}
    assert call("GET", server.url + "/readyz").status_code == 200
    info = call("GET", server.url + "/v1/info").json()
    assert info["adapter"]["classes"] == NAMES and info["vendor"]["url"] == stub.url + "/"
    assert info["vendor"]["authenticated"] is True


def test_metrics_count_requests_latency_and_vendor_calls(server: ServerProcess) -> None:
    data = png(random_images(1, seed=26)[0])
    before = call("GET", server.url + "/metrics").text
    assert call("POST", server.url + "/v1/classify", content=data, headers={"Content-Type": "image/png"}).is_success
    text = call("GET", server.url + "/metrics").text

    def value(body: str, series: str) -> float:
        lines = [ln for ln in body.splitlines() if ln.startswith(series + " ")]
        return float(lines[0].split()[-1]) if lines else 0.0

    ok = 'craft_adapter_requests_total{endpoint="classify",status="200"}'
    assert value(text, ok) == value(before, ok) + 1
    calls = 'craft_adapter_vendor_calls_total{outcome="ok"}'
    assert value(text, calls) == value(before, calls) + 1
    assert 'craft_adapter_request_duration_seconds_bucket{endpoint="classify",le="+Inf"}' in text
    assert "# TYPE craft_adapter_requests_in_flight gauge" in text and "craft_adapter_vendor_calls_in_flight 0" in text
    assert "# TYPE craft_adapter_vendor_errors_total counter" in text


# -- every client error status -----------------------------------------------------------------------------------

BIG = png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)))  # > 60 kB
WIDE = png(Image.new("L", (200, 200)))  # small file, 40,000 pixels > 20,000
TINY = png(random_images(1)[0])


@pytest.mark.parametrize("path, kw, status, type_", [
    ("/v1/classify", {"content": TINY[:60], "headers": {"Content-Type": "image/png"}}, 400, "bad_image"),
    ("/v1/classify", {"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "bad_image"),
    ("/v1/classify", {"json": {"image": "not base64!"}}, 400, "bad_base64"),
    ("/v1/classify", {"content": b"{nope", "headers": {"Content-Type": "application/json"}}, 400, "bad_json"),
    ("/v1/classify?top_k=9", {"content": TINY, "headers": {"Content-Type": "image/png"}}, 400, "bad_request"),
    ("/v1/classify", {"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
    ("/v1/classify", {"content": b"GIF? no, text", "headers": {"Content-Type": "image/gif"}}, 415,
     "unsupported_image"),
    ("/v1/classify/batch", {"content": TINY, "headers": {"Content-Type": "image/png"}}, 415,
     "unsupported_media_type"),
    ("/v1/classify", {"content": BIG, "headers": {"Content-Type": "image/png"}}, 413, "body_too_large"),
    ("/v1/classify", {"content": WIDE, "headers": {"Content-Type": "image/png"}}, 413, "image_too_large"),
    ("/v1/classify/batch", {"json": {"images": [base64.b64encode(TINY).decode()] * 5}}, 413, "batch_too_large"),
    ("/v1/classify/batch", {"files": [("images", ("x.png", TINY, "image/png"))] * 5}, 413, "bad_multipart"),
    ("/v1/classify", {"files": [("images", ("x.png", TINY, "image/png"))] * 2}, 400, "bad_request"),
    ("/", {"json": {"inputs": base64.b64encode(TINY).decode(), "parameters": {"candidate_labels": "dress"}}},
     400, "bad_request"),
    ("/nowhere", {"content": TINY}, 404, "not_found"),
])
def test_client_errors_are_typed(server: ServerProcess, stub: StubVendor, path: str, kw: dict, status: int,
                                 type_: str) -> None:
    calls = sum(stub.calls.values())
    r = call("POST", server.url + path, **kw)
    assert (r.status_code, r.json()["type"]) == (status, type_), r.text
    assert r.json()["error"]
    assert sum(stub.calls.values()) == calls  # refused before any vendor call


# -- vendor faults: retried, or a clear error; never an answer from a bad reply ------------------------------------

@pytest.mark.parametrize("faults, status, type_", [
    (["500", "500"], 502, "vendor_error"),
    (["503", "500"], 502, "vendor_error"),
    (["malformed", "malformed"], 502, "vendor_bad_reply"),
    (["truncated", "truncated"], 502, "vendor_error"),
    (["wrong_labels", "missing_label"], 502, "vendor_bad_reply"),
    (["not_probabilities", "wrong_labels"], 502, "vendor_bad_reply"),
    (["timeout", "timeout"], 504, "vendor_timeout"),
    (["401"], 502, "vendor_rejected"),
])
def test_vendor_faults_become_clear_errors(server: ServerProcess, stub: StubVendor, faults: list[str], status: int,
                                           type_: str) -> None:
    stub.script[:] = faults
    r = call("POST", server.url + "/v1/classify", content=TINY, headers={"Content-Type": "image/png"})
    assert (r.status_code, r.json()["type"]) == (status, type_), r.text
    assert not stub.script  # every scripted fault was met: retried as configured (1 retry), and not beyond


@pytest.mark.parametrize("fault", ["500", "429", "malformed", "wrong_labels", "timeout", "truncated"])
def test_one_fault_is_retried_to_a_correct_answer(server: ServerProcess, stub: StubVendor, adapter: tuple,
                                                  fault: str) -> None:
    stub.script[:] = [fault]
    r = call("POST", server.url + "/v1/classify", content=TINY, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert_answer(r.json(), adapter[0], TINY)
    assert not stub.script


def test_rate_limit_past_the_deadline_is_503_with_retry_after(server: ServerProcess, stub: StubVendor) -> None:
    stub.retry_after, stub.script[:] = "30", ["429"]  # longer than the 4 s request timeout: give up at once
    started = time.monotonic()
    r = call("POST", server.url + "/v1/classify", content=TINY, headers={"Content-Type": "image/png"})
    assert (r.status_code, r.json()["type"]) == (503, "vendor_rate_limited")
    assert r.headers["retry-after"] == "30" and time.monotonic() - started < 2


def test_retry_after_is_honoured(server: ServerProcess, stub: StubVendor) -> None:
    stub.retry_after, stub.script[:] = "1", ["429"]
    started = time.monotonic()
    r = call("POST", server.url + "/v1/classify", content=TINY, headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and time.monotonic() - started >= 1.0


def test_a_batch_with_one_bad_reply_fails_whole(server: ServerProcess, stub: StubVendor) -> None:
    stub.fault_rate, stub.fault_kinds = 1.0, ("wrong_labels",)
    try:
        r = call("POST", server.url + "/v1/classify/batch",
                 json={"images": [base64.b64encode(png(im)).decode() for im in random_images(2, seed=27)]})
    finally:
        stub.fault_rate = 0.0
    assert (r.status_code, r.json()["type"]) == (502, "vendor_bad_reply") and "results" not in r.json()


def test_vendor_down_is_503_and_not_ready(adapter: tuple, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/"
    srv = ServerProcess([str(adapter[1]), "--port", "0"], tmp_path / "log",
                        env={"CRAFT_SERVE_VENDOR_URL": dead, "CRAFT_SERVE_VENDOR_RETRIES": "0"})
    try:
        r = call("POST", srv.url + "/v1/classify", content=TINY, headers={"Content-Type": "image/png"})
        assert (r.status_code, r.json()["type"]) == (503, "vendor_unreachable") and "cannot connect" in r.text
        ready = call("GET", srv.url + "/readyz")
        assert ready.status_code == 503 and "does not accept connections" in ready.json()["error"]
    finally:
        assert srv.stop() in STOPPED


# -- the key -----------------------------------------------------------------------------------------------------

def test_key_is_sent_to_the_vendor_and_never_leaks(server: ServerProcess, stub: StubVendor) -> None:
    stub.script[:] = ["401"]  # the vendor echoes our Authorization header in its error
    r = call("POST", server.url + "/v1/classify", content=TINY, headers={"Content-Type": "image/png"})
    assert r.status_code == 502 and "invalid credentials Bearer ***" in r.json()["error"]
    assert stub.last_headers.get("Authorization") == f"Bearer {SECRET}"
    call("GET", server.url + "/metrics")
    call("GET", server.url + "/v1/info")
    log = server.log()
    assert '"logger": "craft_adapter.access"' in log and '"status": 502' in log
    for text in [*SEEN, log]:
        assert SECRET not in text and SECRET[-8:] not in text


# -- operations ----------------------------------------------------------------------------------------------------

def test_access_log_is_one_json_object_per_request(server: ServerProcess) -> None:
    call("POST", server.url + "/v1/classify", content=b"nope", headers={"Content-Type": "image/png",
                                                                          "X-Request-ID": "req-abc-123"})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "req-abc-123" not in server.log():
        time.sleep(0.05)
    entries = [json.loads(line) for line in server.log().splitlines()]  # every line is JSON
    mine = [e for e in entries if e.get("request_id") == "req-abc-123"]
    assert len(mine) == 1
    assert mine[0]["status"] == 415 and mine[0]["error_type"] == "unsupported_image"
    assert mine[0]["logger"] == "craft_adapter.access" and mine[0]["endpoint"] == "classify"
    assert mine[0]["duration_ms"] > 0 and mine[0]["request_bytes"] == 4


def test_graceful_shutdown_finishes_requests_in_flight(adapter: tuple, stub: StubVendor, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    srv = ServerProcess([str(adapter[1]), "--vendor", stub.url, "--port", "0", "--vendor-timeout", "5",
                         "--key-file", str(key_file)], tmp_path / "log")
    stub.latency_s = 1.0
    got: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: got.append(call(
        "POST", srv.url + "/v1/classify", content=TINY, headers={"Content-Type": "image/png"})))
    worker.start()
    time.sleep(0.4)  # the request is now waiting on the vendor
    srv.terminate()
    worker.join(10)
    assert srv.stop() in STOPPED
    assert got and got[0].status_code == 200, got
    assert stub.last_headers.get("Authorization") == f"Bearer {SECRET}"  # read from the file
    lines = [json.loads(line) for line in srv.log().splitlines()]
    assert any(e.get("event") == "shutdown" for e in lines)
    assert SECRET not in srv.log()


def test_vendor_calls_in_flight_are_bounded(adapter: tuple, stub: StubVendor, tmp_path: Path) -> None:
    srv = ServerProcess([str(adapter[1]), "--vendor", stub.url, "--port", "0", "--max-vendor-in-flight", "2"],
                        tmp_path / "log")
    stub.latency_s, stub.max_in_flight = 0.2, 0
    try:
        body = {"images": [base64.b64encode(png(im)).decode() for im in random_images(3, seed=29)]}
        got: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: got.append(call("POST", srv.url + "/v1/classify/batch", json=body)))
                   for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert [r.status_code for r in got] == [200] * 3
        assert stub.max_in_flight == 2  # 9 vendor calls wanted at once; never more than 2 open
    finally:
        assert srv.stop() in STOPPED


def test_several_workers_serve_one_port(adapter: tuple, stub: StubVendor, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = ServerProcess([str(adapter[1]), "--vendor", stub.url, "--port", str(port), "--workers", "2"],
                        tmp_path / "log")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and srv.log().count('"event": "startup"') < 2:
            time.sleep(0.1)
        for _ in range(4):
            assert call("POST", srv.url + "/v1/classify", content=TINY, headers={"Content-Type": "image/png"}
                        ).status_code == 200
        pids = {e["pid"] for e in map(json.loads, srv.log().splitlines()) if e.get("event") == "startup"}
        assert len(pids) == 2
    finally:
        assert srv.stop() in STOPPED
