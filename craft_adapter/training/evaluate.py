"""Accuracy that measures what ships: adapted predictions come from the runtime's own path.

An adapter is evaluated by :func:`evaluate_runtime`: the runtime (:mod:`craft_adapter.serve`) binds a vendor to the
adapter's learned prompt, checks its scores, preprocesses them as the adapter records (``refiner_input``: raw
logits, or log-probabilities for an adapter fitted on a zero-shot vendor) and runs the refiner on onnxruntime.
``eval --vendor`` gives it the real vendor; in-process eval gives it :func:`stand_in_vendor`, the in-process model
answering as the adapter's vendor kind would (cosine logits for an embedding vendor, the zero-shot endpoint's
softmax for a scoring vendor). Both therefore apply the same preprocessing, by construction.

:func:`evaluate_adapter` (through a metered :class:`BlackBox`, for ``demo``) converts the box's scores to the
adapter's kind with :func:`vendor_equivalent` first; the eval agreement tests hold it to the runtime's numbers.
An adapter with an embedding head is refined with the image embeddings the vendor returned with the scores, in
both paths (the runtime's :meth:`~craft_adapter.serve.runtime.AdapterRuntime.vendor_outputs`, and the box's
:meth:`~craft_adapter.blackbox.box.BlackBox.image_embeddings`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from craft_adapter.artifact.adapter_file import Adapter, AdapterError, read_adapter_bytes
from craft_adapter.artifact.onnx_check import check_refiner_onnx
from craft_adapter.blackbox.box import BlackBox
from craft_adapter.serve.runtime import AdapterRuntime
from craft_adapter.serve.vendor_binding import bind_vendor
from craft_adapter.vendors.protocols import CallableVendor, EmbeddingBackend
from craft_adapter.vendors.replies import unit_rows


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


def zero_shot_probabilities(logits: np.ndarray) -> np.ndarray:
    """What a zero-shot endpoint answers for a model's logits ``[..., c]``: their softmax over the labels, float32."""
    logits = np.asarray(logits, dtype=np.float32)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _no_stand_in(logit_kind: str) -> None:
    if logit_kind not in ("logits", "probabilities"):  # sigmoid scores: the model gives no faithful equivalent
        raise AdapterError(f"the adapter was fitted on vendor {logit_kind} (independent, sigmoid-style scores), "
                           "which an in-process CLIP model cannot reproduce; evaluate it through its vendor: "
                           "eval ADAPTER --vendor URL")


def vendor_equivalent(logits: np.ndarray, scale: float, adapter: Adapter) -> np.ndarray:
    """A model's cosine logits (at ``scale``) as the adapter's vendor kind returns them, for the same model."""
    _no_stand_in(adapter.logit_kind)
    if adapter.logit_kind == "probabilities":
        return zero_shot_probabilities(logits)
    factor = np.float32(adapter.logit_scale / scale)  # 1 when the adapter was fitted on this model
    return logits if factor == 1 else logits * factor


def stand_in_vendor(backend: EmbeddingBackend, logit_kind: str) -> Any:
    """The in-process model in place of the vendor an adapter of ``logit_kind`` was fitted on.

    ``"logits"``: the model itself, an embedding vendor (the runtime scales its cosines by the adapter's recorded
    scale). ``"probabilities"``: a zero-shot endpoint serving the model, ``softmax(logit_scale * cos)`` over the
    class prompts, as ``craft-adapter vendor`` answers.
    """
    _no_stand_in(logit_kind)
    if logit_kind == "logits":
        return backend

    def zero_shot_endpoint(images: Sequence[Image.Image], prompts: list[str]) -> np.ndarray:
        cos = unit_rows(backend.embed_images(list(images))) @ unit_rows(backend.embed_texts(prompts)).T  # [n, c]
        return zero_shot_probabilities(np.float32(backend.logit_scale) * cos)
    return CallableVendor(zero_shot_endpoint, returns="probabilities")


def batches(images: Sequence[Image.Image], size: int) -> Iterator[list[Image.Image]]:
    """``images`` in consecutive batches of ``size``, indexed one by one (a lazy image sequence may not slice)."""
    for i in range(0, len(images), size):
        yield [images[j] for j in range(i, min(i + size, len(images)))]


@dataclass(frozen=True)
class _PromptOnly:
    """The part of an adapter the runtime's vendor binding reads, for scoring a hand-written prompt."""

    class_names: list[str]
    template: str
    logit_kind: str
    logit_scale: float = 1.0
    mode: str = "text"
    ctx: None = None


def prompt_scores(vendor: Any, class_names: list[str], template: str, images: Sequence[Image.Image],
                  batch_size: int = 256) -> np.ndarray:
    """The vendor's scores ``[n, c]`` for a hand-written ``template``, sent exactly as the runtime sends a prompt."""
    returns = getattr(vendor, "returns", None) or getattr(getattr(vendor, "capabilities", None), "returns", "logits")
    scores = bind_vendor(vendor, _PromptOnly(list(class_names), template, returns))  # type: ignore[arg-type]
    return np.concatenate([np.asarray(scores(batch), np.float32) for batch in batches(images, batch_size)])


@dataclass
class AdapterEval:
    """An adapter's predictions on a labelled set: the vendor's scores, the refined probabilities, the labels."""

    class_names: list[str]
    labels: np.ndarray  # [n]
    vendor_scores: np.ndarray  # [n, c], the learned prompt's, as the vendor returned them
    probabilities: np.ndarray  # [n, c], refined, from the runtime's refiner
    zero_shot_scores: np.ndarray | None = None  # [n, c], a hand-written prompt's

    @property
    def predictions(self) -> np.ndarray:
        """Predicted class per image ``[n]``."""
        return self.probabilities.argmax(axis=1)

    def confusion(self) -> np.ndarray:
        """Counts ``[c, c]``: row = true class, column = predicted class."""
        c = len(self.class_names)
        return np.bincount(self.labels * c + self.predictions, minlength=c * c).reshape(c, c)

    def report(self) -> dict[str, Any]:
        """Accuracies, per-class accuracy (None for a class with no images) and the confusion matrix, as JSON."""
        m = self.confusion()
        rows = m.sum(axis=1)
        out: dict[str, Any] = {
            "adapted_accuracy": accuracy(self.probabilities, self.labels),
            "prompt_only_accuracy": accuracy(self.vendor_scores, self.labels), "n_images": len(self.labels),
            "per_class_accuracy": {name: (float(m[i, i] / rows[i]) if rows[i] else None)
                                   for i, name in enumerate(self.class_names)},
            "confusion_matrix": m.tolist(), "class_names": list(self.class_names)}
        if self.zero_shot_scores is not None:
            out["zero_shot_accuracy"] = accuracy(self.zero_shot_scores, self.labels)
        return out


def evaluate_runtime(runtime: AdapterRuntime, images: Sequence[Image.Image], labels: np.ndarray, *,
                     vendor: Any = None, zero_shot_template: str | None = None,
                     batch_size: int = 256) -> AdapterEval:
    """The runtime's predictions on ``images`` (batches of ``batch_size``); with ``vendor`` and a template, also
    that hand-written prompt's zero-shot scores through the same vendor."""
    if not len(images):
        raise ValueError("nothing to evaluate: the image set is empty")
    outputs = [runtime.vendor_outputs(batch) for batch in batches(images, batch_size)]
    scores = np.concatenate([s for s, _ in outputs])
    embeddings = None if any(e is None for _, e in outputs) else np.concatenate([e for _, e in outputs])
    probabilities = runtime.predict_scores(scores, embeddings).probabilities
    zs = None
    if vendor is not None and zero_shot_template is not None:
        zs = prompt_scores(vendor, runtime.class_names, zero_shot_template, images, batch_size)
    return AdapterEval(list(runtime.class_names), np.asarray(labels), scores, probabilities, zs)


def adapted_scores(box: BlackBox, adapter: Adapter) -> tuple[np.ndarray, np.ndarray]:
    """Vendor scores ``[n, c]`` with the adapter's learned prompt, and the refined logits ``[n, c]``."""
    if list(adapter.class_names) != list(box.class_names):
        raise AdapterError(f"the adapter's classes {adapter.class_names} differ from the data's "
                           f"{box.class_names}; evaluate on data with the same class folders")
    raw = box.logits_soft(adapter.ctx[None])[0] if adapter.mode == "soft" else box.logits_text([adapter.template])[0]
    if box.capabilities.returns == "logits":
        raw = vendor_equivalent(raw, box.logit_scale, adapter)
    elif adapter.logit_kind != "probabilities":  # a scoring vendor's probabilities cannot be turned into logits
        raise AdapterError(f"the adapter was fitted on vendor {adapter.logit_kind}, but this backend returns "
                           "probabilities; evaluate it with the kind of vendor it was fitted with")
    if adapter.head is None:
        return raw, adapter.refine(raw)
    if box.capabilities.style != "embedding":
        raise AdapterError("the adapter has an embedding head, which reads image embeddings; this backend returns "
                           "only scores: evaluate it with the embedding vendor it was fitted on")
    return raw, adapter.refine(raw, unit_rows(box.image_embeddings()))  # already paid with the scores


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


def recorded_backend(path: str | Path) -> dict[str, Any]:
    """The backend identity an adapter file (``.safetensors`` or exported ``.onnx``) records from its fit."""
    path = Path(path)
    if path.suffix == ".onnx":
        return dict(check_refiner_onnx(read_adapter_bytes(path), str(path)).get("backend") or {})
    return dict(Adapter.load(path).backend)


def check_stand_in(recorded: dict[str, Any], identity: dict[str, Any], model_named: bool) -> None:
    """Refuse (:class:`AdapterError`) an in-process model that cannot stand in faithfully for the fit's backend.

    An adapter fitted in process on open_clip weights is scored only by those weights (same hash). One fitted
    through a remote vendor is scored in process only when the model was named on purpose (``model_named``): a
    default model standing in silently for someone's vendor would print a number that measures nothing shipped.
    """
    if recorded.get("name") == "open_clip":
        want, got = recorded.get("weights_sha256"), identity.get("weights_sha256")
        if identity.get("name") != "open_clip" or (want and want != got):
            raise AdapterError(f"the adapter was fitted on open_clip {recorded.get('model')} (weights {want}), but "
                               f"the in-process model is {identity.get('model')} (weights {got}); pass the same "
                               "--model/--weights, or evaluate through the vendor with --vendor URL --protocol NAME")
    elif recorded and not model_named:
        raise AdapterError(f"the adapter was fitted through the vendor {recorded.get('name')} at "
                           f"{recorded.get('url', '?')}: evaluate through it with --vendor URL --protocol NAME, or "
                           "name the in-process model that stands in for it with --model")
