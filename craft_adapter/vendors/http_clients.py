"""Vendor clients over HTTP. Each is also a black-box backend (:mod:`craft_adapter.blackbox.box`), so fit can use it.

- :class:`HfInferenceVendor` wraps the real ``huggingface_hub.InferenceClient`` (zero-shot-image-classification).
- :class:`HttpZeroShotVendor` speaks the same protocol with the standard library only:
  POST ``{"inputs": <base64 image>, "parameters": {"candidate_labels": [...], "hypothesis_template": "..."}}``,
  answer ``[{"label": ..., "score": ...}, ...]`` (probabilities, any order).
- :class:`EmbeddingApiVendor` calls an embedding API, the one ``craft-adapter vendor`` serves:
  POST ``/embed/images`` ``{"inputs": [<base64 image>, ...]}`` and POST ``/embed/texts`` ``{"inputs": [text, ...]}``,
  each answering ``{"embeddings": [[...], ...]}``; GET ``/info`` answers ``{"logit_scale": ...}``.
  Scores are cosine logits (see :mod:`craft_adapter.serve.vendor_binding`).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from craft_adapter.vendors.credentials import header_secrets, redact_url, scrub_secrets
from craft_adapter.vendors.faults import VendorError, status_error
from craft_adapter.vendors.protocols import Capabilities
from craft_adapter.vendors.replies import check_answer, unit_rows, zero_shot_request, zero_shot_scores

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


def post_json(url: str, payload: Any, headers: dict[str, str] | None = None, timeout: float = 60.0) -> Any:
    """POST ``payload`` as JSON and parse the JSON answer; HTTP and network failures become :class:`VendorError`."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    return _json_answer(request, timeout)


def get_json(url: str, headers: dict[str, str] | None = None, timeout: float = 60.0) -> Any:
    """GET ``url`` and parse the JSON answer."""
    return _json_answer(urllib.request.Request(url, headers=headers or {}), timeout)


def _json_answer(request: urllib.request.Request, timeout: float) -> Any:
    url = redact_url(request.full_url)  # messages and logs never carry a key from the URL
    secrets = header_secrets(request.header_items())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        detail = scrub_secrets(e.read()[:500].decode("utf-8", "replace"), secrets)
        raise status_error(f"{url} answered HTTP {e.code}: {detail}", e.code, e.headers.get("Retry-After")) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
        reason = scrub_secrets(str(getattr(e, "reason", e)) or type(e).__name__, secrets)
        raise VendorError(f"cannot reach the vendor at {url} ({reason}); is it running? "
                          "`craft-adapter vendor` serves one locally") from None
    try:
        return json.loads(body)
    except ValueError:
        raise VendorError(f"{url} did not answer JSON: {scrub_secrets(repr(body[:200]), secrets)}") from None


def _zero_shot_scores(answer: Any, labels: Sequence[str], where: str) -> np.ndarray:
    """The one zero-shot reply rule (:func:`zero_shot_scores`), its refusal naming the endpoint."""
    try:
        return zero_shot_scores(answer, labels)
    except VendorError as e:
        raise VendorError(f"{where} sent an unusable zero-shot reply: {e}") from None


class HfInferenceVendor:
    """The real ``huggingface_hub.InferenceClient`` as a scoring vendor (one image per call).

    ``client`` is an ``InferenceClient`` or the URL of a zero-shot-image-classification endpoint.
    """

    capabilities = ZERO_SHOT

    def __init__(self, client: Any) -> None:
        if isinstance(client, str):
            from huggingface_hub import InferenceClient

            client = InferenceClient(model=client)
        self.client = client
        self.identity = {"name": "hf-inference", "model": str(getattr(client, "model", None))}

    def score(self, image: Image.Image, labels: Sequence[str], template: str) -> np.ndarray:
        """Probabilities ``[c]`` for one image, in ``labels`` order."""
        # this client sends bytes (not PIL images) base64-encoded when parameters are given
        answer = self.client.zero_shot_image_classification(
            image_png(image), candidate_labels=list(labels), hypothesis_template=template)
        # the client decodes the JSON into its own element objects; the reply rule reads them back as JSON reads
        decoded = [e if isinstance(e, dict) else {"label": getattr(e, "label", None),
                                                  "score": getattr(e, "score", None)} for e in answer]
        return _zero_shot_scores(decoded, labels, "the Hugging Face endpoint")


class HttpZeroShotVendor:
    """A Hugging Face zero-shot-image-classification endpoint over plain HTTP (no huggingface_hub)."""

    capabilities = ZERO_SHOT

    def __init__(self, url: str, headers: dict[str, str] | None = None, timeout: float = 60.0) -> None:
        self.url, self.headers, self.timeout = url, dict(headers or {}), timeout
        self.identity = {"name": "hf-zero-shot-http", "url": redact_url(url)}

    def score(self, image: Image.Image, labels: Sequence[str], template: str) -> np.ndarray:
        """Probabilities ``[c]`` for one image, in ``labels`` order."""
        answer = post_json(self.url, zero_shot_request(image_base64(image), labels, template), self.headers,
                           self.timeout)
        return _zero_shot_scores(answer, labels, self.identity["url"])


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
            raise VendorError(f"{redact_url(url)} did not answer {{'embeddings': [[...], ...]}}: {str(answer)[:200]}")
        return unit_rows(check_answer(answer["embeddings"], (len(inputs), None), source=redact_url(url)))
