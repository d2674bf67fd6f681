"""Synthetic adapters: random refiner weights of a given size, for sizing, benchmarks and tests (never fitted)."""

from __future__ import annotations

import numpy as np

from craft_adapter.artifact.adapter_file import Adapter

HIDDEN = 256


def synthetic_adapter(n_classes: int, hidden: int = HIDDEN, logit_kind: str = "probabilities",
                      seed: int = 0) -> Adapter:
    """A text-mode adapter with torch-default-sized random refiner weights, for measuring and testing."""
    rng = np.random.default_rng(seed)

    def uniform(shape: tuple[int, ...], fan_in: int) -> np.ndarray:  # nn.Linear's default init range
        return (rng.uniform(-1, 1, shape) / np.sqrt(fan_in)).astype(np.float32)

    refiner = {"refiner.fc1.weight": uniform((hidden, n_classes), n_classes),
               "refiner.fc1.bias": uniform((hidden,), n_classes),
               "refiner.fc2.weight": uniform((n_classes, hidden), hidden),
               "refiner.fc2.bias": uniform((n_classes,), hidden)}
    return Adapter([f"class {i}" for i in range(n_classes)], "a photo of a {}.", "text", logit_kind, 100.0, refiner)

