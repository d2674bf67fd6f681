"""Paying a scoring-style vendor: each (image, prompt) pair once, concurrently, within the budget.

A scoring vendor (Hugging Face zero-shot style) scores one image per call. :class:`PairScorer` keeps every
answer for the life of a fit, so the same pair is never paid twice; sends the missing pairs with at most
``concurrency`` calls in flight and at most ``rate_limit`` calls per second; and refuses a request whose
missing pairs do not fit the budget before sending any of them. Answers are placed by index, so the
result never depends on the concurrency or on which call finished first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from .boundary import QueryMeter, ScoringBackend


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
    """Scores ``[p, m, c]`` for templates on image rows, paying only for pairs not seen before."""

    def __init__(self, backend: ScoringBackend, images: Sequence[Image.Image], class_names: list[str],
                 meter: QueryMeter, concurrency: int = 1, rate_limit: float | None = None,
                 on_paid: Callable[[], None] | None = None) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.backend, self.images, self.class_names, self.meter = backend, images, class_names, meter
        self.concurrency, self.limiter, self.on_paid = concurrency, RateLimiter(rate_limit), on_paid
        self.cache: dict[tuple[int, str], np.ndarray] = {}
        self._lock = threading.Lock()

    def missing(self, templates: Sequence[str], rows: Sequence[int]) -> list[tuple[int, str]]:
        """The pairs a request would have to pay for, each once, in a fixed order."""
        return [(i, t) for t in dict.fromkeys(templates) for i in rows if (i, t) not in self.cache]

    def _pay(self, pair: tuple[int, str]) -> None:
        i, template = pair
        self.limiter.acquire()
        t0 = time.perf_counter()
        scores = np.asarray(self.backend.score(self.images[i], self.class_names, template), dtype=np.float32)
        with self._lock:
            self.meter.vendor_seconds += time.perf_counter() - t0
            self.meter.charge(vendor_calls=1, images=1)
            self.cache[pair] = scores
        if self.on_paid is not None:
            self.on_paid()

    def scores(self, templates: Sequence[str], rows: Sequence[int]) -> np.ndarray:
        """Scores ``[p, len(rows), c]``; the whole request is refused if its new pairs exceed the budget."""
        todo = self.missing(templates, rows)
        self.meter.check(vendor_calls=len(todo))
        if self.concurrency == 1 or len(todo) <= 1:
            for pair in todo:
                self._pay(pair)
        else:
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                for future in [pool.submit(self._pay, pair) for pair in todo]:
                    future.result()  # re-raises a failed call once all are done; paid answers stay cached
        self.meter.queries += len(templates)
        return np.stack([np.stack([self.cache[(i, t)] for i in rows]) for t in templates])
