"""The torch-free runtime: same predictions as the numpy reference, from .safetensors and .onnx, and loud failures."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import random_images

from craft_adapter.artifact.adapter_file import Adapter, AdapterError
from craft_adapter.artifact.synthetic import synthetic_adapter

# isort: split
# (export/ and serve/ install as craft_adapter.export and .serve; ruff cannot place them, so they sort apart)
from craft_adapter.artifact.onnx_graph import build_refiner_onnx
from craft_adapter.export import export_onnx
from craft_adapter.serve import CallableVendor, HttpZeroShotVendor, VendorError, load_runtime

C = 10


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def vendor_scores(n: int, kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(20, 3, (n, C)).astype(np.float32)
    return softmax(logits).astype(np.float32) if kind == "probabilities" else logits


@pytest.fixture(scope="module", params=["probabilities", "logits"])
def shipped(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Adapter, Path, Path]:
    """One adapter as .safetensors and as an exported .onnx."""
    adapter = synthetic_adapter(C, logit_kind=request.param, seed=4)
    d = tmp_path_factory.mktemp(request.param)
    st = adapter.save(d / "adapter.safetensors")
    return adapter, st, export_onnx(st).path


@pytest.mark.parametrize("which", ["safetensors", "onnx"])
def test_predictions_equal_the_numpy_reference(shipped: tuple[Adapter, Path, Path], which: str) -> None:
    adapter, st, onnx_path = shipped
    images = random_images(6)
    scores = vendor_scores(6, adapter.logit_kind)
    seen: list[tuple[int, list[str]]] = []

    def vendor(imgs: list, prompts: list[str]) -> np.ndarray:
        seen.append((len(imgs), prompts))
        return scores[[images.index(im) for im in imgs]]

    runtime = load_runtime(st if which == "safetensors" else onnx_path, vendor)
    assert runtime.adapter.providers[-1] == "CPUExecutionProvider"
    batch = runtime.predict(images)
    want = softmax(adapter.refine(scores))
    assert np.abs(batch.probabilities - want).max() <= 1e-5
    assert batch.labels == [adapter.class_names[i] for i in want.argmax(1)]
    one = runtime.predict_one(images[3])
    assert one.label == batch.labels[3] and abs(one.probability - want[3].max()) <= 1e-5
    assert set(one.probabilities) == set(adapter.class_names)
    # the vendor got the learned prompt, one per class, in the adapter's class order
    assert seen[0] == (6, [adapter.template.replace("{}", c) for c in adapter.class_names])


def test_safetensors_and_onnx_serve_the_same(shipped: tuple[Adapter, Path, Path]) -> None:
    adapter, st, onnx_path = shipped
    scores = vendor_scores(300, adapter.logit_kind, seed=1)
    a = load_runtime(st, CallableVendor(lambda i, p: None)).predict_scores(scores)
    b = load_runtime(onnx_path, CallableVendor(lambda i, p: None)).predict_scores(scores)
    assert a.labels == b.labels and np.abs(a.probabilities - b.probabilities).max() <= 1e-6


def test_session_is_single_threaded_without_spinning(shipped: tuple[Adapter, Path, Path]) -> None:
    opts = load_runtime(shipped[2], lambda i, p: None).adapter.session.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


# -- loud failures ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_fail(shipped: tuple[Adapter, Path, Path], bad: float) -> None:
    scores = vendor_scores(3, shipped[0].logit_kind)
    scores[1, 4] = bad
    runtime = load_runtime(shipped[2], lambda images, prompts: scores)
    with pytest.raises(VendorError, match=r"NaN or inf scores for image\(s\) \[1\]"):
        runtime.predict(random_images(3))


@pytest.mark.parametrize("shape", [(3, C - 1), (3, C + 1), (2, C), (3,)])
def test_wrong_number_of_scores_fails(shipped: tuple[Adapter, Path, Path], shape: tuple[int, ...]) -> None:
    runtime = load_runtime(shipped[2], lambda images, prompts: np.full(shape, 0.1, np.float32))
    with pytest.raises(VendorError, match=rf"expected \(3, {C}\).*class order"):
        runtime.predict(random_images(3))


def test_ragged_scores_fail(shipped: tuple[Adapter, Path, Path]) -> None:
    runtime = load_runtime(shipped[2], lambda images, prompts: [[0.1] * C, [0.1] * (C - 2)])
    with pytest.raises(VendorError, match=rf"not a numeric array.*2 rows of {C} numbers"):
        runtime.predict(random_images(2))


class _WrongLabels(BaseHTTPRequestHandler):
    """A zero-shot endpoint that renames one label, as a vendor that normalises case would."""

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        labels = body["parameters"]["candidate_labels"]
        answer = [{"label": lab.upper() if i == 0 else lab, "score": 1 / len(labels)} for i, lab in enumerate(labels)]
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def wrong_label_vendor() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _WrongLabels)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_class_names_the_vendor_does_not_return_fail(tmp_path: Path, wrong_label_vendor: str) -> None:
    path = synthetic_adapter(C).save(tmp_path / "a.safetensors")
    runtime = load_runtime(path, HttpZeroShotVendor(wrong_label_vendor))
    with pytest.raises(VendorError, match=r"no score for classes \['class 0'\].*\['CLASS 0'\].*unchanged"):
        runtime.predict_one(random_images(1)[0])


@pytest.mark.parametrize("suffix", [".safetensors", ".onnx"])
def test_adapter_from_a_newer_format_fails(tmp_path: Path, suffix: str) -> None:
    adapter = synthetic_adapter(C)
    adapter.format_version = 7
    path = tmp_path / f"future{suffix}"
    path.write_bytes(adapter.to_bytes() if suffix == ".safetensors" else build_refiner_onnx(adapter))
    with pytest.raises(AdapterError, match="format_version 7 is newer.*upgrade craft-adapter"):
        load_runtime(path, lambda images, prompts: None)


def test_vendor_of_the_wrong_kind_fails(tmp_path: Path) -> None:
    path = synthetic_adapter(C, logit_kind="probabilities").save(tmp_path / "a.safetensors")
    with pytest.raises(AdapterError, match="fitted on vendor probabilities, but this vendor returns logits"):
        load_runtime(path, CallableVendor(lambda i, p: None, returns="logits"))


def test_soft_prompt_adapter_refuses_a_string_vendor(tmp_path: Path) -> None:
    a = synthetic_adapter(C)
    soft = Adapter(a.class_names, a.template, "soft", a.logit_kind, 100.0, a.refiner,
                   ctx=np.zeros((4, 8), np.float32))
    with pytest.raises(AdapterError, match="soft prompts.*string API"):
        load_runtime(soft.save(tmp_path / "soft.safetensors"), lambda i, p: None)


def test_not_an_adapter_fails(tmp_path: Path) -> None:
    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    with pytest.raises(AdapterError, match="onnxruntime cannot load it"):
        load_runtime(tmp_path / "x.onnx", lambda i, p: None)
    with pytest.raises(AdapterError, match=r"\.safetensors file or an exported \.onnx"):
        load_runtime(tmp_path / "x.pt", lambda i, p: None)


# -- without torch ----------------------------------------------------------------------------------------------
# A fresh interpreter where importing torch, open_clip, huggingface_hub or onnx raises: serving an exported .onnx
# needs only numpy, PIL, safetensors and onnxruntime.

TORCH_FREE = r"""
import importlib.abc, json, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "torchvision", "open_clip", "open_clip_train", "huggingface_hub", "onnx"}:
            raise ImportError(f"{name} is blocked: the runtime must not need it")
        return None

sys.meta_path.insert(0, Blocked())
import numpy as np
from PIL import Image
from craft_adapter.serve import CallableVendor, load_runtime

path, n = sys.argv[1], int(sys.argv[2])
scores = np.linspace(0.01, 1.0, n, dtype=np.float32)[None] / np.float32(50.5)
runtime = load_runtime(path, CallableVendor(lambda images, prompts: scores.repeat(len(images), 0)))  # device auto
p = runtime.predict_one(Image.new("L", (28, 28)))
from craft_adapter.testing.import_guard import serve_violations
heavy = serve_violations(sys.modules)
print(json.dumps({"label": p.label, "probability": p.probability, "heavy": heavy,
                  "providers": runtime.adapter.providers}))
"""


def test_runtime_imports_and_predicts_without_torch(tmp_path: Path) -> None:
    adapter = synthetic_adapter(C, seed=5)
    path = export_onnx(adapter, tmp_path / "a.onnx").path
    done = subprocess.run([sys.executable, "-c", TORCH_FREE, str(path), str(C)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no onnxruntime error spam while choosing providers
    got = json.loads(done.stdout)
    scores = np.linspace(0.01, 1.0, C, dtype=np.float32)[None] / np.float32(50.5)
    want = softmax(adapter.refine(scores))[0]
    assert got["label"] == adapter.class_names[want.argmax()] and abs(got["probability"] - want.max()) <= 1e-5
    assert got["heavy"] == [] and got["providers"][-1] == "CPUExecutionProvider"


# -- an adapter with an embedding head ---------------------------------------------------------------------------

HEAD_CLASSES = ["bag", "coat", "sandal"]


@pytest.fixture(scope="module")
def tiny_backend(tiny_model_dir: Path):
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    return OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu")


@pytest.fixture(scope="module")
def head_fit(tiny_backend, tmp_path_factory: pytest.TempPathFactory):
    """A text adapter with an embedding head, fitted through a loopback openai-embeddings server (kept running)."""
    from craft_adapter.testing.fake_embedding_servers import FakeEmbeddingServer
    from craft_adapter.training.api import fit_adapter
    from craft_adapter.training.config import FitConfig
    from craft_adapter.vendors.registry import make_vendor

    cfg = FitConfig(shots=5, seed=1, budget=30, prompt="text", text_children=2, text_elites=1, hidden=8,
                    vocab_size=20, holdout_shots=1, eval_every=2, embedding_head=True)
    images, labels = random_images(15, seed=71), np.arange(15) % 3
    with FakeEmbeddingServer("openai-embeddings", tiny_backend) as api:
        adapter = fit_adapter(images, make_vendor("openai-embeddings", api.url), cfg, labels=labels,
                              class_names=HEAD_CLASSES).adapter
        path = adapter.save(tmp_path_factory.mktemp("head") / "head.safetensors")
        yield adapter, path, api


@pytest.mark.parametrize("which", ["safetensors", "onnx"])
def test_a_head_adapter_over_an_embedding_api_predicts_what_evaluate_does(head_fit, which: str) -> None:
    from craft_adapter.blackbox.box import BlackBox
    from craft_adapter.blackbox.meter import QueryMeter
    from craft_adapter.training.evaluate import adapted_scores, evaluate_runtime
    from craft_adapter.vendors.registry import make_vendor

    adapter, path, api = head_fit
    shipped = path if which == "safetensors" else export_onnx(path, path.with_suffix(".onnx")).path
    test, labels = random_images(24, seed=72), np.arange(24) % 3
    runtime = load_runtime(shipped, make_vendor("openai-embeddings", api.url), device="cpu")
    got = runtime.predict(test)
    box = BlackBox(make_vendor("openai-embeddings", api.url), test, HEAD_CLASSES, QueryMeter())
    box.use_logit_scale(adapter.logit_scale)
    raw, refined = adapted_scores(box, adapter)  # eval's in-process path: the box's scores and embeddings
    np.testing.assert_allclose(got.refined_logits, refined, atol=1e-4)
    assert list(got.indices) == list(refined.argmax(1))
    ev = evaluate_runtime(runtime, test, labels, batch_size=10)  # batches: embeddings follow their scores
    np.testing.assert_allclose(ev.probabilities, got.probabilities, atol=1e-6)
    headless = Adapter.from_bytes(path.read_bytes())
    headless.head = None
    assert np.abs(refined - headless.refine(raw)).max() > 1e-3  # the head took part


def test_a_head_adapter_is_refused_in_front_of_a_vendor_that_returns_only_scores(head_fit) -> None:
    _, path, _ = head_fit
    for vendor in (HttpZeroShotVendor("http://127.0.0.1:9"), CallableVendor(lambda i, p: None, returns="logits"),
                   lambda images, prompts: None):
        with pytest.raises(AdapterError, match="has an embedding head.*returns only scores"):
            load_runtime(path, vendor)


def test_a_vendor_of_another_width_is_a_clear_error_at_its_first_answer(tiny_backend, tmp_path: Path) -> None:
    narrow = dataclasses.replace(synthetic_adapter(3, 8, logit_kind="logits"), class_names=HEAD_CLASSES,
                                 head=np.zeros((3, 16), np.float32))  # the tiny model's embeddings are 32 wide
    runtime = load_runtime(narrow.save(tmp_path / "narrow.safetensors"), tiny_backend)
    with pytest.raises(AdapterError, match="reads 16-dimensional embeddings, but the vendor returns 32"):
        runtime.predict(random_images(2))
    with pytest.raises(AdapterError, match="needs the image embeddings"):
        runtime.predict_scores(np.zeros((2, 3), np.float32))
