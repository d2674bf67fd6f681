"""The temperature chosen from few-shot data: recovers a known scale, is convex-safe at the edges, refuses bad input."""

from __future__ import annotations

import numpy as np
import pytest

from craft_adapter.training.temperature import MAX_SCALE, choose_logit_scale, cross_entropy


def sample(scale: float, n: int = 4000, c: int = 10, seed: int = 0):
    """Cosines of unit vectors, and labels drawn from softmax(scale * cos): the scale that generated them is known."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, 32))
    txt = rng.normal(size=(c, 32))
    cos = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    p = np.exp(scale * cos)
    p /= p.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(c, p=row) for row in p])
    return cos.astype(np.float32), labels


@pytest.mark.parametrize("true_scale", [5.0, 14.3, 40.0])
def test_recovers_the_scale_that_generated_the_labels(true_scale):
    cos, labels = sample(true_scale)
    got = choose_logit_scale(cos, labels)
    assert got == pytest.approx(true_scale, rel=0.15)
    # and it is the minimum, not just near the truth
    for s in (got * 0.97, got * 1.03):
        assert cross_entropy(got, cos, labels) <= cross_entropy(s, cos, labels)
    assert choose_logit_scale(cos, labels) == got  # deterministic


def test_separable_data_gets_clips_clamp_and_hopeless_data_the_floor():
    cos = np.array([[0.3, 0.1], [0.1, 0.3]] * 5)
    labels = np.array([0, 1] * 5)
    assert choose_logit_scale(cos, labels) == MAX_SCALE
    assert choose_logit_scale(cos, 1 - labels) == 1.0  # every image wrong: the softest logits lose least


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        choose_logit_scale(np.zeros((3, 1)), np.zeros(3, int))
    with pytest.raises(ValueError):
        choose_logit_scale(np.full((2, 2), np.nan), np.zeros(2, int))
    with pytest.raises(ValueError):
        choose_logit_scale(np.zeros((2, 2)), np.array([0, 2]))
