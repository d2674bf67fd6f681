"""Voyage AI multimodal embeddings: ``POST {base}/multimodalembeddings``, one input per image or text.

Request ``{"inputs": [{"content": [{"type": "image_base64", "image_base64": <data URI>} | {"type": "text", "text":
...}]}], "model": M, "input_type": null, "truncation": true}`` with ``Authorization: Bearer <key>``; reply
``{"object": "list", "data": [{"embedding": [...], "index": i}], "model", "usage": {"text_tokens", "image_pixels",
"total_tokens"}}``. Errors answer ``{"detail": str}`` (400 bad request or batch too large, 401, 403, 429, 5xx).
Limits: 1,000 inputs a request, 16 million pixels and 20 MB an image, 320,000 tokens a request (an image costs
about one token per 560 pixels). ``input_type`` stays ``null`` (no retrieval prompt prepended), as for a CLIP.
The base URL includes the version, as the ``voyageai`` SDK's ``base_url`` does. References:
https://docs.voyageai.com/reference/multimodal-embeddings-api, https://docs.voyageai.com/docs/multimodal-embeddings,
https://docs.voyageai.com/docs/error-codes.
"""

from __future__ import annotations

from typing import Any

from craft_adapter.vendors.credentials import Secret
from craft_adapter.vendors.embedding_requests import EmbeddingHttpClient, indexed_rows

VOYAGE_MAX_INPUTS = 1000


class VoyageEmbedVendor(EmbeddingHttpClient):
    """Voyage's multimodal embeddings endpoint as an embedding vendor."""

    protocol = "voyage"
    default_url = "https://api.voyageai.com/v1"

    def __init__(self, url: str | None = None, *, key: Secret | str | None = None, model: str | None = None,
                 logit_scale: float | None = None, max_images: int = VOYAGE_MAX_INPUTS,
                 max_texts: int = VOYAGE_MAX_INPUTS, input_type: str | None = None, timeout: float = 60.0,
                 headers: dict[str, str] | None = None) -> None:
        if input_type not in (None, "query", "document"):
            raise ValueError(f"Voyage input_type must be None, 'query' or 'document', got {input_type!r}")
        super().__init__(url, key=key, model=model or "voyage-multimodal-3.5", logit_scale=logit_scale,
                         max_images=max_images, max_texts=max_texts, timeout=timeout, headers=headers)
        self.input_type = input_type

    def endpoint(self) -> str:
        """``{base}/multimodalembeddings``."""
        return f"{self.url}/multimodalembeddings"

    def request_body(self, kind: str, inputs: list[str]) -> dict[str, Any]:
        """One chunk: each image or text its own single-item input."""
        item = (lambda x: {"type": "image_base64", "image_base64": x}) if kind == "image" else (
            lambda x: {"type": "text", "text": x})
        return {"inputs": [{"content": [item(x)]} for x in inputs], "model": self.model,
                "input_type": self.input_type, "truncation": True}

    def reply_rows(self, answer: Any, n: int) -> list[Any]:
        """``data[].embedding`` placed by ``data[].index``."""
        return indexed_rows(answer["data"], n)
