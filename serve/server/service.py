"""The adapted classifier behind the server: vendor scores for every image, then the refiner, or a typed failure.

:class:`ServedAdapter` is what the routes use (``classify``, ``class_names``, ``index``, ``adapter``) and owns the
refinement; two services fill in the vendor scores. :class:`AdapterService` here fronts a Hugging Face zero-shot
vendor through the async client (:mod:`.vendor_pool`); :class:`~.runtime_service.RuntimeService` fronts any other
protocol through the runtime's vendor binding. Both refine the same way, so an answer never depends on which
one served it.

Here, a batch's vendor calls run concurrently (within the client's bound on calls in flight). If any image's call
fails, the whole request fails and the other calls are cancelled: no answer is ever built from part of a
batch, or from a reply the client rejected. Each call carries this adapter's labels and template, so one
vendor client serves any number of adapters.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from craft_adapter.artifact.adapter_file import AdapterError
from craft_adapter.serve.server.image_decoding import decoded_all
from craft_adapter.serve.server.inputs import ApiError, hf_request
from craft_adapter.serve.server.off_loop import off_loop
from craft_adapter.serve.server.vendor_pool import VendorFailure, ZeroShotVendorClient
from craft_adapter.serve.shipped import ShippedAdapter
from craft_adapter.serve.vendor_binding import _returns as vendor_returns  # the runtime's rule, not a copy
from craft_adapter.serve.vendor_binding import head_problem
from craft_adapter.vendors.replies import SIGMOID, SOFTMAX, zero_shot_reply


def servable_problem(mode: str, logit_kind: str, source: str, vendor: Any = None,
                     head_dim: int | None = None) -> str | None:
    """Why an adapter of this mode and logit kind (with an embedding head of width ``head_dim``, if any) cannot sit
    in front of ``vendor``, or None.

    ``vendor`` None is the server's Hugging Face zero-shot client (probability scores); otherwise it is the vendor
    :func:`~craft_adapter.vendors.registry.make_vendor` built, judged by what it returns, whether it takes
    context vectors (``embed_soft``) and whether it returns image embeddings (for a head), as the runtime binds it
    (:mod:`craft_adapter.serve.vendor_binding`).
    """
    head = head_problem(vendor, head_dim, source)
    if head:
        return head
    if mode != "text" and not callable(getattr(vendor, "embed_soft", None)):
        return (f"{source} was fitted with soft prompts (context vectors), which a string API (a zero-shot or "
                "embedding HTTP vendor) cannot take; serve the .safetensors file through a protocol whose vendor "
                "accepts context vectors (embed_soft, e.g. a plug-in), or refit it in text mode")
    if vendor is None:
        if logit_kind not in (SOFTMAX, SIGMOID):
            return (f"{source} was fitted on vendor {logit_kind}, but a zero-shot vendor returns probabilities; "
                    "refit it against the zero-shot vendor, or serve it with the --protocol it was fitted through")
        return None
    returns = vendor_returns(vendor)
    if returns is not None and returns != logit_kind:
        return (f"{source} was fitted on vendor {logit_kind}, but this vendor returns {returns}; serve it with "
                "the --protocol it was fitted through (hf-zero-shot for probabilities), or refit")
    return None


def check_servable(adapter: ShippedAdapter, vendor: Any = None) -> None:
    """Raise :class:`AdapterError` unless ``adapter`` can sit in front of ``vendor`` (None: a zero-shot vendor)."""
    problem = servable_problem(adapter.mode, adapter.logit_kind, adapter.source, vendor, adapter.head_dim)
    if problem:
        raise AdapterError(problem)


@dataclass(frozen=True)
class Classified:
    """Refined probabilities and the vendor's raw scores, both ``[n, c]`` in the adapter's class order."""

    probabilities: np.ndarray
    vendor_scores: np.ndarray


class ServedAdapter:
    """An adapter behind the routes: its classes, and refinement of vendor scores; subclasses get the scores."""

    def __init__(self, adapter: ShippedAdapter) -> None:
        self.adapter = adapter
        self.index = {name: i for i, name in enumerate(adapter.class_names)}

    @property
    def class_names(self) -> list[str]:
        """The adapter's classes, in score order."""
        return self.adapter.class_names

    async def classify(self, images: list[bytes], deadline: float) -> Classified:
        """Refined predictions for checked image bytes by ``deadline``, or a :class:`VendorFailure`."""
        raise NotImplementedError

    def classified(self, scores: np.ndarray, embeddings: np.ndarray | None = None) -> Classified:
        """The refined answer for vendor scores ``[n, c]``, already checked complete and finite (and the image
        embeddings ``[n, d]`` an embedding vendor returned with them, which an adapter with a head reads)."""
        _, probabilities = self.adapter.refine(scores, embeddings)
        return Classified(np.asarray(probabilities), scores)


class AdapterService(ServedAdapter):
    """Scores images at a zero-shot vendor with the learned prompt and refines them; no per-request state."""

    def __init__(self, adapter: ShippedAdapter, client: ZeroShotVendorClient) -> None:
        check_servable(adapter)
        super().__init__(adapter)
        self.client = client

    async def classify(self, images: list[bytes], deadline: float) -> Classified:
        """Refined predictions for checked image bytes, or the first :class:`VendorFailure` of the batch."""
        encoded = [base64.b64encode(b).decode("ascii") for b in images]
        labels, template, kind = self.adapter.class_names, self.adapter.template, self.adapter.logit_kind
        if len(encoded) == 1:
            rows = [await self.client.scores(encoded[0], deadline, labels, template, kind)]
        else:
            failure: VendorFailure | None = None
            try:
                async with asyncio.TaskGroup() as group:  # one failure cancels the rest of the batch
                    tasks = [group.create_task(self.client.scores(e, deadline, labels, template, kind))
                             for e in encoded]
            except ExceptionGroup as errors:
                if not all(isinstance(e, VendorFailure) for e in errors.exceptions):
                    raise  # a bug, not a vendor failure: the route logs it whole
                # Python 3.11's TaskGroup.__aexit__ frame and its exception group hold each other, and the group's
                # traceback holds this frame, with the batch's images: cut, or they wait for a collection
                errors.__traceback__ = None
                failure = errors.exceptions[0]
            if failure is not None:
                del group, tasks  # a failed task holds its failure, whose traceback will hold this frame
                try:
                    raise failure  # outside the handler, so that its __context__ is not the group
                finally:
                    failure = None  # nor may this frame hold it once it has left
            rows = [t.result() for t in tasks]
        return self.classified(np.stack(rows))  # [n, c], each row checked complete and finite by the client


def top_answer(names: list[str], probabilities: np.ndarray, vendor_scores: np.ndarray | None,
               top_k: int) -> dict[str, object]:
    """One image's reply: best label and probability, the ``top_k`` labels, and optionally the raw scores."""
    order = np.argsort(-probabilities, kind="stable")[:top_k]
    answer: dict[str, object] = {
        "label": names[order[0]], "probability": float(probabilities[order[0]]),
        "top": [{"label": names[i], "probability": float(probabilities[i])} for i in order]}
    if vendor_scores is not None:
        answer["vendor_scores"] = dict(zip(names, vendor_scores.tolist(), strict=True))
    return answer


def zero_shot_answer(names: list[str], index: dict[str, int], probabilities: np.ndarray,
                     labels: list[str] | None) -> list[dict[str, object]]:
    """Hugging Face zero-shot reply, best first; with ``labels``, only those, renormalised over them."""
    picked = list(range(len(names))) if labels is None else [index[label] for label in labels]
    p = probabilities[picked].astype(np.float64)
    total = p.sum()
    # every chosen label's probability can underflow to 0 (the refiner put all the mass elsewhere): no evidence
    # between them, so they share it equally rather than dividing 0 by 0
    p = p / total if total > 0 else np.full(len(p), 1.0 / len(p))
    return zero_shot_reply([names[i] for i in picked], p)


async def refined_zero_shot(service: ServedAdapter, request: Any, config: Any, deadline: float, who: str) -> list:
    """The Hugging Face zero-shot answer to ``request`` from ``service``: the refined probabilities over the
    candidate labels (all classes when none are given), best first; 400 for a label ``who`` does not know."""
    image, labels = await hf_request(request, config.max_body_bytes)
    unknown = [label for label in labels or [] if label not in service.index]
    if unknown:
        raise ApiError(400, "unknown_labels", f"candidate labels {unknown[:5]} are not classes of {who}; it knows "
                       f"{service.class_names[:20]}")
    request.state.images = 1
    checked = await decoded_all([image], config.max_image_pixels, off_loop)
    result = await service.classify(checked, deadline)
    return zero_shot_answer(service.class_names, service.index, result.probabilities[0], labels)
