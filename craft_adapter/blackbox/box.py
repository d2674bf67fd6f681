"""The black-box boundary: the only way training code reaches a model.

A backend is a vendor. Training never holds one directly; it holds a :class:`BlackBox`, which sends
prompts and images through the backend, counts every call on a :class:`QueryMeter`, and hands back numpy
scores. Nothing on a ``BlackBox`` leads to weights, modules or gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from craft_adapter.blackbox.meter import QueryMeter
from craft_adapter.blackbox.query_cache import BackendCache, QueryCache, array_key, digest, image_key
from craft_adapter.blackbox.retried_calls import Caller, RetryPolicy
from craft_adapter.vendors.protocols import Capabilities, EmbeddingBackend, ScoringBackend, SoftPromptBackend, fill
from craft_adapter.vendors.replies import check_answer

if TYPE_CHECKING:
    from craft_adapter.blackbox.pair_scorer import PairScorer


@dataclass
class BlackBox:
    """A metered view of a backend over one fixed image set; scores come back as numpy ``[p, n, c]``.

    With a ``cache``, every answer is looked up there first and every paid answer is stored before it is used;
    vendor faults are retried under ``retry`` (see :mod:`craft_adapter.blackbox.retried_calls`).
    """

    _backend: EmbeddingBackend | ScoringBackend = field(repr=False)
    _images: Sequence[Image.Image] = field(repr=False)
    class_names: list[str]
    meter: QueryMeter = field(default_factory=QueryMeter)
    concurrency: int = 1  # scoring vendors: calls in flight
    rate_limit: float | None = None  # scoring vendors: calls per second
    cache: QueryCache | None = field(default=None, repr=False)
    retry: RetryPolicy | None = None

    def __post_init__(self) -> None:
        self._image_emb: np.ndarray | None = None
        self._scorer: PairScorer | None = None
        if not isinstance(self._backend, (EmbeddingBackend, ScoringBackend)):
            raise TypeError(f"{type(self._backend).__name__} is neither an embedding nor a scoring backend")
        self._store = BackendCache(self.cache, self.identity)
        self._caller = Caller(self.meter, self.retry)
        self._image_keys: list[str] | None = None

    @property
    def capabilities(self) -> Capabilities:
        """What the backend behind this box accepts."""
        return self._backend.capabilities

    @property
    def identity(self) -> dict:
        """The backend's identity, for the adapter file."""
        return dict(self._backend.identity)

    @property
    def logit_scale(self) -> float:
        """The scale on cosine logits (1.0 for a scoring vendor, whose scores are used as they come)."""
        return float(getattr(self._backend, "logit_scale", 1.0))

    @property
    def n_images(self) -> int:
        """How many images this box scores."""
        return len(self._images)

    def image_keys(self) -> list[str]:
        """Content hashes of the images, the cache's image keys."""
        if self._image_keys is None:
            self._image_keys = [image_key(im) for im in self._images]
        return self._image_keys

    def _answers(self, kind: str, keys: list[tuple[str, str]], request: Callable[[list[int]], object],
                 shape: tuple[int | None, ...]) -> np.ndarray:
        """Answers ``[len(keys), *shape]``: stored ones from the cache, the rest in one vendor call, stored first."""
        got = self._store.get(kind, keys)
        todo = [j for j, k in enumerate(keys) if k not in got]
        if not todo:
            self.meter.cached_calls += 1
        else:
            fresh = self._caller.call(lambda: request(todo), lambda a: check_answer(a, (len(todo), *shape)),
                                      f"a {kind} request for {len(todo)} inputs")
            new = {keys[j]: fresh[n] for n, j in enumerate(todo)}
            self._store.put(kind, new)
            got.update(new)
        return np.stack([got[k] for k in keys])

    def _images_embedded(self) -> np.ndarray:
        if self._image_emb is None:
            self.meter.charge(vendor_calls=1, images=len(self._images))
            keys = [("", k) for k in self.image_keys()]
            self._image_emb = self._answers(  # [n, d]
                "image", keys, lambda todo: self._backend.embed_images([self._images[j] for j in todo]), (None,))
        return self._image_emb

    def _cosine_logits(self, text_emb: np.ndarray) -> np.ndarray:
        # text_emb: [p, c, d] -> logits [p, n, c]
        img = self._images_embedded()
        return self._backend.logit_scale * np.einsum("nd,pcd->pnc", img, text_emb, optimize=True)

    def logits_text(self, templates: Sequence[str], rows: Sequence[int] | None = None) -> np.ndarray:
        """Scores ``[p, m, c]`` of each template (``{}`` marks the class name) on image ``rows`` (default all)."""
        rows = range(len(self._images)) if rows is None else rows
        if self.capabilities.style == "scoring":
            return self._pairs().scores(templates, rows)
        texts = [fill(t, c) for t in templates for c in self.class_names]
        self._images_embedded()
        self.meter.charge(queries=len(templates), vendor_calls=1)
        emb = self._answers("text", [(digest(t), "") for t in texts],
                            lambda todo: self._backend.embed_texts([texts[j] for j in todo]), (None,))
        return self._cosine_logits(emb.reshape(len(templates), len(self.class_names), -1))[:, list(rows)]

    def text_cost(self, templates: Sequence[str], rows: Sequence[int] | None = None) -> int:
        """What :meth:`logits_text` would cost now, in the meter's unit (answers already paid are free)."""
        rows = range(len(self._images)) if rows is None else rows
        if self.capabilities.style == "scoring":
            calls = len(self._pairs().missing(templates, rows))
            return calls if self.meter.unit == "vendor_calls" else len(templates)
        return len(templates) if self.meter.unit == "queries" else 1 + (self._image_emb is None)

    def paid_rows(self, template: str) -> list[int]:
        """Scoring vendors: the image rows already paid for with ``template`` (scoring them again is free)."""
        cache = self._pairs().cache
        return [i for i in range(len(self._images)) if (i, template) in cache]

    def _pairs(self) -> PairScorer:
        if self._scorer is None:
            from craft_adapter.blackbox.pair_scorer import PairScorer

            self._scorer = PairScorer(self._backend, self._images, self.class_names, self.meter,
                                      self.concurrency, self.rate_limit, caller=self._caller, store=self._store,
                                      image_keys=self.image_keys())
        return self._scorer

    def soft_prompt_init(self, text: str = "a photo of a") -> np.ndarray:
        """The backend's token embeddings ``[n_ctx, width]`` of ``text``; needs soft-prompt support."""
        return self._soft().soft_prompt_init(text)

    def logits_soft(self, ctx: np.ndarray) -> np.ndarray:
        """Scores ``[p, n, c]`` of context vectors ``ctx [p, n_ctx, width]`` on every image."""
        backend = self._soft()
        self._images_embedded()
        self.meter.charge(queries=len(ctx), vendor_calls=1)
        keys = [(array_key(c, *self.class_names), "") for c in ctx]
        emb = self._answers("soft", keys, lambda todo: backend.embed_soft(ctx[todo], self.class_names),
                            (len(self.class_names), None))  # [p, c, d]
        return self._cosine_logits(emb)

    def describe_soft(self, ctx: np.ndarray) -> str:
        """Nearest-token reading of ``ctx [n_ctx, width]``, for people."""
        return self._soft().describe_soft(ctx)

    def _soft(self) -> SoftPromptBackend:
        if not self.capabilities.soft_prompts:
            raise TypeError(
                f"backend {self.identity.get('name', '?')} accepts only text prompts; use --prompt text"
            )
        return self._backend  # type: ignore[return-value]
