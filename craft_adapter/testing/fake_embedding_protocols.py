"""The three request handlers of :mod:`craft_adapter.testing.fake_embedding_servers`, one per published API shape.

Each takes the server (its model, key, limits), the request headers and the decoded JSON body, and returns the
200 reply or raises :class:`Answer` with the documented status and error body. The documentation pages they follow
are named in :mod:`craft_adapter.testing.fake_embedding_servers`.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)(;charset=[\w-]+)?;base64,(?P<data>.*)$", re.S)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")
Server = Any  # a FakeEmbeddingServer: its backend, key, limits and embed()


class Answer(Exception):
    """A reply other than 200, raised from the protocol handlers."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def decode_data_uri(uri: str) -> tuple[str, Image.Image]:
    """``(mediatype, image)`` from a base64 data URI; ValueError if it is not one or does not decode."""
    m = DATA_URI.match(uri)
    if not m:
        raise ValueError("not a base64 data URI")
    try:
        with Image.open(io.BytesIO(base64.b64decode(m["data"], validate=True))) as im:
            im.load()
            return m["type"], im.copy()
    except (binascii.Error, UnidentifiedImageError, OSError) as e:
        raise ValueError(f"the image does not decode ({e})") from None


def _vectors(emb: np.ndarray, base64_out: bool) -> list[Any]:
    rows = np.asarray(emb, dtype="<f4")
    return [base64.b64encode(r.tobytes()).decode() if base64_out else r.tolist() for r in rows]


# -- openai-embeddings (Infinity) --------------------------------------------------------------------------
def unprocessable(loc: str, msg: str, kind: str = "value_error") -> Answer:
    """FastAPI's 422 body for one invalid field, as Infinity answers a request its schema refuses."""
    return Answer(422, {"detail": [{"type": kind, "loc": ["body", loc], "msg": msg}]})


def _infinity_error(status: int, message: str) -> Answer:
    return Answer(status, {"error": {"message": message, "type": None, "param": None, "code": status}})


def _openai(server: Server, headers: Any, body: Any) -> dict[str, Any]:
    if server.key is not None and headers.get("Authorization") != f"Bearer {server.key}":
        raise Answer(401, {"detail": "Unauthorized"}, {"WWW-Authenticate": "Bearer"})
    if not isinstance(body, dict):
        raise unprocessable("", "Input should be a valid dictionary", "model_attributes_type")
    modality = body.get("modality", "text")
    if modality not in ("text", "image", "audio"):
        raise unprocessable("modality", f"Input tag '{modality}' found using 'modality' does not match any of the "
                             "expected tags: 'text', 'image', 'audio'", "union_tag_invalid")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise unprocessable("encoding_format", "Input should be 'float' or 'base64'", "enum")
    inputs = body.get("input")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    batch = server.max_batch or 2048
    cap = batch if modality == "text" else min(32, batch)
    if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
        raise unprocessable("input", "Input should be a valid list of strings", "list_type")
    if not 1 <= len(inputs) <= cap:
        raise unprocessable("input", f"List should have at least 1 item and at most {cap} items after "
                             f"validation, not {len(inputs)}", "too_long" if inputs else "too_short")
    if modality == "audio":
        raise _infinity_error(400, f"ModelNotDeployedError: model={server.model_name} does not support embed for "
                              "modality audio")
    if modality == "image":
        if not all(DATA_URI.match(x) or x.startswith(("http://", "https://")) for x in inputs):
            raise unprocessable("input", "Input should be a valid data URI or URL", "url_parsing")
        try:
            items: list[Any] = [decode_data_uri(x)[1] for x in inputs]
        except ValueError as e:  # an http(s) URL lands here too: this server is offline
            raise _infinity_error(400, f"ImageCorruption: {e}") from None
    else:
        items = [x.strip() for x in inputs]
    emb = server.embed(modality, items)
    used = sum(len(x) for x in inputs)
    return {"object": "list", "model": server.model_name, "id": f"infinity-{uuid.uuid4()}", "created": int(time.time()),
            "data": [{"object": "embedding", "embedding": v, "index": i}
                     for i, v in enumerate(_vectors(emb, fmt == "base64"))],
            "usage": {"prompt_tokens": used, "total_tokens": used}}


# -- cohere (Embed v2) -------------------------------------------------------------------------------------
def _cohere_error(status: int, message: str) -> Answer:
    return Answer(status, {"id": str(uuid.uuid4()), "message": message})


def _cohere(server: Server, headers: Any, body: Any) -> dict[str, Any]:
    auth = headers.get("Authorization") or ""
    if not auth.startswith("Bearer ") or not auth[7:].strip():
        raise _cohere_error(401, "no api key supplied")
    if server.key is not None and auth != f"Bearer {server.key}":
        raise _cohere_error(401, "invalid api token")
    if not isinstance(body, dict):
        raise _cohere_error(400, "invalid request: the body must be a JSON object")
    model, input_type = body.get("model"), body.get("input_type")
    if not isinstance(model, str) or not model:
        raise _cohere_error(400, "invalid request: model must be provided")
    if input_type not in ("search_document", "search_query", "classification", "clustering", "image"):
        raise _cohere_error(400, "invalid request: valid input_type must be provided with the provided model")
    given = [k for k in ("texts", "images", "inputs") if body.get(k) is not None]
    if len(given) != 1:
        raise _cohere_error(400, "invalid request: exactly one of texts, images or inputs must be provided")
    types = body.get("embedding_types") or ["float"]
    if not isinstance(types, list) or not set(types) <= {"float", "int8", "uint8", "binary", "ubinary", "base64"}:
        raise _cohere_error(400, f"invalid request: invalid embedding_types {types}")
    if not set(types) <= {"float", "base64"}:  # a fake's limit, said plainly rather than answered wrongly
        raise _cohere_error(501, "this fake server answers only the float and base64 embedding types")
    items = body[given[0]]
    if given[0] == "inputs":
        raise _cohere_error(501, "this fake server answers texts and images, not inputs")
    if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
        raise _cohere_error(400, f"invalid request: {given[0]} must be a non-empty list of strings")
    meta: dict[str, Any] = {"api_version": {"version": "2"}}
    if given[0] == "texts":
        cap = server.max_batch or 96
        if len(items) > cap:
            raise _cohere_error(400, f"invalid request: total number of texts must be at most {cap} - received "
                                f"{len(items)}")
        emb, described = server.embed("text", items), None
        meta["billed_units"] = {"input_tokens": sum(len(t.split()) for t in items)}
    else:
        v3 = "-v3" in model
        if v3 and len(items) > 1:
            raise _cohere_error(400, "invalid request: only one image is supported per request for this model")
        if sum(len(x) for x in items) > (5 if v3 else 20) * 2**20:
            raise _cohere_error(400, f"invalid request: images exceed the {5 if v3 else 20} MB limit")
        decoded = []
        for x in items:
            try:
                mediatype, image = decode_data_uri(x)
            except ValueError as e:
                raise _cohere_error(400, f"invalid request: image is not a valid base64 data URI ({e})") from None
            if mediatype not in IMAGE_TYPES:
                raise _cohere_error(400, f"invalid request: unsupported image type {mediatype}")
            decoded.append((mediatype, image))
        emb = server.embed("image", [im for _, im in decoded])
        described = [{"width": im.width, "height": im.height, "format": t.split("/")[1], "bit_depth": 8}
                     for t, im in decoded]
        meta["billed_units"] = {"images": len(items)}
    return {"id": str(uuid.uuid4()), "response_type": "embeddings_by_type", "meta": meta,
            "embeddings": {t: _vectors(emb, t == "base64") for t in types},
            "texts": items if given[0] == "texts" else [], **({"images": described} if described else {})}


# -- voyage (multimodal embeddings) ------------------------------------------------------------------------
def _voyage_error(status: int, message: str) -> Answer:
    return Answer(status, {"detail": message})


def _voyage(server: Server, headers: Any, body: Any) -> dict[str, Any]:
    if server.key is None or headers.get("Authorization") != f"Bearer {server.key}":
        raise _voyage_error(401, "Provided API key is invalid.")
    if not isinstance(body, dict):
        raise _voyage_error(400, "Request body must be a JSON object.")
    inputs, model = body.get("inputs"), body.get("model")
    if not isinstance(model, str) or not model:
        raise _voyage_error(400, "Field 'model' is required.")
    if body.get("input_type") not in (None, "query", "document"):
        raise _voyage_error(400, "Value of 'input_type' must be one of None, 'query', 'document'.")
    fmt = body.get("output_encoding", body.get("encoding_format"))
    if fmt not in (None, "base64"):
        raise _voyage_error(400, "Value of 'output_encoding' must be None or 'base64'.")
    cap = server.max_batch or 1000
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= cap:
        raise _voyage_error(400, f"The batch size limit is {cap}: 'inputs' must hold 1 to {cap} inputs.")
    kinds, rows, pixels, words = set(), [], 0, 0
    for n, entry in enumerate(inputs):
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, list) or not content:
            raise _voyage_error(400, f"inputs[{n}].content must be a non-empty list.")
        parts: list[np.ndarray] = []
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            kinds.add(kind)
            if kind == "text" and isinstance(item.get("text"), str):
                words += len(item["text"].split())
                parts.append(server.embed("text", [item["text"]])[0])
            elif kind == "image_base64" and isinstance(item.get("image_base64"), str):
                try:
                    mediatype, image = decode_data_uri(item["image_base64"])
                except ValueError as e:
                    raise _voyage_error(400, f"inputs[{n}]: image_base64 must be a valid data URL ({e}).") from None
                if mediatype not in IMAGE_TYPES or image.width * image.height > 16_000_000:
                    raise _voyage_error(400, f"inputs[{n}]: images must be PNG, JPEG, WEBP or GIF of at most "
                                        "16 million pixels.")
                pixels += image.width * image.height
                parts.append(server.embed("image", [image])[0])
            elif kind == "image_url":
                raise _voyage_error(400, f"inputs[{n}]: the image URL could not be fetched.")  # offline
            else:
                raise _voyage_error(400, f"inputs[{n}]: content items are text, image_url or image_base64.")
        fused = np.mean(parts, axis=0)
        rows.append(fused / max(float(np.linalg.norm(fused)), 1e-12))
    if {"image_url", "image_base64"} <= kinds:
        raise _voyage_error(400, "A request may use image_url or image_base64, not both.")
    tokens = words + pixels // 560
    if tokens > 320_000:
        raise _voyage_error(400, f"The request has {tokens} tokens, over the limit of 320000.")
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "embedding": v, "index": i}
                     for i, v in enumerate(_vectors(np.stack(rows), fmt == "base64"))],
            "usage": {"text_tokens": words, "image_pixels": pixels, "video_pixels": 0, "total_tokens": tokens}}


Handler = Callable[[Server, Any, Any], dict[str, Any]]
HANDLERS: dict[str, tuple[str, Handler, Callable[[int, str], Answer], int]] = {
    # protocol: (route, handler, error in the protocol's shape, status for a body that is not JSON)
    "openai-embeddings": ("/embeddings", _openai, _infinity_error, 422),
    "cohere": ("/v2/embed", _cohere, _cohere_error, 400),
    "voyage": ("/v1/multimodalembeddings", _voyage, _voyage_error, 400),
}


