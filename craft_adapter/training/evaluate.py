"""Accuracy through the boundary: zero-shot with a hand-written template."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from craft_adapter.artifact.adapter_file import Adapter, AdapterError
from craft_adapter.blackbox.box import BlackBox


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


def adapted_scores(box: BlackBox, adapter: Adapter) -> tuple[np.ndarray, np.ndarray]:
    """Vendor scores ``[n, c]`` with the adapter's learned prompt, and the refined logits ``[n, c]``."""
    if list(adapter.class_names) != list(box.class_names):
        raise AdapterError(f"the adapter's classes {adapter.class_names} differ from the data's "
                           f"{box.class_names}; evaluate on data with the same class folders")
    if adapter.mode == "soft":
        raw = box.logits_soft(adapter.ctx[None])[0]
    else:
        raw = box.logits_text([adapter.template])[0]
    return raw, adapter.refine(raw)


def evaluate_adapter(box: BlackBox, labels: np.ndarray, adapter: Adapter,
                     zero_shot_template: str) -> dict[str, float | int]:
    """Zero-shot (a hand-written template), prompt-only and adapted accuracy, with query counts.

    The hand-written template is passed in: a text-mode adapter's own template is the learned one.
    """
    raw, refined = adapted_scores(box, adapter)  # checks the class names before anything is paid
    zs = accuracy(box.logits_text([zero_shot_template])[0], labels)
    return {"zero_shot_accuracy": zs, "prompt_only_accuracy": accuracy(raw, labels),
            "adapted_accuracy": accuracy(refined, labels), "n_images": box.n_images,
            "queries": box.meter.queries, "vendor_calls": box.meter.vendor_calls}
