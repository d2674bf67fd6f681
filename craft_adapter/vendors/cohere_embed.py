"""Cohere Embed API v2: ``POST {base}/v2/embed`` with ``images`` (data URIs) or ``texts``.

Request ``{"model": M, "input_type": T, "images": [data URI, ...] | "texts": [...], "embedding_types": ["float"]}``
with ``Authorization: Bearer <key>``; reply ``{"id", "embeddings": {"float": [[...], ...]}, "texts", "images",
"meta"}`` in input order. Errors answer ``{"message": str, "id": str}``. Limits: 96 texts a request; images one a
request on Embed v3 models, and up to 96 (20 MB in all) on Embed v4. ``input_type`` is required: images go as
``"image"`` (which v4 reads as ``search_document``), class prompts as ``"search_query"``, the cross-modal pairing
the multimodal guide recommends. ``float`` is requested because the ``base64`` type's byte order is not documented.
References: https://docs.cohere.com/reference/embed (the OpenAPI spec ``cohere-openapi.yaml``, ``/v2/embed``),
https://docs.cohere.com/docs/multimodal-embeddings, https://docs.cohere.com/errors-reference.
"""

from __future__ import annotations

from typing import Any

from craft_adapter.vendors.credentials import Secret
from craft_adapter.vendors.embedding_requests import EmbeddingHttpClient

COHERE_MAX_TEXTS = 96
COHERE_MAX_IMAGES_V4 = 96
INPUT_TYPES = ("search_document", "search_query", "classification", "clustering", "image")


def images_per_request(model: str) -> int:
    """Cohere's image cap for ``model``: one image a request on Embed v3, 96 from Embed v4 on."""
    return 1 if "-v3" in model else COHERE_MAX_IMAGES_V4


class CohereEmbedVendor(EmbeddingHttpClient):
    """Cohere's multimodal Embed v2 endpoint as an embedding vendor."""

    protocol = "cohere"
    default_url = "https://api.cohere.com"

    def __init__(self, url: str | None = None, *, key: Secret | str | None = None, model: str | None = None,
                 logit_scale: float | None = None, max_images: int | None = None, max_texts: int = COHERE_MAX_TEXTS,
                 image_input_type: str = "image", text_input_type: str = "search_query", timeout: float = 60.0,
                 headers: dict[str, str] | None = None) -> None:
        model = model or "embed-v4.0"
        for t in (image_input_type, text_input_type):
            if t not in INPUT_TYPES:
                raise ValueError(f"Cohere input_type must be one of {INPUT_TYPES}, got {t!r}")
        super().__init__(url, key=key, model=model, logit_scale=logit_scale,
                         max_images=max_images or images_per_request(model), max_texts=max_texts, timeout=timeout,
                         headers=headers)
        self.input_types = {"image": image_input_type, "text": text_input_type}

    def endpoint(self) -> str:
        """``{base}/v2/embed``."""
        return f"{self.url}/v2/embed"

    def request_body(self, kind: str, inputs: list[str]) -> dict[str, Any]:
        """One chunk as ``images`` or ``texts``, float embeddings requested."""
        return {"model": self.model, "input_type": self.input_types[kind],
                "images" if kind == "image" else "texts": inputs, "embedding_types": ["float"]}

    def reply_rows(self, answer: Any, n: int) -> list[Any]:
        """``embeddings.float``, in input order."""
        rows = answer["embeddings"]["float"]
        if not isinstance(rows, list) or len(rows) != n:
            raise ValueError(f"expected {n} float embeddings")
        return rows
