"""What the runtime accepts as a vendor, bound to an adapter's learned prompt.

Three shapes are accepted, checked in this order:

- a :class:`CallableVendor`, or any plain callable ``(images, prompts) -> scores [n_images, n_prompts]``:
  the prompts are the adapter's template filled with each class name, in the adapter's class order;
- an embedding vendor (the :class:`~craft_adapter.vendors.protocols.EmbeddingBackend` protocol: ``embed_images``,
  ``embed_texts``). Its scores are cosine logits, ``adapter.logit_scale * cos(image_emb, text_emb)``, with the
  scale recorded at fit time and both embeddings L2-normalised here (:func:`~craft_adapter.vendors.replies.unit_rows`);
- a scoring vendor (the :class:`~craft_adapter.vendors.protocols.ScoringBackend` protocol: ``score(image, labels,
  template)``), such as the Hugging Face zero-shot clients in :mod:`craft_adapter.vendors.http_clients`. It is
  called once per image, with at most ``concurrency`` calls in flight; answers are placed by index, so the result
  never depends on which call finished first, and after a call fails for good nothing more is sent.

An adapter with an embedding head also reads the image embeddings an embedding vendor returns:
:func:`bind_vendor_outputs` gives them beside the scores (L2-normalised, as the cosine uses them), and binding such
an adapter to a vendor that returns only scores (a callable, a scoring vendor) is an :class:`AdapterError`, as is
an embedding vendor whose embeddings are not as wide as the head (found at its first answer).

Every vendor call goes through the one retry loop (:func:`~craft_adapter.vendors.retries.call_with_retries`, the
rules fit and the server follow), with each answer checked inside it, so a garbled answer is retried like a 503.
A vendor fault of any vendor class (our clients' errors, requests/httpx/huggingface_hub HTTP errors, timeouts,
dropped connections) leaves as one type, :class:`~craft_adapter.vendors.faults.VendorError`, with ``transient``,
``status`` and ``retry_after``; an exception that is no vendor fault (a bug in a callable) is re-raised unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from craft_adapter.artifact.adapter_file import AdapterError
from craft_adapter.serve.shipped import ShippedAdapter
from craft_adapter.vendors.protocols import CallableVendor, EmbeddingBackend, ScoringBackend, fill
from craft_adapter.vendors.replies import PROBABILITY_KINDS, check_answer, unit_rows
from craft_adapter.vendors.retries import RetryPolicy, call_with_retries

Scores = Callable[[Sequence[Image.Image]], np.ndarray]  # images -> raw vendor scores [n, c]
# images -> (raw vendor scores [n, c], L2-normalised image embeddings [n, d] or None when the vendor gives none)
Outputs = Callable[[Sequence[Image.Image]], tuple[np.ndarray, np.ndarray | None]]
DEFAULT_CONCURRENCY = 8  # scoring calls in flight per batch


class _Calls:
    """Vendor calls under one retry policy: ``call(fn, check)`` is ``check(fn())``, retried, or a VendorError."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def call(self, fn: Callable[[], Any], check: Callable[[Any], np.ndarray]) -> np.ndarray:
        return call_with_retries(lambda: check(fn()), self.policy)


def _returns(vendor: Any) -> str | None:
    if isinstance(vendor, CallableVendor):
        return vendor.returns
    caps = getattr(vendor, "capabilities", None)
    return getattr(caps, "returns", None)


def bind_vendor(vendor: Any, adapter: ShippedAdapter, retry: RetryPolicy | None = None,
                concurrency: int = DEFAULT_CONCURRENCY) -> Scores:
    """A function from images to raw vendor scores ``[n, c]`` that sends ``adapter``'s learned prompt, retrying
    transient faults under ``retry`` and running a scoring vendor's per-image calls ``concurrency`` at a time."""
    outputs = bind_vendor_outputs(vendor, adapter, retry, concurrency)
    return lambda images: outputs(images)[0]


def head_problem(vendor: Any, head_dim: int | None, source: str = "this adapter") -> str | None:
    """Why an adapter with an embedding head (``head_dim`` not None) cannot read ``vendor``'s answers, or None."""
    if head_dim is None:
        return None
    embeds = isinstance(vendor, EmbeddingBackend) and not isinstance(vendor, CallableVendor)
    if not embeds:
        return (f"{source} has an embedding head, which reads the image embeddings an embedding vendor returns "
                f"(in-process model, openai-embeddings, cohere, voyage, embedding-api); "
                f"{'a zero-shot vendor' if vendor is None else type(vendor).__name__} returns only scores: serve "
                "it through the embedding vendor it was fitted on, or refit it without --embedding-head")
    return None


def bind_vendor_outputs(vendor: Any, adapter: ShippedAdapter, retry: RetryPolicy | None = None,
                        concurrency: int = DEFAULT_CONCURRENCY) -> Outputs:
    """As :func:`bind_vendor`, giving also the image embeddings an embedding vendor returned (else None); an
    adapter with an embedding head is refused (:class:`AdapterError`) unless the vendor returns them."""
    head_dim = getattr(adapter, "head_dim", None)
    problem = head_problem(vendor, head_dim)
    if problem:
        raise AdapterError(problem)
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    calls = _Calls(retry or RetryPolicy())
    returns = _returns(vendor)
    if returns is not None and returns != adapter.logit_kind:
        raise AdapterError(f"the adapter was fitted on vendor {adapter.logit_kind}, but this vendor returns "
                           f"{returns}; serve it with the kind of vendor it was fitted with, or refit")
    names, template = adapter.class_names, adapter.template
    prompts = [fill(template, c) for c in names]
    c, probabilities = len(names), adapter.logit_kind in PROBABILITY_KINDS
    if adapter.mode == "soft":
        return _soft_scores(vendor, adapter, calls)
    if isinstance(vendor, CallableVendor) or (callable(vendor) and not isinstance(
            vendor, (EmbeddingBackend, ScoringBackend))):
        return lambda images: (calls.call(lambda: vendor(images, list(prompts)), lambda a: check_answer(
            a, (len(images), c), probabilities=probabilities)), None)
    if isinstance(vendor, EmbeddingBackend):
        return _cosine_scores(vendor, adapter.logit_scale, lambda: vendor.embed_texts(prompts), calls, head_dim)
    if isinstance(vendor, ScoringBackend):
        return lambda images: (_scoring_scores(vendor, images, names, template, calls, concurrency, probabilities),
                               None)
    raise TypeError(f"{type(vendor).__name__} is not a vendor: pass a callable (images, prompts) -> scores, an "
                    "embedding client (embed_images/embed_texts) or a scoring client (score)")


def _soft_scores(vendor: Any, adapter: ShippedAdapter, calls: _Calls) -> Outputs:
    if adapter.ctx is None or not callable(getattr(vendor, "embed_soft", None)):
        raise AdapterError("this adapter was fitted with soft prompts (context vectors), which a string API cannot "
                           "take: serve the .safetensors file (it carries prompt.ctx) with a vendor that accepts "
                           "context vectors (embed_soft), or refit with text prompts for a string API")
    ctx = adapter.ctx[None]  # [1, n_ctx, width]
    return _cosine_scores(vendor, adapter.logit_scale, lambda: vendor.embed_soft(ctx, adapter.class_names)[0],
                          calls, getattr(adapter, "head_dim", None))


def _cosine_scores(vendor: Any, scale: float, class_embeddings: Callable[[], Any], calls: _Calls,
                   head_dim: int | None = None) -> Outputs:
    cache: list[np.ndarray] = []

    def outputs(images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        if not cache:  # the prompt never changes, so its text embeddings are fetched once, on first use
            text = unit_rows(calls.call(class_embeddings, lambda a: check_answer(a, (None, None))))  # [c, d]
            if head_dim is not None and text.shape[1] != head_dim:  # the image embeddings are checked against it
                raise AdapterError(f"the adapter's embedding head reads {head_dim}-dimensional embeddings, but the "
                                   f"vendor returns {text.shape[1]}-dimensional ones: serve it with the model it was "
                                   "fitted on")
            cache.append(text)
        d = cache[0].shape[1]
        emb = unit_rows(calls.call(lambda: vendor.embed_images(images), lambda a: check_answer(a, (len(images), d))))
        return scale * (emb @ cache[0].T), emb  # [n, c], [n, d]
    return outputs


def _scoring_scores(vendor: Any, images: Sequence[Image.Image], names: list[str], template: str, calls: _Calls,
                    concurrency: int, probabilities: bool) -> np.ndarray:
    out = np.empty((len(images), len(names)), np.float32)
    failed = threading.Event()  # once a call fails for good, the calls not yet sent are not sent

    def one(i: int) -> None:  # one vendor call per image: that is what a scoring API sells
        if failed.is_set():
            return
        try:
            out[i] = calls.call(lambda: vendor.score(images[i], names, template),
                                lambda a: check_answer(a, (len(names),), probabilities=probabilities))
        except BaseException:
            failed.set()
            raise

    if concurrency == 1 or len(images) <= 1:
        for i in range(len(images)):
            one(i)
        return out
    with ThreadPoolExecutor(max_workers=min(concurrency, len(images)), thread_name_prefix="vendor") as pool:
        futures = [pool.submit(one, i) for i in range(len(images))]
        errors = [f.exception() for f in futures]  # waits for every call; answers are placed by index
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return out


