"""Paying a scoring-style vendor: each (image, prompt) pair once, concurrently, within the budget.

A scoring vendor (Hugging Face zero-shot style) scores one image per call. :class:`PairScorer` keeps every
answer for the life of a fit, and in the query cache across fits, so the same pair is never paid twice. It
sends the missing pairs with at most ``concurrency`` calls in flight and at most ``rate_limit`` calls per
second, and refuses a request whose missing pairs do not fit the budget before sending any of them. Answers
are placed by index, so the result never depends on the concurrency or on which call finished first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from craft_adapter.blackbox.meter import QueryMeter
from craft_adapter.blackbox.query_cache import BackendCache, digest, image_key
from craft_adapter.blackbox.retried_calls import Caller
from craft_adapter.vendors.protocols import ScoringBackend
from craft_adapter.vendors.replies import PROBABILITY_KINDS, check_answer


class RateLimiter:
    """At most ``per_second`` acquisitions per second across threads (evenly spaced); ``None`` is unlimited."""

    def __init__(self, per_second: float | None) -> None:
        if per_second is not None and per_second <= 0:
            raise ValueError(f"rate limit must be positive, got {per_second}")
        self.interval = 0.0 if per_second is None else 1.0 / per_second
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """Block until the next call may start."""
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


class PairScorer:
    """Scores ``[p, m, c]`` for templates on image rows, paying only for pairs not seen before.

    A pair not yet seen in this fit is looked up in the query cache (``store``) first; only the rest are sent,
    through ``caller`` (retries, fault accounting), and each answer is stored before it is used.
    """

    def __init__(self, backend: ScoringBackend, images: Sequence[Image.Image], class_names: list[str],
                 meter: QueryMeter, concurrency: int = 1, rate_limit: float | None = None,
                 caller: Caller | None = None, store: BackendCache | None = None,
                 image_keys: Sequence[str] | None = None) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.backend, self.images, self.class_names, self.meter = backend, images, class_names, meter
        self.concurrency, self.limiter = concurrency, RateLimiter(rate_limit)
        self.caller = caller or Caller(meter)
        self.store = store or BackendCache(None, backend.identity)
        self.image_keys = list(image_keys) if image_keys is not None else [image_key(im) for im in images]
        self.probabilities = backend.capabilities.returns in PROBABILITY_KINDS  # softmax or sigmoid: in [0, 1]
        self.cache: dict[tuple[int, str], np.ndarray] = {}
        self._lock = threading.Lock()
        self._abort: BaseException | None = None

    def missing(self, templates: Sequence[str], rows: Sequence[int]) -> list[tuple[int, str]]:
        """The pairs a request would have to pay for, each once, in a fixed order."""
        return [(i, t) for t in dict.fromkeys(templates) for i in rows if (i, t) not in self.cache]

    def _keys(self, pairs: Sequence[tuple[int, str]]) -> dict[tuple[int, str], tuple[str, str]]:
        """The query cache's key of each pair."""
        prompt_keys = {t: digest(t, *self.class_names) for t in dict.fromkeys(t for _, t in pairs)}
        return {(i, t): (prompt_keys[t], self.image_keys[i]) for i, t in pairs}

    def stored(self, pairs: Sequence[tuple[int, str]]) -> dict[tuple[int, str], np.ndarray] | None:
        """The query cache's answers of ``pairs`` (paid before a resume checkpoint; put them in :attr:`cache` to
        use them: no vendor call, nothing charged), or None if any of them is not stored."""
        keys = self._keys(pairs)
        found = self.store.get("score", list(keys.values()))
        if any(k not in found for k in keys.values()):
            return None
        return {pair: found[k] for pair, k in keys.items()}

    def _keep(self, pair: tuple[int, str], scores: np.ndarray) -> None:
        with self._lock:
            self.meter.charge(vendor_calls=1, images=1)
            self.cache[pair] = scores

    def _pay(self, pair: tuple[int, str], key: tuple[str, str]) -> None:
        i, template = pair
        c = len(self.class_names)
        if self._abort is not None:  # another call failed for good (vendor, cache, interrupt): send nothing more
            raise self._abort

        def send() -> object:
            self.limiter.acquire()
            return self.backend.score(self.images[i], self.class_names, template)

        try:
            scores = self.caller.call(send, lambda a: check_answer(a, (c,), probabilities=self.probabilities),
                                      "a scoring call")
            self.store.put("score", {key: scores})  # kept on disk before it is used
        except BaseException as e:
            self._abort = self._abort or e
            raise
        self._keep(pair, scores)

    def scores(self, templates: Sequence[str], rows: Sequence[int]) -> np.ndarray:
        """Scores ``[p, len(rows), c]``; the whole request is refused if its new pairs exceed the budget."""
        todo = self.missing(templates, rows)
        self.meter.check(vendor_calls=len(todo))
        keys = self._keys(todo)
        stored = self.store.get("score", list(keys.values()))
        for pair, key in keys.items():
            if key in stored:
                self._keep(pair, stored[key])
                self.meter.cached_calls += 1
        todo = [p for p in todo if p not in self.cache]
        if self.concurrency == 1 or len(todo) <= 1:
            for pair in todo:
                self._pay(pair, keys[pair])
        else:
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                futures = [pool.submit(self._pay, pair, keys[pair]) for pair in todo]
                try:
                    for future in futures:
                        future.result()  # re-raises a failed call
                except BaseException:  # a fault, a full cache, Ctrl-C: send nothing more; calls in flight
                    pool.shutdown(wait=True, cancel_futures=True)  # finish, and their answers are stored
                    raise
        self.meter.queries += len(templates)
        return np.stack([np.stack([self.cache[(i, t)] for i in rows]) for t in templates])
