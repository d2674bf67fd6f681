"""The black-box boundary: exact counts, a hard budget, and nothing of the model leaking out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_images

from craft_adapter.blackbox.box import BlackBox
from craft_adapter.blackbox.meter import BudgetExhausted, QueryMeter
from craft_adapter.vendors.protocols import Capabilities


class CountingEmbeddingVendor:
    """An embedding vendor that records every call it receives."""

    capabilities = Capabilities(style="embedding")
    logit_scale = 10.0
    identity = {"name": "counting"}

    def __init__(self):
        self.calls = []

    def embed_images(self, images):
        self.calls.append(("images", len(images)))
        return np.eye(len(images), 4, dtype=np.float32)

    def embed_texts(self, texts):
        self.calls.append(("texts", len(texts)))
        return np.ones((len(texts), 4), np.float32) / 2


class CountingScoringVendor:
    capabilities = Capabilities(style="scoring", returns="probabilities")
    identity = {"name": "scoring"}

    def __init__(self):
        self.calls = 0

    def score(self, image, labels, template):
        self.calls += 1
        return np.full(len(labels), 1 / len(labels), np.float32)


def test_meter_counts_exactly_and_stops_before_the_budget():
    vendor = CountingEmbeddingVendor()
    box = BlackBox(vendor, random_images(3), ["a", "b"], QueryMeter(budget=5))
    out = box.logits_text(["x {}", "y {}", "z {}"])
    assert out.shape == (3, 3, 2)
    assert (box.meter.queries, box.meter.vendor_calls, box.meter.images_sent) == (3, 2, 3)
    box.logits_text(["w {}", "v {}"])
    assert box.meter.queries == 5
    with pytest.raises(BudgetExhausted, match="5 of 5 queries used, this call needs 1 more") as e:
        box.logits_text(["u {}"])
    assert e.value.used == 5 and e.value.budget == 5
    # nothing was sent for the refused call, and the image embeddings were fetched once
    assert vendor.calls == [("images", 3), ("texts", 6), ("texts", 4)]
    assert box.meter.queries == 5


def test_a_batch_that_would_overshoot_is_refused_whole():
    vendor = CountingEmbeddingVendor()
    box = BlackBox(vendor, random_images(2), ["a"], QueryMeter(budget=3))
    with pytest.raises(BudgetExhausted):
        box.logits_text(["{}"] * 4)
    assert box.meter.queries == 0 and ("texts", 4) not in vendor.calls


def test_scoring_vendor_costs_one_call_per_image_and_budget_in_calls():
    vendor = CountingScoringVendor()
    box = BlackBox(vendor, random_images(4), ["a", "b", "c"], QueryMeter(budget=10, unit="vendor_calls"))
    box.logits_text(["{}", "a {}"])
    assert (box.meter.vendor_calls, box.meter.queries, vendor.calls) == (8, 2, 8)
    with pytest.raises(BudgetExhausted, match="8 of 10 vendor_calls"):
        box.logits_text(["the {}"])
    assert vendor.calls == 8


def test_soft_prompts_refused_when_backend_is_text_only():
    box = BlackBox(CountingEmbeddingVendor(), random_images(1), ["a"], QueryMeter())
    with pytest.raises(TypeError, match="only text prompts"):
        box.logits_soft(np.zeros((1, 4, 8), np.float32))


def test_box_exposes_no_torch_module_or_parameter(tiny_model_dir):
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    box = BlackBox(OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu"), random_images(2), ["a", "b"])
    public = {name: getattr(box, name) for name in dir(box) if not name.startswith("_")}
    for name, value in public.items():
        assert not isinstance(value, (torch.nn.Module, torch.Tensor)), name
    ctx = box.soft_prompt_init()
    assert isinstance(ctx, np.ndarray)
    assert isinstance(box.logits_soft(ctx[None]), np.ndarray)


def test_meter_rejects_bad_settings():
    with pytest.raises(ValueError):
        QueryMeter(budget=-1)
    with pytest.raises(ValueError):
        QueryMeter(unit="dollars")
