"""What a vendor is, to craft-adapter: the backend protocols and their capabilities, torch-free.

A backend is *embedding style* (image and text embeddings; logits = scale x cosine), *scoring style* (one image
and the class prompts per call, as the Hugging Face zero-shot API), or any Python callable
``(images, prompts) -> scores``. Training reaches a backend only through :mod:`craft_adapter.blackbox`; the
runtime binds one to a shipped adapter in :mod:`craft_adapter.serve.vendor_binding`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from PIL import Image

MEMORY_BUDGET_MB = 512.0  # default memory for one chunk of a fit's work: a generation's fitness, one encoding batch


@dataclass(frozen=True)
class Capabilities:
    """What a backend accepts and returns.

    ``returns``: ``"logits"`` (any real scores), ``"probabilities"`` (a softmax over the labels, summing to 1) or
    ``"independent_probabilities"`` (one sigmoid per label, each in [0, 1]); the fitted adapter records it as its
    ``logit_kind`` and accepts only a vendor returning the same.
    """

    style: Literal["embedding", "scoring"]
    text_prompts: bool = True
    soft_prompts: bool = False
    returns: Literal["logits", "probabilities", "independent_probabilities"] = "logits"


@runtime_checkable
class EmbeddingBackend(Protocol):
    """A vendor that returns image and text embeddings; logits are ``logit_scale * cosine``."""

    capabilities: Capabilities
    logit_scale: float
    identity: dict

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised image embeddings ``[n, d]`` (one vendor call)."""
        ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings ``[t, d]`` (one vendor call)."""
        ...


@runtime_checkable
class SoftPromptBackend(EmbeddingBackend, Protocol):
    """An embedding vendor that also takes context vectors in its token-embedding space."""

    def soft_prompt_init(self, text: str) -> np.ndarray:
        """Token embeddings ``[n_ctx, width]`` of ``text`` (the p0 of the paper)."""
        ...

    def embed_soft(self, ctx: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
        """Text embeddings ``[p, c, d]`` of ``ctx [p, n_ctx, width]`` followed by each class name."""
        ...

    def describe_soft(self, ctx: np.ndarray) -> str:
        """A human reading of ``ctx [n_ctx, width]``: the nearest vocabulary token at each position."""
        ...


@runtime_checkable
class ScoringBackend(Protocol):
    """A vendor that scores one image against class prompts per call (Hugging Face zero-shot style)."""

    capabilities: Capabilities
    identity: dict

    def score(self, image: Image.Image, labels: Sequence[str], template: str) -> np.ndarray:
        """Per-class scores ``[c]`` for one image, labels in the given order."""
        ...


def fill(template: str, class_name: str) -> str:
    """The prompt for one class: ``template`` with ``{}`` replaced by the class name."""
    if template.count("{}") != 1:
        raise ValueError(f"a prompt template needs exactly one '{{}}' for the class name: {template!r}")
    return template.replace("{}", class_name)


@dataclass
class CallableVendor:
    """Any Python callable ``(images, prompts) -> scores [n_images, n_prompts]`` as a vendor.

    ``returns`` says whether the scores are ``"logits"``, ``"probabilities"`` (softmax) or
    ``"independent_probabilities"`` (sigmoid); ``None`` trusts that they are what the adapter was fitted on.
    """

    fn: Callable[[Sequence[Image.Image], list[str]], Any]
    returns: str | None = None

    def __call__(self, images: Sequence[Image.Image], prompts: list[str]) -> Any:
        """Forward to the wrapped callable."""
        return self.fn(images, prompts)

