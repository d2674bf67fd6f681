"""OpenAI-compatible ``POST {base}/embeddings`` with image inputs, as Infinity serves CLIP models.

Request ``{"model": M, "input": [...], "modality": "image" | "text", "encoding_format": "float" | "base64"}``, images
as ``data:image/png;base64,...`` URIs; reply ``{"data": [{"embedding": [...] | "<base64>", "index": i}], "usage":
{...}}``, where base64 is little-endian float32. Infinity caps a request at 32 images (hard-coded) and 2,048 texts
(``INFINITY_MAX_CLIENT_BATCH_SIZE``); over the cap it answers 422. Its route has no ``/v1`` unless the server sets
``INFINITY_URL_PREFIX``, so ``url`` is the base the ``/embeddings`` path is appended to, as the official ``openai``
client's ``base_url``. Reference: Infinity's ``/embeddings`` route (https://michaelfeil.github.io/infinity, and
``libs/infinity_emb/infinity_emb/fastapi_schemas/pymodels.py``); the OpenAI embeddings API reference
(https://platform.openai.com/docs/api-reference/embeddings/create) for the envelope.
"""

from __future__ import annotations

from typing import Any

from craft_adapter.vendors.credentials import Secret
from craft_adapter.vendors.embedding_requests import EmbeddingHttpClient, indexed_rows

INFINITY_MAX_IMAGES = 32
INFINITY_MAX_TEXTS = 2048


class OpenAIEmbeddingsVendor(EmbeddingHttpClient):
    """An OpenAI-compatible embeddings endpoint that takes images (``modality``), e.g. Infinity serving a CLIP."""

    protocol = "openai-embeddings"
    default_url = "http://127.0.0.1:7997"  # Infinity's default port

    def __init__(self, url: str | None = None, *, key: Secret | str | None = None, model: str | None = None,
                 logit_scale: float | None = None, max_images: int = INFINITY_MAX_IMAGES,
                 max_texts: int = INFINITY_MAX_TEXTS, encoding_format: str = "float", timeout: float = 60.0,
                 headers: dict[str, str] | None = None) -> None:
        if encoding_format not in ("float", "base64"):
            raise ValueError(f"encoding_format must be 'float' or 'base64', got {encoding_format!r}")
        super().__init__(url, key=key, model=model, logit_scale=logit_scale, max_images=max_images,
                         max_texts=max_texts, timeout=timeout, headers=headers)
        self.encoding_format = encoding_format

    def endpoint(self) -> str:
        """``{base}/embeddings``."""
        return f"{self.url}/embeddings"

    def request_body(self, kind: str, inputs: list[str]) -> dict[str, Any]:
        """One chunk: the inputs, their modality and the encoding; ``model`` only when one was named."""
        body: dict[str, Any] = {"input": inputs, "modality": kind, "encoding_format": self.encoding_format}
        if self.model is not None:  # Infinity serving one model resolves any name (or none) to it
            body["model"] = self.model
        return body

    def reply_rows(self, answer: Any, n: int) -> list[Any]:
        """``data[].embedding`` placed by ``data[].index``."""
        return indexed_rows(answer["data"], n)
