"""The vendor plug-in point: a protocol name and a URL make a vendor, for fit, eval, the runtime and serve alike.

:func:`make_vendor` is the one front door. A protocol is a factory ``(url, *, key, model, **options) -> vendor``,
where the vendor is anything the runtime binds (:mod:`craft_adapter.serve.vendor_binding`): an embedding backend
(``embed_images``/``embed_texts``), a scoring backend (``score``), or a callable ``(images, prompts) -> scores``.
``key`` arrives as a :class:`~craft_adapter.vendors.credentials.Secret` (``key.reveal()`` gives it) or None.

Protocols come from three places, looked up in this order:

1. built-ins: ``hf-zero-shot`` (Hugging Face zero-shot-image-classification), ``openai-embeddings`` (OpenAI-style
   ``/embeddings`` with images, as Infinity serves CLIP), ``cohere`` (Embed v2), ``voyage`` (multimodal
   embeddings) and ``embedding-api`` (the ``/embed/*`` API that ``craft-adapter vendor`` serves);
2. :func:`register_vendor` calls in this process;
3. the ``craft_adapter.vendors`` entry-point group of installed packages, so a user's package adds a protocol
   without forking: ``[project.entry-points."craft_adapter.vendors"] my-api = "my_pkg:make_vendor"``.

A name is taken once: a registration or entry point that reuses a name is refused, never silently preferred.
Every URL is checked in :func:`make_vendor` before any factory sees it, so a plug-in cannot skip the check.
Torch-free, so the runtime and the server use it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from craft_adapter.vendors.credentials import Secret, auth_headers, check_vendor_url
from craft_adapter.vendors.protocols import EmbeddingBackend, ScoringBackend

ENTRY_POINT_GROUP = "craft_adapter.vendors"
VendorFactory = Callable[..., Any]


class VendorRegistryError(ValueError):
    """A protocol is unknown, taken twice, or was given options it does not take; the message says which."""


def _hf_zero_shot(url: str, *, key: Secret | None = None, model: str | None = None, timeout: float = 60.0,
                  auth_header: str = "Authorization", auth_scheme: str = "Bearer", scores: str = "softmax") -> Any:
    from craft_adapter.vendors.http_clients import HttpZeroShotVendor

    if model is not None:
        raise VendorRegistryError("hf-zero-shot takes the model in the endpoint URL, not as model=")
    return HttpZeroShotVendor(url, headers=auth_headers(key, auth_header, auth_scheme), timeout=timeout,
                              scores=scores)


def _embedding_api(url: str, *, key: Secret | None = None, model: str | None = None, timeout: float = 60.0,
                   logit_scale: float | None = None) -> Any:
    from craft_adapter.vendors.http_clients import EmbeddingApiVendor

    if model is not None:
        raise VendorRegistryError("embedding-api serves one model; it takes no model=")
    return EmbeddingApiVendor(url, logit_scale, headers=auth_headers(key), timeout=timeout)


BUILTIN: dict[str, str | VendorFactory] = {
    "hf-zero-shot": _hf_zero_shot,
    "openai-embeddings": "craft_adapter.vendors.openai_embeddings:OpenAIEmbeddingsVendor",
    "cohere": "craft_adapter.vendors.cohere_embed:CohereEmbedVendor",
    "voyage": "craft_adapter.vendors.voyage_embed:VoyageEmbedVendor",
    "embedding-api": _embedding_api,
}
_registered: dict[str, VendorFactory] = {}


def register_vendor(name: str, factory: VendorFactory) -> None:
    """Add protocol ``name``, made by ``factory(url, *, key, model, **options)``; a name already taken is refused."""
    if not name or not isinstance(name, str) or name != name.strip():
        raise VendorRegistryError(f"a protocol name is a non-empty string without surrounding spaces: {name!r}")
    if not callable(factory):
        raise VendorRegistryError(f"the factory for protocol {name!r} is not callable")
    if name in BUILTIN or name in _registered or name in _entry_points():
        raise VendorRegistryError(f"protocol {name!r} is already taken; choose another name")
    _registered[name] = factory


def unregister_vendor(name: str) -> None:
    """Remove a protocol added by :func:`register_vendor` (tests, notebooks)."""
    _registered.pop(name, None)


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_protocols() -> list[str]:
    """Every protocol name :func:`make_vendor` accepts now, built-ins first."""
    return [*BUILTIN, *sorted(set(_registered) | set(_entry_points()))]


def _factory(protocol: str) -> VendorFactory:
    found = BUILTIN.get(protocol) or _registered.get(protocol)
    if isinstance(found, str):
        module, _, attr = found.partition(":")
        return getattr(importlib.import_module(module), attr)
    if found is not None:
        return found
    ep = _entry_points().get(protocol)
    if ep is None:
        raise VendorRegistryError(f"unknown vendor protocol {protocol!r}; known: {', '.join(available_protocols())}. "
                                  f"A package adds one through the {ENTRY_POINT_GROUP!r} entry-point group")
    try:
        return ep.load()
    except Exception as e:  # a broken plug-in must say which package broke, not crash somewhere later
        raise VendorRegistryError(f"the plug-in for protocol {protocol!r} ({ep.value}) failed to load: "
                                  f"{type(e).__name__}: {e}") from None


HF_ZERO_SHOT = "hf-zero-shot"
HF_ONLY_DEFAULTS = {"auth_header": "Authorization", "auth_scheme": "Bearer", "scores": "softmax"}
HF_ONLY_FLAGS = {"auth_header": "--auth-header", "auth_scheme": "--auth-scheme", "scores": "--vendor-scores"}


def hf_only_settings(protocol: str, **settings: str) -> dict[str, str]:
    """``settings`` (of :data:`HF_ONLY_DEFAULTS`) as ``make_vendor`` options for ``hf-zero-shot``, the one protocol
    that takes them; ``{}`` for any other protocol, which may only leave them at their defaults (``ValueError``)."""
    if protocol == HF_ZERO_SHOT:
        return dict(settings)
    changed = [HF_ONLY_FLAGS[k] for k, v in settings.items() if v != HF_ONLY_DEFAULTS[k]]
    if changed:
        raise ValueError(f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} for --protocol hf-zero-shot; "
                         f"{protocol} sends its key and returns its scores as its API documents")
    return {}


def make_vendor(protocol: str, url: str | None, *, key: Secret | str | None = None, model: str | None = None,
                **options: Any) -> Any:
    """The vendor for ``protocol`` at ``url``: what fit, eval, the runtime and serve all call.

    Every URL is checked here, once for all protocols (:func:`~craft_adapter.vendors.credentials.check_vendor_url`:
    ``http(s)://host...``, no credentials in it); ``None`` leaves the protocol its own default URL.
    """
    if url is not None:
        check_vendor_url(url)  # ValueError, as a registry refusal is
    factory = _factory(protocol)
    key = Secret(key) if isinstance(key, str) else key
    try:
        inspect.signature(factory).bind(url, key=key, model=model, **options)
    except TypeError as e:
        raise VendorRegistryError(f"protocol {protocol!r} does not take these settings ({e})") from None
    except ValueError:  # a callable without a signature (a C function): let the call itself decide
        pass
    vendor = factory(url, key=key, model=model, **options)
    if not (isinstance(vendor, (EmbeddingBackend, ScoringBackend)) or callable(vendor)):
        raise VendorRegistryError(f"protocol {protocol!r} made a {type(vendor).__name__}, which is not a vendor: "
                                  "it needs embed_images/embed_texts, score, or to be callable (images, prompts)")
    return vendor
