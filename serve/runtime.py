"""The deployable runtime: vendor call with the learned prompt -> refiner on onnxruntime -> labels.

Per request: the vendor scores the images against the adapter's learned prompt (one prompt per class); the
scores are checked (shape, finiteness) and preprocessed exactly as in fit (``refiner_input``); the refiner
and its softmax run in one onnxruntime call; the argmax gives the label. An adapter with an embedding head also
reads the image embeddings the (embedding) vendor returned for those images: no extra vendor call.

Vendor calls are as sturdy as the server's (:mod:`craft_adapter.serve.vendor_binding`): transient faults are retried
under a :class:`~craft_adapter.vendors.retries.RetryPolicy` (fit's rules, one implementation), a scoring vendor's
per-image calls run ``concurrency`` at a time, and every vendor fault leaves as a
:class:`~craft_adapter.vendors.faults.VendorError` (``transient``, ``status``, ``retry_after``), whatever the vendor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from craft_adapter.serve.shipped import ShippedAdapter
from craft_adapter.serve.vendor_binding import DEFAULT_CONCURRENCY, bind_vendor_outputs
from craft_adapter.vendors.replies import check_scores
from craft_adapter.vendors.retries import RetryPolicy


@dataclass(frozen=True)
class Prediction:
    """One image's prediction."""

    label: str
    probability: float  # of ``label``
    probabilities: dict[str, float]  # every class


@dataclass(frozen=True)
class Predictions:
    """A batch's predictions; row ``i`` belongs to image ``i``."""

    class_names: list[str]
    probabilities: np.ndarray  # [n, c], refined
    refined_logits: np.ndarray  # [n, c]

    @property
    def indices(self) -> np.ndarray:
        """Predicted class index per image ``[n]``."""
        return self.probabilities.argmax(axis=1)

    @property
    def labels(self) -> list[str]:
        """Predicted class name per image."""
        return [self.class_names[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.probabilities)

    def __getitem__(self, i: int) -> Prediction:
        row = self.probabilities[i]
        k = int(row.argmax())
        return Prediction(self.class_names[k], float(row[k]), dict(zip(self.class_names, row.tolist(), strict=True)))


class AdapterRuntime:
    """A shipped adapter in front of a vendor. ``vendor`` is anything :func:`bind_vendor` accepts; ``retry`` and
    ``concurrency`` bound how hard and how widely it is called."""

    def __init__(self, adapter: ShippedAdapter, vendor: Any, retry: RetryPolicy | None = None,
                 concurrency: int = DEFAULT_CONCURRENCY) -> None:
        self.adapter = adapter
        self._vendor_outputs = bind_vendor_outputs(vendor, adapter, retry, concurrency)  # refuses a head it can't feed

    @classmethod
    def load(cls, path: str | Path, vendor: Any, device: str = "auto", retry: RetryPolicy | None = None,
             concurrency: int = DEFAULT_CONCURRENCY) -> AdapterRuntime:
        """Load ``path`` (``.safetensors`` or ``.onnx``) and put it in front of ``vendor``."""
        return cls(ShippedAdapter.load(path, device), vendor, retry, concurrency)

    @property
    def class_names(self) -> list[str]:
        """The adapter's classes, in score order."""
        return self.adapter.class_names

    def vendor_scores(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The vendor's raw scores ``[n, c]`` for ``images`` under the learned prompt, checked."""
        return self.vendor_outputs(images)[0]

    def vendor_outputs(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray | None]:
        """The vendor's checked raw scores ``[n, c]`` and, from an embedding vendor, the L2-normalised image
        embeddings ``[n, d]`` it returned with them (None from a vendor that returns only scores)."""
        scores, embeddings = self._vendor_outputs(images)
        return check_scores(scores, len(images), self.adapter.n_classes), embeddings

    def predict_scores(self, scores: np.ndarray, embeddings: np.ndarray | None = None) -> Predictions:
        """Predictions from vendor scores ``[n, c]`` already in hand (and, for an adapter with an embedding head,
        the image embeddings ``[n, d]`` from :meth:`vendor_outputs`): the runtime's own work per request."""
        return self._refined(check_scores(scores, len(scores), self.adapter.n_classes), embeddings)

    def predict(self, images: Sequence[Image.Image]) -> Predictions:
        """Predictions for a batch of images (vendor call, then refinement)."""
        return self._refined(*self.vendor_outputs(images))

    def _refined(self, scores: np.ndarray, embeddings: np.ndarray | None = None) -> Predictions:
        refined, probs = self.adapter.refine(scores, embeddings)
        return Predictions(self.adapter.class_names, probs, refined)

    def predict_one(self, image: Image.Image) -> Prediction:
        """The prediction for one image."""
        return self.predict([image])[0]


def load_runtime(path: str | Path, vendor: Any, device: str = "auto", retry: RetryPolicy | None = None,
                 concurrency: int = DEFAULT_CONCURRENCY) -> AdapterRuntime:
    """Load a shipped adapter (``.safetensors`` or ``.onnx``) and put it in front of ``vendor``."""
    return AdapterRuntime.load(path, vendor, device, retry, concurrency)
