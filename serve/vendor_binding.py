"""What the runtime accepts as a vendor, bound to an adapter's learned prompt.

Three shapes are accepted, checked in this order:

- a :class:`CallableVendor`, or any plain callable ``(images, prompts) -> scores [n_images, n_prompts]``:
  the prompts are the adapter's template filled with each class name, in the adapter's class order;
- an embedding vendor (the :class:`~craft_adapter.vendors.protocols.EmbeddingBackend` protocol: ``embed_images``,
  ``embed_texts``). Its scores are cosine logits, ``adapter.logit_scale * cos(image_emb, text_emb)``, with the
  scale recorded at fit time and both embeddings L2-normalised here (:func:`~craft_adapter.vendors.replies.unit_rows`);
- a scoring vendor (the :class:`~craft_adapter.vendors.protocols.ScoringBackend` protocol: ``score(image, labels,
  template)``), such as the Hugging Face zero-shot clients in :mod:`craft_adapter.vendors.http_clients`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from craft_adapter.artifact.adapter_file import AdapterError
from craft_adapter.serve.shipped import ShippedAdapter
from craft_adapter.vendors.protocols import CallableVendor, EmbeddingBackend, ScoringBackend, fill
from craft_adapter.vendors.replies import check_answer, unit_rows

Scores = Callable[[Sequence[Image.Image]], np.ndarray]  # images -> raw vendor scores [n, c]


def _returns(vendor: Any) -> str | None:
    if isinstance(vendor, CallableVendor):
        return vendor.returns
    caps = getattr(vendor, "capabilities", None)
    return getattr(caps, "returns", None)


def bind_vendor(vendor: Any, adapter: ShippedAdapter) -> Scores:
    """A function from images to raw vendor scores ``[n, c]`` that sends ``adapter``'s learned prompt."""
    returns = _returns(vendor)
    if returns is not None and returns != adapter.logit_kind:
        raise AdapterError(f"the adapter was fitted on vendor {adapter.logit_kind}, but this vendor returns "
                           f"{returns}; serve it with the kind of vendor it was fitted with, or refit")
    names, template = adapter.class_names, adapter.template
    prompts = [fill(template, c) for c in names]
    if adapter.mode == "soft":
        return _soft_scores(vendor, adapter)
    if isinstance(vendor, CallableVendor) or (callable(vendor) and not isinstance(
            vendor, (EmbeddingBackend, ScoringBackend))):
        return lambda images: vendor(images, list(prompts))
    if isinstance(vendor, EmbeddingBackend):
        return _cosine_scores(vendor, adapter.logit_scale, lambda: vendor.embed_texts(prompts))
    if isinstance(vendor, ScoringBackend):
        return lambda images: _scoring_scores(vendor, images, names, template)
    raise TypeError(f"{type(vendor).__name__} is not a vendor: pass a callable (images, prompts) -> scores, an "
                    "embedding client (embed_images/embed_texts) or a scoring client (score)")


def _soft_scores(vendor: Any, adapter: ShippedAdapter) -> Scores:
    if adapter.ctx is None or not callable(getattr(vendor, "embed_soft", None)):
        raise AdapterError("this adapter was fitted with soft prompts (context vectors), which a string API cannot "
                           "take: serve the .safetensors file (it carries prompt.ctx) with a vendor that accepts "
                           "context vectors (embed_soft), or refit with text prompts for a string API")
    ctx = adapter.ctx[None]  # [1, n_ctx, width]
    return _cosine_scores(vendor, adapter.logit_scale, lambda: vendor.embed_soft(ctx, adapter.class_names)[0])


def _cosine_scores(vendor: Any, scale: float, class_embeddings: Callable[[], Any]) -> Scores:
    cache: list[np.ndarray] = []

    def scores(images: Sequence[Image.Image]) -> np.ndarray:
        if not cache:  # the prompt never changes, so its text embeddings are fetched once, on first use
            cache.append(unit_rows(class_embeddings()))  # [c, d]
        return scale * (unit_rows(vendor.embed_images(images)) @ cache[0].T)  # [n, c]
    return scores


def _scoring_scores(vendor: Any, images: Sequence[Image.Image], names: list[str], template: str) -> np.ndarray:
    out = np.empty((len(images), len(names)), np.float32)
    for i, image in enumerate(images):  # one vendor call per image: that is what a scoring API sells
        out[i] = check_answer(vendor.score(image, names, template), (len(names),))
    return out

