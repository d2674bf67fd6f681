"""Text-mode fits through each embedding API protocol, end to end, on loopback servers backed by the tiny model.

Each protocol: ``fit --vendor URL --protocol NAME`` (budget in vendor calls, equal to the server's own request count),
the temperature chosen from the few-shot data and recorded, ``fit --resume`` taking the protocol from the manifest,
then ``eval --vendor --protocol`` agreeing with the runtime. Through the Python API: chunked requests charged
exactly what is sent, a replayed fit charged the same and paying nothing, and URLs checked in one place.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import random_images
from typer.testing import CliRunner

from craft_adapter.artifact.adapter_file import Adapter
from craft_adapter.blackbox.query_cache import QueryCache
from craft_adapter.cli import app
from craft_adapter.serve import load_runtime
from craft_adapter.testing.fake_embedding_servers import FakeEmbeddingServer
from craft_adapter.training.api import SettingsError, few_shot_set, fit_adapter
from craft_adapter.training.config import FitConfig
from craft_adapter.training.image_sets import split_holdout
from craft_adapter.training.temperature import choose_logit_scale
from craft_adapter.vendors.registry import make_vendor

PROTOCOLS = ("openai-embeddings", "cohere", "voyage")
CLASSES = ["bag", "coat", "sandal"]
KEY = "k-fit-protocols-0123"
SMALL = ["--shots", "4", "--seed", "1", "--prompt", "text", "--text-children", "3", "--text-elites", "2",
         "--hidden", "16", "--vocab-size", "50", "--holdout-shots", "1", "--eval-every", "2"]


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    return OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu")


def _folder(root, images, labels):
    for i, (im, y) in enumerate(zip(images, labels, strict=True)):
        (root / CLASSES[y]).mkdir(parents=True, exist_ok=True)
        im.save(root / CLASSES[y] / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A 24-image training folder (8 a class) and a 30-image test folder over three classes."""
    root = tmp_path_factory.mktemp("protocol_data")
    train = _folder(root / "train", random_images(24, seed=21), np.arange(24) % 3)
    test_images, test_labels = random_images(30, seed=22), np.arange(30) % 3
    return train, _folder(root / "test", test_images, test_labels), test_images, test_labels


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_fit_through_each_embedding_protocol_end_to_end(backend, task, protocol, tmp_path, monkeypatch):
    train, test, test_images, test_labels = task
    monkeypatch.setenv("CRAFT_VENDOR_API_KEY", KEY)
    out = tmp_path / "emb.safetensors"
    with FakeEmbeddingServer(protocol, backend, key=KEY) as server:
        r = cli("fit", "-o", out, "--data", train, "--vendor", server.url, "--protocol", protocol, "--budget", 12,
                "--no-cache", *SMALL)
        assert r.exit_code == 0, r.output
        adapter = Adapter.load(out)
        f = adapter.fit
        # the budget in vendor calls is what crossed the wire, to the request
        assert f["vendor_calls"] == server.requests == server.served and 0 < f["vendor_calls"] <= 12
        assert f["budget_unit"] == "vendor_calls" and f["logit_scale_source"] == "fitted"
        assert adapter.logit_kind == "logits" and adapter.backend["name"] == protocol
        assert 1.0 <= adapter.logit_scale <= 100.0 and adapter.logit_scale != pytest.approx(backend.logit_scale)
        # eval through the vendor is the runtime's numbers
        before = server.requests
        r = cli("eval", out, "--data", test, "--vendor", server.url, "--protocol", protocol, "--json",
                tmp_path / "ev.json")
        assert r.exit_code == 0, r.output
        report = json.loads((tmp_path / "ev.json").read_text())
        assert report["vendor_calls"] == server.requests - before
        predicted = load_runtime(out, make_vendor(protocol, server.url, key=KEY)).predict(test_images).indices
        assert report["confusion_matrix"] == _confusion(predicted, test_labels)
        assert report["adapted_accuracy"] == pytest.approx(float((predicted == test_labels).mean()))


def _confusion(pred, labels):
    m = np.zeros((3, 3), dtype=int)
    for p, y in zip(pred, labels, strict=True):
        m[y, p] += 1
    return m.tolist()


def test_resume_takes_the_protocol_from_the_manifest(backend, task, tmp_path, monkeypatch):
    train = task[0]
    monkeypatch.setenv("CRAFT_VENDOR_API_KEY", KEY)
    with FakeEmbeddingServer("cohere", backend, key=KEY) as server:
        args = ["--data", train, "--vendor", server.url, "--protocol", "cohere", "--vendor-model", "embed-v4.0",
                "--budget", 10, *SMALL]
        server.faults = [400]  # a permanent refusal of the first request: the fit stops, its manifest stays
        r = cli("fit", "-o", tmp_path / "a.safetensors", *args)
        assert r.exit_code == 3 and "HTTP 400" in r.output, r.output
        manifest = json.loads((tmp_path / "a.safetensors.fitrun.json").read_text())
        assert manifest["invocation"]["protocol"] == "cohere"
        assert manifest["invocation"]["vendor_model"] == "embed-v4.0"
        r = cli("fit", "-o", tmp_path / "a.safetensors", "--resume")  # nothing else: all from the manifest
        assert r.exit_code == 0, r.output
        r = cli("fit", "-o", tmp_path / "b.safetensors", "--cache", tmp_path / "b.sqlite", *args)
        assert r.exit_code == 0, r.output
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_fit_refuses_bad_vendor_settings_cleanly(task, tmp_path):
    train = task[0]
    for extra, says in [(["--vendor", "ftp://x/y"], "http(s)"), (["--vendor", "http://u:p@127.0.0.1:9"], "key"),
                        (["--vendor", "http://127.0.0.1:9", "--protocol", "nope"], "unknown vendor protocol"),
                        (["--vendor", "http://127.0.0.1:9", "--protocol", "voyage", "--auth-scheme", "Token"],
                         "--auth-scheme")]:
        r = cli("fit", "-o", tmp_path / "x.safetensors", "--data", train, "--no-cache", *SMALL, *extra)
        assert r.exit_code == 2 and says in r.output, r.output
        assert "Traceback" not in r.output


def test_chunked_calls_are_charged_exactly_and_a_replay_pays_nothing(backend, tmp_path):
    images, labels = random_images(24, seed=31), np.arange(24) % 3
    cfg = FitConfig(shots=6, seed=2, budget=40, prompt="text", text_children=3, text_elites=2, hidden=16,
                    vocab_size=50, holdout_shots=2, eval_every=3)
    with FakeEmbeddingServer("openai-embeddings", backend) as server:
        # caps far below the inputs: 12 training images are 3 requests, 15 class texts (5 templates) are 4
        vendor = make_vendor("openai-embeddings", server.url, max_images=5, max_texts=4)
        with QueryCache(tmp_path / "c.sqlite") as cache:
            first = fit_adapter(images, vendor, cfg, labels=labels, class_names=CLASSES, cache=cache)
            assert first.adapter.fit["vendor_calls"] == server.requests == vendor.calls <= 40
            assert first.record.meter["paid_calls"] == server.requests and first.record.meter["cached_calls"] == 0
            sent = server.requests
            again = fit_adapter(images, vendor, cfg, labels=labels, class_names=CLASSES, cache=cache)
        assert server.requests == sent  # every answer replayed from the cache
    assert again.record.meter["paid_calls"] == 0
    assert again.record.meter["cached_calls"] == again.adapter.fit["vendor_calls"] == first.adapter.fit["vendor_calls"]
    assert again.adapter.to_bytes() == first.adapter.to_bytes()
    # the scale is the cross-entropy minimiser on the training shots' zero-shot cosines
    train = few_shot_set(images, cfg, labels, CLASSES)
    tr, _ = split_holdout(train.labels, cfg.n_holdout, cfg.seed)
    cos = backend.embed_images([train.images[i] for i in tr]) @ backend.embed_texts(
        [cfg.template.format(c) for c in CLASSES]).T
    assert first.adapter.logit_scale == pytest.approx(choose_logit_scale(cos, train.labels[tr]), rel=1e-3)


def test_fit_adapter_takes_a_url_and_a_protocol(backend, tmp_path):
    images, labels = random_images(12, seed=41), np.arange(12) % 3
    cfg = FitConfig(shots=4, seed=1, budget=8, prompt="text", text_children=2, text_elites=1, hidden=8,
                    vocab_size=20, holdout_shots=0)
    with FakeEmbeddingServer("openai-embeddings", backend) as server:  # keyless, as a local Infinity
        out = fit_adapter(images, server.url, cfg, labels=labels, class_names=CLASSES, protocol="openai-embeddings")
        assert out.adapter.backend["name"] == "openai-embeddings" and out.adapter.fit["vendor_calls"] == server.requests
    for url, protocol in [("file:///etc/passwd", "voyage"), ("http://a:b@127.0.0.1:9", "hf-zero-shot"),
                          ("http://127.0.0.1:9", "no-such-protocol")]:
        with pytest.raises(SettingsError):
            fit_adapter(images, url, cfg, labels=labels, class_names=CLASSES, protocol=protocol)
