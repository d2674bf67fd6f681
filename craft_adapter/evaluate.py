"""Accuracy through the boundary: zero-shot with a hand-written template."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .boundary import BlackBox


@dataclass
class EvalResult:
    """Accuracy on an image set and what it cost."""

    accuracy: float
    n_images: int
    queries: int
    vendor_calls: int


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``scores [n, c]`` against ``labels [n]``."""
    return float((scores.argmax(-1) == labels).mean())


def zero_shot(box: BlackBox, labels: np.ndarray, template: str) -> tuple[EvalResult, np.ndarray]:
    """Zero-shot accuracy of ``template`` over the box's images; returns the result and scores ``[n, c]``."""
    scores = box.logits_text([template])[0]
    m = box.meter
    return EvalResult(accuracy(scores, labels), box.n_images, m.queries, m.vendor_calls), scores
