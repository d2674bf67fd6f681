"""The local vendor on loopback, driven by the real huggingface_hub client, plain HTTP and the embedding client."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import random_images
from huggingface_hub import InferenceClient

from craft_adapter.artifact.synthetic import synthetic_adapter
from craft_adapter.blackbox.box import BlackBox
from craft_adapter.blackbox.meter import QueryMeter
from craft_adapter.reference.local_vendor import VendorHTTPServer, make_vendor_server, serve_in_thread
from craft_adapter.vendors.open_clip_backend import OpenClipBackend
from craft_adapter.vendors.protocols import fill

# isort: split
# (export/ and serve/ install as craft_adapter.export and .serve; ruff cannot place them, so they sort apart)
from craft_adapter.export import export_onnx
from craft_adapter.serve import EmbeddingApiVendor, HfInferenceVendor, HttpZeroShotVendor, load_runtime
from craft_adapter.vendors.http_clients import image_base64
from craft_adapter.vendors.replies import PROBABILITY_SUM_TOLERANCE, zero_shot_request, zero_shot_scores

NAMES = ["t-shirt", "trouser", "pullover", "dress"]


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> OpenClipBackend:
    return OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu")


@pytest.fixture(scope="module")
def server(backend: OpenClipBackend) -> Iterator[VendorHTTPServer]:
    srv = make_vendor_server(backend)
    serve_in_thread(srv)
    yield srv
    srv.shutdown()
    srv.server_close()


def in_process_scores(backend: OpenClipBackend, images: list, template: str, kind: str) -> np.ndarray:
    """What fit sees in process: cosine logits, or the HF-style softmax over the classes."""
    logits = backend.logit_scale * backend.embed_images(images) @ backend.embed_texts(
        [fill(template, c) for c in NAMES]).T
    return softmax(logits) if kind == "probabilities" else logits


def post(url: str, body: object) -> tuple[int, object]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_binds_to_loopback_by_default(server: VendorHTTPServer) -> None:
    assert server.server_address[0] == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")


def test_speaks_the_hugging_face_zero_shot_protocol(server: VendorHTTPServer, backend: OpenClipBackend) -> None:
    image = random_images(1, seed=3)[0]
    status, answer = post(server.url, {"inputs": image_base64(image), "parameters": {
        "candidate_labels": NAMES, "hypothesis_template": "a blurry photo of a {}."}})
    assert status == 200 and isinstance(answer, list)
    assert [set(e) for e in answer] == [{"label", "score"}] * len(NAMES)
    scores = [e["score"] for e in answer]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5
    want = in_process_scores(backend, [image], "a blurry photo of a {}.", "probabilities")[0]
    got = {e["label"]: e["score"] for e in answer}
    assert np.abs(np.array([got[c] for c in NAMES]) - want).max() <= 1e-6


def test_its_replies_pass_the_one_reply_rule_far_inside_the_sum_tolerance(server: VendorHTTPServer) -> None:
    """Its scores are float32 softmax outputs: they sum to 1 within ~1e-6, far inside the reply rule's slack."""
    labels = [f"class {k}" for k in range(10)] + NAMES
    worst = 0.0
    for image in random_images(20, seed=11):
        status, answer = post(server.url, zero_shot_request(image_base64(image), labels, "a photo of a {}."))
        scores = zero_shot_scores(answer, labels)  # refuses anything fit or the server would refuse
        worst = max(worst, abs(float(np.float64(scores).sum()) - 1))
    assert status == 200 and worst < PROBABILITY_SUM_TOLERANCE / 100


@pytest.mark.parametrize("body, status, message", [
    ({"inputs": "!!", "parameters": {"candidate_labels": NAMES}}, 400, "cannot decode the image"),
    ({"inputs": "", "parameters": {}}, 400, "candidate_labels"),
    ({"inputs": "", "parameters": {"candidate_labels": NAMES, "hypothesis_template": "no slot"}}, 400, "'{}'"),
    ([1, 2], 400, "JSON object"),
    (b"\x89PNG raw bytes", 400, "raw image bytes carry no labels"),
])
def test_bad_requests_get_a_json_error(server: VendorHTTPServer, body: object, status: int, message: str) -> None:
    code, answer = post(server.url, body)
    assert code == status and message in answer["error"]


def test_unknown_endpoint_is_404(server: VendorHTTPServer) -> None:
    assert post(server.url + "/nope", {})[0] == 404


@pytest.mark.parametrize("client", ["huggingface_hub", "plain_http"])
def test_runtime_through_the_vendor_equals_in_process(server: VendorHTTPServer, backend: OpenClipBackend,
                                                      tmp_path: Path, client: str) -> None:
    adapter = synthetic_adapter(len(NAMES), seed=6)
    adapter.class_names, adapter.template = list(NAMES), "a photo of a {}, catalogue style."
    onnx_path = export_onnx(adapter, tmp_path / "a.onnx").path
    vendor = HfInferenceVendor(InferenceClient(model=server.url)) if client == "huggingface_hub" \
        else HttpZeroShotVendor(server.url)
    runtime = load_runtime(onnx_path, vendor)
    images = random_images(5, seed=7)
    got = runtime.predict(images)
    want = softmax(adapter.refine(in_process_scores(backend, images, adapter.template, "probabilities")))
    assert got.labels == [NAMES[i] for i in want.argmax(1)]
    assert np.abs(got.probabilities - want).max() <= 1e-5
    assert runtime.predict_one(images[2]).label == got.labels[2]


def test_embedding_api_vendor(server: VendorHTTPServer, backend: OpenClipBackend, tmp_path: Path) -> None:
    vendor = EmbeddingApiVendor(server.url)
    images = random_images(4, seed=8)
    assert vendor.logit_scale == pytest.approx(backend.logit_scale, rel=1e-6)
    assert np.abs(vendor.embed_images(images) - backend.embed_images(images)).max() <= 1e-6
    adapter = synthetic_adapter(len(NAMES), logit_kind="logits", seed=9)
    adapter.class_names, adapter.logit_scale = list(NAMES), backend.logit_scale
    runtime = load_runtime(adapter.save(tmp_path / "a.safetensors"), vendor)
    want = softmax(adapter.refine(in_process_scores(backend, images, adapter.template, "logits")))
    got = runtime.predict(images)
    assert got.labels == [NAMES[i] for i in want.argmax(1)] and np.abs(got.probabilities - want).max() <= 1e-5


def test_http_clients_work_as_fit_backends(server: VendorHTTPServer, backend: OpenClipBackend) -> None:
    images = random_images(3, seed=10)
    meter = QueryMeter()
    box = BlackBox(HttpZeroShotVendor(server.url), images, list(NAMES), meter)
    scores = box.logits_text(["a photo of a {}."])  # [1, n, c]
    assert np.abs(scores[0] - in_process_scores(backend, images, "a photo of a {}.", "probabilities")).max() <= 1e-6
    assert meter.vendor_calls == 3 and meter.queries == 1


VENDOR_CLI = "import typer; from craft_adapter.cli.shipping import register; app = typer.Typer(); " \
             "app.callback()(lambda: None); register(app); app()"


def test_vendor_command_serves_on_loopback(tiny_model_dir: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", VENDOR_CLI, "vendor", "--model", f"local-dir:{tiny_model_dir}",
                             "--port", "0", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving ") and " at http://127.0.0.1:" in line, proc.stderr.read()
        url = line.split(" at ")[1].strip()
        with urllib.request.urlopen(url + "/info", timeout=30) as r:
            info = json.loads(r.read())
        assert info["embed_dim"] == 32 and info["logit_scale"] > 0
        status, answer = post(url, {"inputs": image_base64(random_images(1)[0]),
                                    "parameters": {"candidate_labels": ["a", "b"]}})
        assert status == 200 and {e["label"] for e in answer} == {"a", "b"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
