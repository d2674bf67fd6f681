"""Vendor clients over HTTP. Each is also a black-box backend (:mod:`craft_adapter.blackbox.box`), so fit can use it.

- :class:`HfInferenceVendor` wraps the real ``huggingface_hub.InferenceClient`` (zero-shot-image-classification).
- :class:`HttpZeroShotVendor` speaks the same protocol with the standard library only:
  POST ``{"inputs": <base64 image>, "parameters": {"candidate_labels": [...], "hypothesis_template": "..."}}``,
  answer ``[{"label": ..., "score": ...}, ...]`` (probabilities, any order).
  Both take ``scores="softmax"`` (the default: scores sum to 1) or ``"sigmoid"`` (independent per-label
  probabilities, as SigLIP endpoints answer); see :mod:`craft_adapter.vendors.replies`.
- :class:`EmbeddingApiVendor` calls an embedding API, the one ``craft-adapter vendor`` serves:
  POST ``/embed/images`` ``{"inputs": [<base64 image>, ...]}`` and POST ``/embed/texts`` ``{"inputs": [text, ...]}``,
  each answering ``{"embeddings": [[...], ...]}``; GET ``/info`` answers ``{"logit_scale": ...}``.
  Scores are cosine logits (see :mod:`craft_adapter.serve.vendor_binding`).

Every reply is read under :mod:`craft_adapter.vendors.http_limits` (no redirects, size caps, bounded gzip), and
vendor text reaches a message only through :func:`~craft_adapter.vendors.credentials.vendor_detail`, scrubbed of the
header key and of the URL's query values.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image

from craft_adapter.vendors.credentials import header_secrets, redact_url, url_secrets, vendor_detail
from craft_adapter.vendors.faults import VendorError, status_error
from craft_adapter.vendors.http_limits import MAX_REPLY_BYTES, open_capped, zero_shot_reply_cap
from craft_adapter.vendors.protocols import Capabilities
from craft_adapter.vendors.replies import (
    SOFTMAX,
    ScoreKindCheck,
    check_answer,
    reply_json,
    score_kind,
    unit_rows,
    zero_shot_request,
)
from craft_adapter.vendors.retries import as_vendor_error

ZERO_SHOT = Capabilities(style="scoring", text_prompts=True, soft_prompts=False, returns="probabilities")
EMBEDDING = Capabilities(style="embedding", text_prompts=True, soft_prompts=False, returns="logits")


def image_png(image: Image.Image) -> bytes:
    """``image`` as lossless PNG bytes, so the vendor sees exactly the pixels we have."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_base64(image: Image.Image) -> str:
    """``image`` as base64 PNG, the form the Hugging Face protocol sends."""
    return base64.b64encode(image_png(image)).decode("ascii")


def post_json(url: str, payload: Any, headers: dict[str, str] | None = None, timeout: float = 60.0,
              cap: int = MAX_REPLY_BYTES) -> Any:
    """POST ``payload`` as JSON and parse the JSON answer (at most ``cap`` bytes); every failure is a
    :class:`VendorError`."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    return _json_answer(request, timeout, cap)


def get_json(url: str, headers: dict[str, str] | None = None, timeout: float = 60.0) -> Any:
    """GET ``url`` and parse the JSON answer."""
    return _json_answer(urllib.request.Request(url, headers=headers or {}), timeout)


def _json_answer(request: urllib.request.Request, timeout: float, cap: int = MAX_REPLY_BYTES) -> Any:
    url = redact_url(request.full_url)  # messages and logs never carry a key from the URL
    secrets = header_secrets(request.header_items()) + url_secrets(request.full_url)
    try:
        status, headers, body = open_capped(request, timeout, cap)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
        reason = vendor_detail(str(getattr(e, "reason", e)) or type(e).__name__, secrets)
        raise VendorError(f"cannot reach the vendor at {url} ({reason}); is it running? "
                          "`craft-adapter vendor` serves one locally") from None
    if status >= 400:
        raise status_error(f"{url} answered HTTP {status}: {vendor_detail(body, secrets)}", status,
                           headers.get("Retry-After"))
    try:
        return reply_json(body)
    except VendorError:
        raise VendorError(f"{url} did not answer JSON: {vendor_detail(body, secrets)}") from None


def _reply_error(e: VendorError, where: str, secrets: list[str]) -> VendorError:
    """A reply rule's refusal naming the endpoint, with any vendor text in it scrubbed then cut."""
    return type(e)(f"{where} sent an unusable zero-shot reply: {vendor_detail(str(e), secrets, 600)}",
                   transient=e.transient, status=e.status, retry_after=e.retry_after)


def _zero_shot_capabilities(scores: str) -> tuple[Capabilities, str]:
    kind = score_kind(scores)
    return replace(ZERO_SHOT, returns=kind), kind


class HfInferenceVendor:
    """The real ``huggingface_hub.InferenceClient`` as a scoring vendor (one image per call).

    ``client`` is an ``InferenceClient`` or the URL of a zero-shot-image-classification endpoint; ``scores`` is
    the endpoint's score kind (``"softmax"`` or ``"sigmoid"``). Every failure is a :class:`VendorError`.
    """

    def __init__(self, client: Any, scores: str = "softmax") -> None:
        if isinstance(client, str):
            from huggingface_hub import InferenceClient

            client = InferenceClient(model=client)
        self.client = client
        self.capabilities, kind = _zero_shot_capabilities(scores)
        self._check = ScoreKindCheck(kind)
        self.identity = {"name": "hf-inference", "model": str(getattr(client, "model", None))}
        if kind != SOFTMAX:  # softmax identities stay as they were, so their cached answers stay valid
            self.identity["scores"] = scores
        token = getattr(client, "token", None)
        self._secrets = [token] if isinstance(token, str) and token else []
        self._secrets += header_secrets((getattr(client, "headers", None) or {}).items())

    def score(self, image: Image.Image, labels: Sequence[str], template: str) -> np.ndarray:
        """Scores ``[c]`` for one image, in ``labels`` order."""
        try:
            # this client sends bytes (not PIL images) base64-encoded when parameters are given
            answer = self.client.zero_shot_image_classification(
                image_png(image), candidate_labels=list(labels), hypothesis_template=template)
        except Exception as e:  # noqa: BLE001 (huggingface_hub's, requests' and aiohttp's errors: one type out)
            error = as_vendor_error(e)
            if error is None:
                raise
            status = f"HTTP {error.status}: " if error.status else ""
            raise VendorError(f"the Hugging Face endpoint failed ({status}{vendor_detail(e, self._secrets)})",
                              transient=error.transient, status=error.status,
                              retry_after=error.retry_after) from None
        # the client decodes the JSON into its own element objects; the reply rule reads them back as JSON reads
        decoded = [e if isinstance(e, dict) else {"label": getattr(e, "label", None),
                                                  "score": getattr(e, "score", None)} for e in answer]
        try:
            return self._check.scores(decoded, labels)
        except VendorError as e:
            raise _reply_error(e, "the Hugging Face endpoint", self._secrets) from None


class HttpZeroShotVendor:
    """A Hugging Face zero-shot-image-classification endpoint over plain HTTP (no huggingface_hub).

    ``scores`` is the endpoint's score kind: ``"softmax"`` (sum to 1) or ``"sigmoid"`` (independent).
    """

    def __init__(self, url: str, headers: dict[str, str] | None = None, timeout: float = 60.0,
                 scores: str = "softmax") -> None:
        self.url, self.headers, self.timeout = url, dict(headers or {}), timeout
        self.capabilities, kind = _zero_shot_capabilities(scores)
        self._check = ScoreKindCheck(kind)
        self.identity = {"name": "hf-zero-shot-http", "url": redact_url(url)}
        if kind != SOFTMAX:  # softmax identities stay as they were, so their cached answers stay valid
            self.identity["scores"] = scores
        self._secrets = header_secrets(self.headers.items()) + url_secrets(url)

    def score(self, image: Image.Image, labels: Sequence[str], template: str) -> np.ndarray:
        """Scores ``[c]`` for one image, in ``labels`` order."""
        answer = post_json(self.url, zero_shot_request(image_base64(image), labels, template), self.headers,
                           self.timeout, zero_shot_reply_cap(list(labels)))
        try:
            return self._check.scores(answer, labels)
        except VendorError as e:
            raise _reply_error(e, self.identity["url"], self._secrets) from None


class EmbeddingApiVendor:
    """An image/text embedding API as an embedding vendor; ``logit_scale`` defaults to the API's ``/info``."""

    capabilities = EMBEDDING

    def __init__(self, url: str, logit_scale: float | None = None, headers: dict[str, str] | None = None,
                 timeout: float = 60.0) -> None:
        self.url, self.headers, self.timeout = url.rstrip("/"), dict(headers or {}), timeout
        self._logit_scale = logit_scale
        self.identity = {"name": "embedding-api", "url": redact_url(self.url)}

    @property
    def logit_scale(self) -> float:
        """The multiplier that turns cosine similarity into logits."""
        if self._logit_scale is None:
            info = get_json(f"{self.url}/info", self.headers, self.timeout)
            if not isinstance(info, dict) or not isinstance(info.get("logit_scale"), (int, float)):
                raise VendorError(f"{redact_url(self.url)}/info gives no logit_scale; pass logit_scale= explicitly")
            self._logit_scale = float(info["logit_scale"])
        return self._logit_scale

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised image embeddings ``[n, d]`` (one vendor call)."""
        return self._embed("images", [image_base64(im) for im in images])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings ``[t, d]`` (one vendor call)."""
        return self._embed("texts", list(texts))

    def _embed(self, kind: str, inputs: list[str]) -> np.ndarray:
        url = f"{self.url}/embed/{kind}"
        answer = post_json(url, {"inputs": inputs}, self.headers, self.timeout)
        if not isinstance(answer, dict) or "embeddings" not in answer:
            secrets = header_secrets(self.headers.items()) + url_secrets(self.url)
            raise VendorError(f"{redact_url(url)} did not answer {{'embeddings': [[...], ...]}}: "
                              f"{vendor_detail(json.dumps(answer), secrets)}")
        return unit_rows(check_answer(answer["embeddings"], (len(inputs), None), source=redact_url(url)))
