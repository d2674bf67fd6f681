"""eval measures what ships: for every adapter kind, in-process eval, eval through the vendor and the runtime agree.

Kinds: soft (context vectors, in-process open_clip), text fitted through a zero-shot vendor (probabilities), text
fitted on an embedding model (cosine logits), the last evaluated through each embedding API protocol. Agreement
means the same predictions and probabilities within 1e-6; the CLI's confusion matrices are compared too.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import random_images
from typer.testing import CliRunner

from craft_adapter.blackbox.box import BlackBox
from craft_adapter.blackbox.meter import QueryMeter
from craft_adapter.cli import app
from craft_adapter.reference.local_vendor import make_vendor_server, serve_in_thread
from craft_adapter.serve import AdapterRuntime, ShippedAdapter, load_runtime
from craft_adapter.testing.fake_embedding_servers import FakeEmbeddingServer
from craft_adapter.training import api
from craft_adapter.training.config import FitConfig
from craft_adapter.training.evaluate import adapted_scores, evaluate_adapter, evaluate_runtime, stand_in_vendor
from craft_adapter.training.loop import fit
from craft_adapter.vendors.registry import make_vendor, register_vendor, unregister_vendor

CLASSES = ["bag", "coat", "sandal"]
HAND = "a photo of a {}."


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    return OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """12 training images and a 30-image test folder over three classes."""
    train = random_images(12, seed=11)
    test = random_images(30, seed=12)
    y_train, y_test = np.arange(12) % 3, np.arange(30) % 3
    root = tmp_path_factory.mktemp("eval_data")
    for i, (im, y) in enumerate(zip(test, y_test, strict=True)):
        (root / CLASSES[y]).mkdir(exist_ok=True)
        im.save(root / CLASSES[y] / f"{i}.png")
    return train, y_train, test, y_test, root


@pytest.fixture(scope="module")
def hf_vendor(backend):
    server = make_vendor_server(backend)
    thread = serve_in_thread(server)
    yield server.url
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def fit_adapter(vendor, task, prompt, budget, path):
    train, y_train, *_ = task
    cfg = FitConfig(shots=4, seed=1, budget=budget, prompt=prompt, popsize=4, intrinsic_dim=8, text_children=3,
                    text_elites=2, hidden=16, holdout_shots=0, concurrency=1)
    box = BlackBox(vendor, train, CLASSES, QueryMeter(cfg.resolved_budget, cfg.budget_unit))
    adapter = fit(box, None, y_train, None, cfg).adapter
    adapter.save(path)
    return adapter


def run_eval(*args):
    r = CliRunner().invoke(app, ["eval", *[str(a) for a in args]])
    return r


def agree(a, b):
    np.testing.assert_array_equal(a.probabilities.argmax(1), b.probabilities.argmax(1))
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6, rtol=0)


def check_all_agree(adapter, path, backend, model_dir, vendor, task, tmp_path, cli_vendor_args):
    *_, test, y_test, root = task
    stand_in = AdapterRuntime(ShippedAdapter.load(path), stand_in_vendor(backend, adapter.logit_kind))
    in_process = evaluate_runtime(stand_in, test, y_test, batch_size=7)
    through_vendor = evaluate_runtime(load_runtime(path, vendor), test, y_test, batch_size=7)
    runtime = load_runtime(path, vendor).predict(test)
    agree(in_process, through_vendor)
    agree(in_process, runtime)
    # the metered in-process path (demo) scores the same numbers: for a zero-shot adapter, the path of the old bug
    box = BlackBox(backend, test, CLASSES, QueryMeter())
    raw, refined = adapted_scores(box, adapter)
    np.testing.assert_allclose(softmax(refined), in_process.probabilities, atol=1e-6, rtol=0)
    np.testing.assert_allclose(raw, in_process.vendor_scores, atol=1e-6, rtol=0)
    assert evaluate_adapter(box, y_test, adapter, HAND)["adapted_accuracy"] == in_process.report()["adapted_accuracy"]
    # and the CLI, both ways, prints the same confusion matrix
    r1 = run_eval(path, "--data", root, "--model", f"local-dir:{model_dir}", "--device", "cpu",
                  "--json", tmp_path / "in.json")
    assert r1.exit_code == 0, r1.output
    r2 = run_eval(path, "--data", root, *cli_vendor_args, "--json", tmp_path / "vendor.json")
    assert r2.exit_code == 0, r2.output
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("in.json", "vendor.json"))
    assert a["confusion_matrix"] == b["confusion_matrix"] == in_process.confusion().tolist()
    assert a["adapted_accuracy"] == b["adapted_accuracy"] and a["scored_by"] == "in-process" != b["scored_by"]
    assert a["zero_shot_accuracy"] == b["zero_shot_accuracy"]
    assert sum(a["per_class_accuracy"][c] * 10 for c in CLASSES) == pytest.approx(30 * a["adapted_accuracy"])
    return a, b


def test_soft_adapter_agrees_and_a_string_api_is_refused(backend, tiny_model_dir, task, tmp_path):
    path = tmp_path / "soft.safetensors"
    adapter = fit_adapter(backend, task, "soft", 16, path)
    assert adapter.mode == "soft" and adapter.logit_kind == "logits"
    # a vendor that takes context vectors, reached through the registry as any protocol is
    register_vendor("in-process-soft", lambda url, *, key=None, model=None: backend)
    try:
        check_all_agree(adapter, path, backend, tiny_model_dir, make_vendor("in-process-soft", None), task, tmp_path,
                        ["--vendor", "http://127.0.0.1:9", "--protocol", "in-process-soft", "--device", "cpu"])
    finally:
        unregister_vendor("in-process-soft")
    with FakeEmbeddingServer("openai-embeddings", backend) as server:
        r = run_eval(path, "--data", task[4], "--vendor", server.url, "--protocol", "openai-embeddings")
        assert r.exit_code == 2 and "soft prompts" in r.output and server.requests == 0


def test_text_adapter_through_a_zero_shot_vendor_agrees(backend, tiny_model_dir, task, hf_vendor, tmp_path):
    path = tmp_path / "zs.safetensors"
    vendor = make_vendor("hf-zero-shot", hf_vendor)
    adapter = fit_adapter(vendor, task, "text", 60, path)
    assert adapter.mode == "text" and adapter.logit_kind == "probabilities"
    a, b = check_all_agree(adapter, path, backend, tiny_model_dir, vendor, task, tmp_path,
                           ["--vendor", hf_vendor, "--protocol", "hf-zero-shot", "--device", "cpu"])
    # refused: a default model standing in for someone's vendor, and a vendor of the other kind
    r = run_eval(path, "--data", task[4], "--device", "cpu")
    assert r.exit_code == 2 and "--vendor URL" in r.output
    with FakeEmbeddingServer("openai-embeddings", backend) as server:
        r = run_eval(path, "--data", task[4], "--vendor", server.url, "--protocol", "openai-embeddings")
        assert r.exit_code == 2 and "probabilities" in r.output


@pytest.mark.parametrize("protocol", ["openai-embeddings", "cohere", "voyage"])
def test_text_adapter_on_embeddings_agrees_through_each_embedding_api(backend, tiny_model_dir, task, tmp_path,
                                                                      protocol, monkeypatch):
    path = tmp_path / "emb.safetensors"
    adapter = fit_adapter(backend, task, "text", 30, path)
    assert adapter.mode == "text" and adapter.logit_kind == "logits"
    with FakeEmbeddingServer(protocol, backend, key="k-eval") as server:
        vendor = make_vendor(protocol, server.url, key="k-eval", max_images=8)
        monkeypatch.setenv("CRAFT_VENDOR_API_KEY", "k-eval")
        _, b = check_all_agree(adapter, path, backend, tiny_model_dir, vendor, task, tmp_path,
                               ["--vendor", server.url, "--protocol", protocol, "--device", "cpu"])
        assert b["vendor_calls"] == server.requests - vendor.calls  # the CLI's own client counted every call


def test_in_process_eval_refuses_other_weights(backend, reference_vendor_dir, task, tmp_path):
    path = tmp_path / "soft.safetensors"
    fit_adapter(backend, task, "soft", 8, path)
    r = run_eval(path, "--data", task[4], "--device", "cpu")  # the default model is the reference vendor
    assert r.exit_code == 2 and "fitted on open_clip" in r.output


def test_plot_and_missing_matplotlib(backend, tiny_model_dir, task, tmp_path, monkeypatch):
    path = tmp_path / "soft.safetensors"
    fit_adapter(backend, task, "soft", 8, path)
    args = [path, "--data", task[4], "--model", f"local-dir:{tiny_model_dir}", "--device", "cpu"]
    r = run_eval(*args, "--plot", tmp_path / "cm.png")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    r = run_eval(*args, "--plot", tmp_path / "cm2.png")
    assert r.exit_code == 2 and "needs matplotlib" in r.output


def test_an_adapter_with_an_embedding_head_agrees_and_eval_applies_the_head(backend, tiny_model_dir, task, hf_vendor,
                                                                           tmp_path):
    train, y_train, test, y_test, root = task
    cfg = FitConfig(shots=4, seed=1, budget=30, prompt="text", text_children=3, text_elites=2, hidden=16,
                    holdout_shots=1, embedding_head=True)
    adapter = api.fit_adapter(train, backend, cfg, labels=y_train, class_names=CLASSES).adapter
    path = adapter.save(tmp_path / "head.safetensors")
    assert adapter.head is not None
    with FakeEmbeddingServer("openai-embeddings", backend) as server:
        a, _ = check_all_agree(adapter, path, backend, tiny_model_dir, make_vendor("openai-embeddings", server.url),
                               task, tmp_path, ["--vendor", server.url, "--protocol", "openai-embeddings"])
    box = BlackBox(backend, test, CLASSES, QueryMeter())
    raw, with_head = adapted_scores(box, adapter)
    without = dataclasses.replace(adapter, head=None).refine(raw)
    assert np.abs(with_head - without).max() > 1e-3  # what eval printed is the head's
    assert a["adapted_accuracy"] == float((with_head.argmax(1) == y_test).mean())
    r = run_eval(path, "--data", root, "--vendor", hf_vendor, "--protocol", "hf-zero-shot")
    assert r.exit_code == 2 and "embedding head" in r.output and "Traceback" not in r.output
