"""The black-box boundary: the only way training code reaches a model.

A backend is a vendor. Training never holds one directly; it holds a :class:`BlackBox`, which sends
prompts and images through the backend, counts every call on a :class:`QueryMeter`, and hands back numpy
scores. Nothing on a ``BlackBox`` leads to weights, modules or gradients.

How an embedding request is charged depends on what the backend says about its cost:

- A backend with ``calls_for(n, kind)`` (the hosted embedding APIs, which split a request into chunks of at most
  their input cap, one HTTP request each) is charged exactly what it sends: ``calls_for`` of the inputs this fit
  has not had answered yet, so an input is paid for once per fit and a request of known inputs costs 0. With no
  query cache (or a fresh one) the budget equals the vendor's own request count; with a cache, replayed answers
  are charged as if they were paid (``cached_calls``), so a resumed fit spends its budget as the first one did.
- Any other embedding backend (in-process open_clip) is charged one call per request, as it always was.

An embedding API publishes no ``logit_scale``: such a backend says ``logit_scale = None``, and the fit chooses the
scale from the few-shot data (:meth:`BlackBox.cosines_text`, then :meth:`BlackBox.use_logit_scale`) before any
logits are read; reading logits before that is an error, never a guessed constant.
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
    # text embeddings already answered in this fit, by cache key; boxes over one backend may share it (they are
    # the same texts whatever the images), so a hold-out check does not pay again for the training box's texts
    text_answers: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._image_emb: np.ndarray | None = None
        self._scorer: PairScorer | None = None
        if not isinstance(self._backend, (EmbeddingBackend, ScoringBackend)):
            raise TypeError(f"{type(self._backend).__name__} is neither an embedding nor a scoring backend")
        self._store = BackendCache(self.cache, self.identity)
        self._caller = Caller(self.meter, self.retry)
        self._image_keys: list[str] | None = None
        self._chosen_scale: float | None = None

    @property
    def capabilities(self) -> Capabilities:
        """What the backend behind this box accepts."""
        return self._backend.capabilities

    @property
    def identity(self) -> dict:
        """The backend's identity, for the adapter file."""
        return dict(self._backend.identity)

    @property
    def needs_logit_scale(self) -> bool:
        """Whether the backend publishes no scale and none was chosen yet (see :meth:`use_logit_scale`)."""
        return self._chosen_scale is None and getattr(self._backend, "logit_scale", 1.0) is None

    @property
    def logit_scale(self) -> float:
        """The scale on cosine logits: the backend's, or the one chosen for it (1.0 for a scoring vendor)."""
        if self._chosen_scale is not None:
            return self._chosen_scale
        scale = getattr(self._backend, "logit_scale", 1.0)
        if scale is None:
            raise ValueError(f"backend {self.identity.get('name', '?')} publishes no logit_scale: choose one from the "
                             "few-shot data first (BlackBox.use_logit_scale; fit_adapter does)")
        return float(scale)

    def use_logit_scale(self, scale: float) -> None:
        """Turn cosines into logits with ``scale`` (chosen from data) for a backend that publishes none."""
        if getattr(self._backend, "logit_scale", 1.0) is not None:
            raise ValueError("the backend publishes its own logit_scale; it is used as it is")
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"logit_scale must be finite and positive, got {scale!r}")
        self._chosen_scale = float(scale)

    @property
    def n_images(self) -> int:
        """How many images this box scores."""
        return len(self._images)

    def image_keys(self) -> list[str]:
        """Content hashes of the images, the cache's image keys."""
        if self._image_keys is None:
            self._image_keys = [image_key(im) for im in self._images]
        return self._image_keys

    def _calls_for(self, n: int, kind: str) -> int:
        """Vendor calls ``n`` new inputs of ``kind`` cost a chunking backend (see the module docstring)."""
        return int(self._backend.calls_for(n, kind))  # type: ignore[union-attr]

    @property
    def _chunked(self) -> bool:
        return callable(getattr(self._backend, "calls_for", None))

    def _answers(self, kind: str, keys: list[tuple[str, str]], request: Callable[[list[int]], object],
                 shape: tuple[int | None, ...], calls: Callable[[int], int] | None = None) -> np.ndarray:
        """Answers ``[len(keys), *shape]``: stored ones from the cache, the rest in one vendor request, stored first.

        ``calls(n)``: the vendor calls a request of ``n`` inputs is (a chunking backend); else a request is one call.
        """
        got = self._store.get(kind, keys)
        todo = [j for j, k in enumerate(keys) if k not in got]
        charged = 1 if calls is None else calls(len(keys))
        if not todo:
            self.meter.cached_calls += charged
        else:
            fresh = self._caller.call(lambda: request(todo), lambda a: check_answer(a, (len(todo), *shape)),
                                      f"a {kind} request for {len(todo)} inputs")
            if calls is not None:  # the caller counted the request as one paid call; it was this many
                paid = calls(len(todo))
                self.meter.paid_calls += paid - 1
                self.meter.cached_calls += max(charged - paid, 0)
            new = {keys[j]: fresh[n] for n, j in enumerate(todo)}
            self._store.put(kind, new)
            got.update(new)
        return np.stack([got[k] for k in keys])

    def _new_answers(self, kind: str, keys: list[tuple[str, str]], known: dict, request: Callable[[list[int]], object],
                     queries: int = 0) -> np.ndarray:
        """A chunking backend's answers ``[len(keys), d]``: those not in ``known`` charged, fetched and added to it."""
        new = [k for k in dict.fromkeys(keys) if k not in known]
        first = {k: j for j, k in reversed(list(enumerate(keys)))}  # a key's first place in ``keys``
        self.meter.charge(queries=queries, vendor_calls=self._calls_for(len(new), kind),
                          images=len(new) if kind == "image" else 0)
        if new:
            rows = self._answers(kind, new, lambda todo: request([first[new[t]] for t in todo]), (None,),
                                 lambda n: self._calls_for(n, kind))
            known.update(zip(new, rows, strict=True))
        return np.stack([known[k] for k in keys])

    def _images_embedded(self) -> np.ndarray:
        if self._image_emb is None:
            keys = [("", k) for k in self.image_keys()]
            embed = lambda todo: self._backend.embed_images([self._images[j] for j in todo])  # noqa: E731
            if self._chunked:
                self._image_emb = self._new_answers("image", keys, {}, embed)  # [n, d]
            else:
                self.meter.charge(vendor_calls=1, images=len(self._images))
                self._image_emb = self._answers("image", keys, embed, (None,))  # [n, d]
        return self._image_emb

    def _cosine_logits(self, text_emb: np.ndarray, rows: Sequence[int] | None = None) -> np.ndarray:
        # text_emb: [p, c, d] -> logits [p, n, c], or [p, m, c] on image ``rows``
        return self.logit_scale * self._cosines(text_emb, rows)

    def _cosines(self, text_emb: np.ndarray, rows: Sequence[int] | None = None) -> np.ndarray:
        img = self._images_embedded()
        return np.einsum("nd,pcd->pnc", img if rows is None else img[list(rows)], text_emb, optimize=True)

    def _text_embeddings(self, templates: Sequence[str]) -> np.ndarray:
        """Class-text embeddings ``[p, c, d]`` of ``templates``, charged (image embeddings are fetched first)."""
        texts = [fill(t, c) for t in templates for c in self.class_names]
        self._images_embedded()
        keys = [(digest(t), "") for t in texts]
        embed = lambda todo: self._backend.embed_texts([texts[j] for j in todo])  # noqa: E731
        if self._chunked:
            emb = self._new_answers("text", keys, self.text_answers, embed, queries=len(templates))
        else:
            self.meter.charge(queries=len(templates), vendor_calls=1)
            emb = self._answers("text", keys, embed, (None,))
        return emb.reshape(len(templates), len(self.class_names), -1)

    def cosines_text(self, template: str) -> np.ndarray:
        """Embedding backends: cosine similarities ``[n, c]`` of ``template``'s class texts with every image
        (charged like :meth:`logits_text`); what a logit scale is chosen from."""
        if self.capabilities.style == "scoring":
            raise TypeError("a scoring vendor returns scores, not cosine similarities")
        return self._cosines(self._text_embeddings([template]))[0]

    def logits_text(self, templates: Sequence[str], rows: Sequence[int] | None = None) -> np.ndarray:
        """Scores ``[p, m, c]`` of each template (``{}`` marks the class name) on image ``rows`` (default all)."""
        rows = range(len(self._images)) if rows is None else rows
        if self.capabilities.style == "scoring":
            return self.pair_scorer().scores(templates, rows)
        return self._cosine_logits(self._text_embeddings(templates))[:, list(rows)]

    def text_cost(self, templates: Sequence[str], rows: Sequence[int] | None = None) -> int:
        """What :meth:`logits_text` would cost now, in the meter's unit (answers already paid are free)."""
        rows = range(len(self._images)) if rows is None else rows
        if self.capabilities.style == "scoring":
            calls = len(self.pair_scorer().missing(templates, rows))
            return calls if self.meter.unit == "vendor_calls" else len(templates)
        if self.meter.unit == "queries":
            return len(templates)
        if not self._chunked:
            return 1 + (self._image_emb is None)
        texts = {(digest(fill(t, c)), "") for t in templates for c in self.class_names}
        images = 0 if self._image_emb is not None else self._calls_for(len(set(self.image_keys())), "image")
        return images + self._calls_for(len(texts - self.text_answers.keys()), "text")

    def paid_rows(self, template: str) -> list[int]:
        """Scoring vendors: the image rows already paid for with ``template`` (scoring them again is free)."""
        cache = self.pair_scorer().cache
        return [i for i in range(len(self._images)) if (i, template) in cache]

    def pair_scorer(self) -> PairScorer:
        """Scoring vendors: what holds the (image row, template) answers this fit has paid for (its ``cache``)."""
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
        return self._cosine_logits(self.soft_embeddings(ctx))

    # issue 17 (fit memory): the fit asks for a population's embeddings in one charged call, then makes its logits
    # a few candidates at a time with cosine_logits, so [p, n, c] is never whole in memory.
    def soft_embeddings(self, ctx: np.ndarray, kind: str = "soft") -> np.ndarray:
        """Class-text embeddings ``[p, c, d]`` of context vectors ``ctx [p, n_ctx, width]``, charged as
        :meth:`logits_soft` is (image embeddings are fetched first)."""
        backend = self._soft()
        self._images_embedded()
        self.meter.charge(queries=len(ctx), vendor_calls=1)
        keys = [(array_key(c, *self.class_names), "") for c in ctx]
        return self._answers(kind, keys, lambda todo: backend.embed_soft(ctx[todo], self.class_names),
                             (len(self.class_names), None))  # [p, c, d]

    def soft_embeddings_alone(self, ctx: np.ndarray) -> np.ndarray:
        """As :meth:`soft_embeddings` for one context ``[n_ctx, width]`` asked on its own (``[1, c, d]``), its answer
        cached apart from answers given within a population: a model's last bits depend on the batch an input came
        in, so a fit resumed from the cache reads back the bits a fresh fit is answered."""
        return self.soft_embeddings(ctx[None], kind="soft-alone")

    def cosine_logits(self, text_emb: np.ndarray, rows: Sequence[int] | None = None) -> np.ndarray:
        """Scores ``[p, m, c]`` on image ``rows`` (default every image) of class-text embeddings ``text_emb [p, c, d]``
        (no vendor call; only those rows' products are made)."""
        return self._cosine_logits(text_emb, rows)

    def image_embeddings(self) -> np.ndarray:
        """The image embeddings ``[n, d]`` this box scores with, in image order (fetched and charged first if not
        yet, as :meth:`prepare_images`): for an embedding head trained on what the fit already paid for."""
        if self.capabilities.style == "scoring":
            raise TypeError("a scoring vendor returns scores, not image embeddings")
        return self._images_embedded()

    def prepare_images(self) -> None:
        """Fetch the image embeddings now, charged as usual (a fit restored from a checkpoint resets the meter)."""
        self._images_embedded()

    def describe_soft(self, ctx: np.ndarray) -> str:
        """Nearest-token reading of ``ctx [n_ctx, width]``, for people."""
        return self._soft().describe_soft(ctx)

    def _soft(self) -> SoftPromptBackend:
        if not self.capabilities.soft_prompts:
            raise TypeError(
                f"backend {self.identity.get('name', '?')} accepts only text prompts; use --prompt text"
            )
        return self._backend  # type: ignore[return-value]
