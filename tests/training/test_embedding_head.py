"""The embedding-access head: its training (loss, determinism, the pull toward zero-shot), its place after the CraFT
loop (the loop's prompt and refiner unchanged, no extra vendor call, soft and text mode), and the refusal of a
scoring-only vendor before anything is paid."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import random_images

from craft_adapter.blackbox.meter import QueryMeter
from craft_adapter.testing.fake_embedding_servers import FakeEmbeddingServer
from craft_adapter.testing.stub_vendor import running_stub
from craft_adapter.training.api import SettingsError, fit_adapter
from craft_adapter.training.config import FitConfig
from craft_adapter.training.embedding_head import (
    HeadData,
    HeadUnavailable,
    TappedBox,
    add_embedding_head,
    head_data,
    head_loss,
    train_head,
)
from craft_adapter.training.refiner import Refiner
from craft_adapter.vendors.registry import make_vendor
from craft_adapter.vendors.replies import unit_rows

CLASSES = ["bag", "coat", "sandal"]
SOFT = {"shots": 5, "seed": 1, "budget": 60, "popsize": 8, "intrinsic_dim": 16, "eval_every": 3, "holdout_shots": 1,
        "hidden": 16}
TEXT = {"shots": 5, "seed": 1, "budget": 30, "prompt": "text", "text_children": 2, "text_elites": 1, "hidden": 8,
        "vocab_size": 20, "holdout_shots": 1, "eval_every": 2}


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    return OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu")


@pytest.fixture(scope="module")
def data():
    images, labels = random_images(15, seed=31), np.arange(15) % 3
    return images, labels


def problem(seed: int = 0, n: int = 60, c: int = 4, d: int = 16, scale: float = 20.0) -> tuple[Refiner, HeadData]:
    """A head problem with a signal in the embeddings that the zero-shot scores miss: class means in ``e``."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    e = unit_rows(rng.normal(size=(n, d)) + 2.0 * np.eye(c, d)[y])
    w = unit_rows(rng.normal(size=(c, d)))  # a zero-shot classifier unrelated to the classes
    refiner = Refiner(c, 8)  # the identity at init: refined = x
    return refiner, HeadData((scale * e @ w.T).astype(np.float32), e, y.astype(np.int64))


@pytest.mark.parametrize("with_refiner", [False, True])
def test_head_training_lowers_the_loss_and_is_deterministic(with_refiner: bool) -> None:
    refiner, d = problem()
    refiner = refiner if with_refiner else None
    zero = np.zeros((4, 16), np.float32)
    delta = train_head(refiner, d, 20.0)
    assert delta.dtype == np.float32 and delta.shape == (4, 16)
    assert head_loss(refiner, d, 20.0, delta) < 0.5 * head_loss(refiner, d, 20.0, zero)
    np.testing.assert_array_equal(delta, train_head(refiner, d, 20.0))  # bit for bit


def test_a_huge_l2_weight_keeps_the_head_at_the_zero_shot_init() -> None:
    refiner, d = problem(seed=1)
    assert np.abs(train_head(None, d, 20.0, lam=1e6)).max() < 1e-6
    assert np.abs(train_head(None, d, 20.0, lam=0.0)).max() > 1e-2  # the limit is the penalty's doing
    assert np.abs(train_head(refiner, d, 20.0, lam=1e6)).max() < 1e-6


def test_a_soft_fit_gains_a_head_without_changing_the_loop_or_paying_more(backend, data) -> None:
    images, labels = data
    # refit off: the head replaces the refiner, so a head fit does not refit it (nor pay the refit's query)
    plain = fit_adapter(images, backend, FitConfig(**SOFT, refit_epochs=0), labels=labels, class_names=CLASSES)
    head = fit_adapter(images, backend, FitConfig(**SOFT, embedding_head=True), labels=labels, class_names=CLASSES)
    a, b = plain.adapter, head.adapter
    assert a.head is None and "embedding_head" not in a.fit["config"]
    assert b.head is not None and b.head.shape == (3, 32) and b.fit["config"]["embedding_head"] is True
    np.testing.assert_array_equal(a.ctx, b.ctx)  # the loop chose the same prompt
    assert a.fit["holdout_acc"] == b.fit["holdout_acc"] and a.fit["generations"] == b.fit["generations"]
    assert plain.record.meter == head.record.meter  # no query, no vendor call more
    assert all(not v.any() for v in b.refiner.values()) and any(v.any() for v in a.refiner.values())
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    np.testing.assert_array_equal(dataclasses.replace(b, head=None).refine(x), x)  # the identity, exactly
    info = b.fit["embedding_head"]
    assert info["images"] == 15 and info["train_ce_after"] < info["train_ce_before"] and info["base"].startswith("x")


def test_the_head_can_keep_the_loops_refiner(backend, data) -> None:
    images, labels = data
    cfg = FitConfig(**SOFT, embedding_head=True)
    fit = fit_adapter(images, backend, FitConfig(**SOFT), labels=labels, class_names=CLASSES)
    kept = dataclasses.replace(fit.adapter, fit=dict(fit.adapter.fit), refiner=dict(fit.adapter.refiner))
    box = TappedBox(backend, images, CLASSES, QueryMeter(), text_answers={})
    add_embedding_head(kept, [(box, labels)], cfg.seed, keep_refiner=True)
    for k, v in fit.adapter.refiner.items():
        np.testing.assert_array_equal(kept.refiner[k], v)
    assert kept.head is not None and kept.fit["embedding_head"]["base"] == "refiner(x)"


def test_a_text_fit_through_an_embedding_api_trains_the_head_on_answers_already_paid(backend, data) -> None:
    images, labels = data
    with FakeEmbeddingServer("openai-embeddings", backend) as api:
        plain = fit_adapter(images, make_vendor("openai-embeddings", api.url), FitConfig(**TEXT), labels=labels,
                            class_names=CLASSES)
        sent = api.requests
        head = fit_adapter(images, make_vendor("openai-embeddings", api.url), FitConfig(**TEXT, embedding_head=True),
                           labels=labels, class_names=CLASSES)
        assert api.requests - sent == sent == head.record.meter["vendor_calls"]
    assert head.adapter.template == plain.adapter.template and head.adapter.head is not None
    assert head.adapter.logit_scale == plain.adapter.logit_scale  # the fitted temperature, read by the head too


def test_a_prompt_the_box_never_answered_is_bought_once(backend, data) -> None:
    images, labels = data
    box = TappedBox(backend, images, CLASSES, QueryMeter())
    fit = fit_adapter(images, backend, FitConfig(**SOFT, embedding_head=True), labels=labels, class_names=CLASSES)
    before = box.meter.queries
    got = head_data(fit.adapter, [(box, labels)])  # as after a resume: this process never saw the final prompt
    assert box.meter.queries - before == 1
    want = backend.logit_scale * unit_rows(backend.embed_images(images)) @ unit_rows(
        backend.embed_soft(fit.adapter.ctx[None], CLASSES)[0]).T
    np.testing.assert_allclose(got.x, want, atol=1e-4)
    head_data(fit.adapter, [(box, labels)])
    assert box.meter.queries - before == 1  # kept now


def test_a_scoring_only_vendor_is_refused_before_any_call(data) -> None:
    images, labels = data
    with running_stub() as stub:
        with pytest.raises(SettingsError, match="returns only scores"):
            fit_adapter(images, stub.url, FitConfig(**TEXT, embedding_head=True), labels=labels, class_names=CLASSES)
        assert sum(stub.calls.values()) == 0


def test_a_prompt_it_cannot_afford_to_ask_again_is_a_clear_error(backend, data) -> None:
    images, labels = data
    fit = fit_adapter(images, backend, FitConfig(**SOFT, embedding_head=True), labels=labels, class_names=CLASSES)
    box = TappedBox(backend, images, CLASSES, QueryMeter(1))
    box.prepare_images()
    box.soft_embeddings(fit.adapter.ctx[None] + 1)  # the one query of its budget, spent on another prompt
    with pytest.raises(HeadUnavailable, match="budget one higher"):
        head_data(fit.adapter, [(box, labels)])


def test_a_tapped_box_answers_a_lone_context_as_a_plain_box_does(backend, data) -> None:
    from craft_adapter.blackbox.box import BlackBox
    from craft_adapter.blackbox.meter import QueryMeter
    from craft_adapter.training.embedding_head import TappedBox

    images, _ = data
    ctx = backend.soft_prompt_init("a photo of a")
    tapped, plain = (cls(backend, images, CLASSES, QueryMeter()) for cls in (TappedBox, BlackBox))
    np.testing.assert_array_equal(tapped.soft_embeddings_alone(ctx), plain.soft_embeddings_alone(ctx))
    assert tapped.class_embeddings(ctx) is not None  # and it kept it
