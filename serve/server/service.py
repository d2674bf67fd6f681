"""The adapted classifier behind the server: vendor scores for every image, then the refiner, or a typed failure.

A batch's vendor calls run concurrently (within the client's bound on calls in flight). If any image's call
fails, the whole request fails and the other calls are cancelled: no answer is ever built from part of a
batch, or from a reply the client rejected. Each call carries this adapter's labels and template, so one
vendor client serves any number of adapters.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass

import numpy as np

from craft_adapter.artifact.adapter_file import AdapterError
from craft_adapter.serve.server.vendor_pool import VendorFailure, ZeroShotVendorClient
from craft_adapter.serve.shipped import ShippedAdapter
from craft_adapter.vendors.replies import SIGMOID, SOFTMAX, zero_shot_reply


def servable_problem(mode: str, logit_kind: str, source: str) -> str | None:
    """Why an adapter of this mode and logit kind cannot sit in front of a zero-shot vendor, or None."""
    if mode != "text":
        return (f"{source} was fitted with soft prompts (context vectors), which a zero-shot HTTP vendor cannot "
                "take; refit it in text mode to serve it in front of a vendor URL")
    if logit_kind not in (SOFTMAX, SIGMOID):
        return (f"{source} was fitted on vendor {logit_kind}, but a zero-shot vendor returns probabilities; "
                "refit it against the zero-shot vendor")
    return None


def check_servable(adapter: ShippedAdapter) -> None:
    """Raise :class:`AdapterError` unless ``adapter`` can sit in front of a zero-shot (probabilities) vendor."""
    problem = servable_problem(adapter.mode, adapter.logit_kind, adapter.source)
    if problem:
        raise AdapterError(problem)


@dataclass(frozen=True)
class Classified:
    """Refined probabilities and the vendor's raw scores, both ``[n, c]`` in the adapter's class order."""

    probabilities: np.ndarray
    vendor_scores: np.ndarray


class AdapterService:
    """Scores images at the vendor with the learned prompt and refines them; holds no per-request state."""

    def __init__(self, adapter: ShippedAdapter, client: ZeroShotVendorClient) -> None:
        check_servable(adapter)
        self.adapter, self.client = adapter, client
        self.index = {name: i for i, name in enumerate(adapter.class_names)}

    @property
    def class_names(self) -> list[str]:
        """The adapter's classes, in score order."""
        return self.adapter.class_names

    async def classify(self, images: list[bytes], deadline: float) -> Classified:
        """Refined predictions for checked image bytes, or the first :class:`VendorFailure` of the batch."""
        encoded = [base64.b64encode(b).decode("ascii") for b in images]
        labels, template, kind = self.adapter.class_names, self.adapter.template, self.adapter.logit_kind
        if len(encoded) == 1:
            rows = [await self.client.scores(encoded[0], deadline, labels, template, kind)]
        else:
            try:
                async with asyncio.TaskGroup() as group:  # one failure cancels the rest of the batch
                    tasks = [group.create_task(self.client.scores(e, deadline, labels, template, kind))
                             for e in encoded]
            except* VendorFailure as failures:
                raise failures.exceptions[0] from None
            rows = [t.result() for t in tasks]
        scores = np.stack(rows)  # [n, c], each row checked complete and finite by the client
        _, probabilities = self.adapter.refine(scores)
        return Classified(np.asarray(probabilities), scores)


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
