"""Score kinds: a sigmoid (independent) vendor is a declared kind that fit, the adapter and the runtime handle, and a
vendor declared softmax whose first reply does not sum to 1 stops a fit after that one call, saying how to
declare it. All against the stub vendor on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import random_images

from craft_adapter import FitConfig, fit_adapter
from craft_adapter.artifact.adapter_file import Adapter, AdapterError, refiner_input
from craft_adapter.artifact.synthetic import synthetic_adapter
from craft_adapter.blackbox.meter import QueryMeter
from craft_adapter.blackbox.retried_calls import Caller, RetryPolicy, VendorUnavailable
from craft_adapter.testing.stub_vendor import StubVendor, running_stub, stub_probabilities
from craft_adapter.training.api import VendorStopped
from craft_adapter.training.image_sets import LabeledImages
from craft_adapter.vendors.faults import VendorError
from craft_adapter.vendors.http_clients import HttpZeroShotVendor, image_base64

# isort: split
from craft_adapter.serve import load_runtime

LABELS = ["bag", "coat", "sandal"]
IMAGE = random_images(1, seed=5)[0]
TEXT = {"shots": 4, "prompt": "text", "budget": 60, "text_children": 4, "text_elites": 2, "vocab_size": 100,
        "minibatch_start": 1, "minibatch_end": 2, "eval_every": 2, "concurrency": 4, "retries": 3,
        "retry_backoff": 0.01, "timeout": 5.0}


@pytest.fixture()
def stub() -> Iterator[StubVendor]:
    with running_stub() as s:
        yield s


def total_calls(stub: StubVendor) -> int:
    return sum(stub.calls.values())


def test_a_sigmoid_vendor_declared_softmax_stops_after_its_first_reply(stub: StubVendor) -> None:
    stub.scores = "sigmoid"
    caller = Caller(QueryMeter(), RetryPolicy(retries=5, backoff_s=0), sleep=lambda s: None)
    vendor = HttpZeroShotVendor(stub.url + "/")
    with pytest.raises(VendorUnavailable, match=r"refused.*independent \(sigmoid.*scores='sigmoid'"):
        caller.call(lambda: vendor.score(IMAGE, LABELS, "a {}"), lambda a: a, "a scoring call")
    assert total_calls(stub) == 1  # no retry paid for a reply that would never sum to 1


def test_a_declared_sigmoid_vendor_gives_its_scores(stub: StubVendor) -> None:
    stub.scores = "sigmoid"
    vendor = HttpZeroShotVendor(stub.url + "/", scores="sigmoid")
    assert vendor.capabilities.returns == "independent_probabilities"
    assert vendor.identity["scores"] == "sigmoid"  # its answers are cached apart from a softmax client's
    want = stub_probabilities(image_base64(IMAGE), LABELS, "sigmoid")
    assert abs(want.sum() - 1) > 0.05  # the stub's sigmoid scores are far from a softmax
    np.testing.assert_allclose(vendor.score(IMAGE, LABELS, "a {}"), want, rtol=1e-6)
    assert HttpZeroShotVendor(stub.url + "/").identity == {"name": "hf-zero-shot-http", "url": stub.url + "/"}
    with pytest.raises(ValueError, match="'softmax'.*'sigmoid'"):
        HttpZeroShotVendor(stub.url + "/", scores="logits")


def test_after_a_good_reply_a_sum_off_is_a_garble_and_is_retried(stub: StubVendor) -> None:
    vendor = HttpZeroShotVendor(stub.url + "/")
    vendor.score(IMAGE, LABELS, "a {}")  # confirms the softmax kind
    stub.script = ["not_probabilities"]
    with pytest.raises(VendorError) as e:
        vendor.score(IMAGE, LABELS, "a {}")
    assert e.value.transient
    caller = Caller(QueryMeter(), RetryPolicy(retries=2, backoff_s=0), sleep=lambda s: None)
    stub.script = ["not_probabilities"]
    got = caller.call(lambda: vendor.score(IMAGE, LABELS, "a {}"), lambda a: a, "a scoring call")
    np.testing.assert_allclose(got, stub_probabilities(image_base64(IMAGE), LABELS), rtol=1e-6)


def test_a_sigmoid_adapter_is_recorded_loaded_and_served_by_the_runtime(stub: StubVendor, tmp_path: Path) -> None:
    adapter = synthetic_adapter(len(LABELS), logit_kind="independent_probabilities", seed=3)
    adapter.class_names = list(LABELS)
    path = adapter.save(tmp_path / "sigmoid.safetensors")
    loaded = Adapter.load(path)
    assert loaded.logit_kind == "independent_probabilities"
    assert loaded.metadata()["logits"]["refiner_input"] == "log(max(p, 1e-12))"
    p = np.array([[0.2, 0.9, 0.05]], np.float32)
    np.testing.assert_array_equal(refiner_input(p, "independent_probabilities"), refiner_input(p, "probabilities"))
    stub.scores = "sigmoid"
    images = random_images(5, seed=8)
    runtime = load_runtime(path, HttpZeroShotVendor(stub.url + "/", scores="sigmoid"))
    want = np.stack([stub_probabilities(image_base64(im), LABELS, "sigmoid") for im in images])
    got = runtime.predict(images)
    np.testing.assert_allclose(got.refined_logits, adapter.refine(want.astype(np.float32)), rtol=1e-4, atol=1e-4)
    with pytest.raises(AdapterError, match="fitted on vendor independent_probabilities"):
        load_runtime(path, HttpZeroShotVendor(stub.url + "/"))  # a softmax vendor: not what it was fitted on
    softmax_adapter = synthetic_adapter(len(LABELS), logit_kind="probabilities", seed=3)
    with pytest.raises(AdapterError, match="fitted on vendor probabilities"):
        load_runtime(softmax_adapter.save(tmp_path / "softmax.safetensors"),
                     HttpZeroShotVendor(stub.url + "/", scores="sigmoid"))


def test_an_unknown_kind_is_refused_on_load(tmp_path: Path) -> None:
    adapter = synthetic_adapter(3, logit_kind="probabilities")
    raw = adapter.to_bytes()  # the metadata is a JSON string inside the JSON header: its quotes are escaped
    raw = raw.replace(b'\\"kind\\":\\"probabilities\\"', b'\\"kind\\":\\"sigmoidish!!!\\"')
    assert b"sigmoidish" in raw
    with pytest.raises(AdapterError, match="unknown logit kind 'sigmoidish!!!'"):
        Adapter.from_bytes(raw)


def test_a_text_fit_against_a_sigmoid_vendor(stub: StubVendor) -> None:
    """Declared: the fit runs and the adapter records the kind. Undeclared: it stops after one paid call."""
    stub.scores = "sigmoid"
    images, labels = random_images(15, seed=2), np.repeat(np.arange(3), 5)
    shots = LabeledImages(images, labels, list(LABELS))
    outcome = fit_adapter(shots, HttpZeroShotVendor(stub.url + "/", scores="sigmoid"), FitConfig(**TEXT))
    assert outcome.adapter.logit_kind == "independent_probabilities"
    before = total_calls(stub)
    with pytest.raises(VendorStopped, match="sigmoid"):
        fit_adapter(shots, HttpZeroShotVendor(stub.url + "/"), FitConfig(**TEXT))
    assert total_calls(stub) - before <= TEXT["concurrency"]  # the calls already in flight, no retries


def test_the_cli_fits_a_declared_sigmoid_vendor_and_evaluates_it_through_that_vendor(stub: StubVendor,
                                                                                     tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from craft_adapter.cli import app

    stub.scores = "sigmoid"
    data = tmp_path / "shots"
    for c, name in enumerate(LABELS):
        (data / name).mkdir(parents=True)
        for i, im in enumerate(random_images(5, seed=10 + c)):
            im.save(data / name / f"{i}.png")
    out = tmp_path / "a.safetensors"
    args = ["fit", "--vendor", stub.url + "/", "--vendor-scores", "sigmoid", "--data", str(data), "-o", str(out),
            "--no-cache", *[f"--{k.replace('_', '-')}={v}" for k, v in TEXT.items()]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert Adapter.load(out).logit_kind == "independent_probabilities"
    report = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", str(out), "--vendor", stub.url + "/", "--data", str(data),
                                      "--json", str(report)])
    assert result.exit_code == 0, result.output  # the eval's vendor reads sigmoid scores: the adapter says so
    assert json.loads(report.read_text())["n_images"] == 15
    other = [str(tmp_path / "b.safetensors") if a == str(out) else a for a in args]
    refused = CliRunner().invoke(app, [*other, "--protocol", "openai-embeddings"])
    assert refused.exit_code == 2 and "--vendor-scores" in refused.output
