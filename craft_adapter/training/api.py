"""The public fit entry point: :func:`fit_adapter` takes few-shot images and a backend and returns the adapter.

``from craft_adapter import fit_adapter, FitConfig``. It draws the few-shot set, builds the two metered views of
the backend (training shots and held-out shots, one meter, so the budget caps both together), runs the CraFT loop
and returns a :class:`FitOutcome`. It never prints and never exits: progress goes through ``on_progress``, and
every way a fit can fail is a :class:`FitError` subclass, so a notebook, a service and the command line each
decide what to show. Ctrl-C propagates as :class:`KeyboardInterrupt`, after the answers paid so far are cached.

Importing this module loads neither torch nor the loop; :func:`fit_adapter` does, on its first call.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from craft_adapter.artifact.adapter_file import AdapterWriteError, check_writable
from craft_adapter.training.config import FitConfig
from craft_adapter.training.image_sets import DataError, LabeledImages, load_image_folder, sample_k_shot

if TYPE_CHECKING:
    from PIL import Image

    from craft_adapter.artifact.adapter_file import Adapter
    from craft_adapter.blackbox.box import BlackBox
    from craft_adapter.blackbox.query_cache import QueryCache
    from craft_adapter.training.loop import FitState
    from craft_adapter.training.resume import FitRun
    from craft_adapter.vendors.protocols import EmbeddingBackend, ScoringBackend


class FitError(Exception):
    """A fit could not run or could not finish; the message says why."""


class SettingsError(FitError, ValueError):
    """The settings, the few-shot data or the backend do not allow a fit (e.g. a budget too small for one
    generation, a class with fewer images than ``shots``, soft prompts asked of a text-only vendor)."""


class VendorStopped(FitError):
    """The vendor failed persistently (or refused for good); every answer paid before is in the cache, if any."""


class CacheFailed(FitError):
    """The query cache could not keep an answer; the fit stopped rather than use it. Earlier answers are kept."""


class OutputFailed(FitError):
    """The adapter could not be written where asked (full disk, read-only folder); ``rescued`` is where it was
    written instead, if anywhere, so the answers paid for it are not lost."""

    def __init__(self, message: str, rescued: Path | None = None) -> None:
        self.rescued = rescued
        super().__init__(message + (f"; the adapter was written to {rescued} instead" if rescued else ""))


class ResumeConflict(FitError):
    """The fit to resume was started with other settings, another backend or other few-shot images."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("cannot resume: " + "; ".join(self.problems))


@dataclass
class FitRecord:
    """How a fit went: times, what the meter counted, and one row per generation."""

    wall_time_s: float
    vendor_time_s: float  # wall time spent inside vendor calls
    meter: dict[str, Any]  # QueryMeter.summary(): used, paid, cached, failed
    history: list[dict] = field(default_factory=list)
    resumed: bool = False
    cache: str | None = None  # the query cache's path

    def as_fitlog(self) -> dict[str, Any]:
        """The record as written to ``<adapter>.fitlog.json``."""
        return {"wall_time_s": round(self.wall_time_s, 3), "vendor_time_s": round(self.vendor_time_s, 3),
                "meter": self.meter, "resumed": self.resumed, "cache": self.cache, "history": self.history}


@dataclass
class FitOutcome:
    """What :func:`fit_adapter` returns: the adapter, the settings it was fitted with, and the fit's record."""

    adapter: Adapter
    record: FitRecord
    config: FitConfig


def use_passive_omp_wait() -> None:
    """Let idle OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``) unless the user chose; call before torch loads.

    Idle OpenMP workers otherwise spin between torch calls; on a container's CPU quota that spinning steals the
    time of the thread doing the work (measured: the reference fit ran 2.5x slower). OpenMP reads the variable
    once, when torch is first imported, so this only helps when it runs first; a user's own setting wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def few_shot_set(data: str | Path | LabeledImages | Sequence[Image.Image], cfg: FitConfig,
                 labels: Sequence[int] | np.ndarray | None = None,
                 class_names: Sequence[str] | None = None) -> LabeledImages:
    """``cfg.shots`` images per class drawn by ``cfg.seed`` from a folder, a :class:`LabeledImages`, or images
    with ``labels`` (indices into ``class_names``); ordered class by class. Raises :class:`SettingsError`."""
    try:
        if isinstance(data, (str, Path)):
            pool = load_image_folder(data)
        elif isinstance(data, LabeledImages):
            pool = data
        else:
            if labels is None or class_names is None:
                raise DataError("images need labels= and class_names=")
            pool = LabeledImages(list(data), np.asarray(labels, dtype=np.int64), list(class_names))
        return pool.subset(sample_k_shot(pool.labels, cfg.shots, cfg.seed, n_classes=len(pool.class_names)))
    except DataError as e:
        raise SettingsError(str(e)) from e


def metered_boxes(backend: EmbeddingBackend | ScoringBackend, train: LabeledImages, cfg: FitConfig,
                  cache: QueryCache | None = None) -> tuple[BlackBox, BlackBox | None, np.ndarray, np.ndarray]:
    """The training and held-out views of ``backend`` on one meter carrying the fit's budget, and their labels.

    With ``cfg.embedding_head`` they are :class:`~craft_adapter.training.embedding_head.TappedBox` es, which keep the
    class-text embeddings they were answered, so the head is trained after the loop without a vendor call.
    """
    from craft_adapter.blackbox.meter import QueryMeter
    from craft_adapter.blackbox.retried_calls import RetryPolicy
    from craft_adapter.training.image_sets import split_holdout

    if cfg.embedding_head:
        from craft_adapter.training.embedding_head import TappedBox as BlackBox
    else:
        from craft_adapter.blackbox.box import BlackBox
    tr, ho = split_holdout(train.labels, cfg.n_holdout, cfg.seed)
    meter = QueryMeter(cfg.resolved_budget, cfg.budget_unit)
    policy = RetryPolicy(cfg.retries, cfg.retry_backoff, max_failed_calls=cfg.failure_cap)
    kw: dict[str, Any] = {"concurrency": cfg.concurrency, "rate_limit": cfg.rate_limit, "cache": cache,
                          "retry": policy}
    kw["text_answers"] = {}  # one backend, the same class texts: the hold-out box never pays for them again
    box = BlackBox(backend, [train.images[i] for i in tr], train.class_names, meter, **kw)
    hold = BlackBox(backend, [train.images[i] for i in ho], train.class_names, meter, **kw) if len(ho) else None
    return box, hold, train.labels[tr], train.labels[ho]


def choose_temperature(box: BlackBox, hold: BlackBox | None, labels: np.ndarray, template: str) -> float | None:
    """For a backend that publishes no logit scale (an embedding API): the scale minimising the zero-shot
    cross-entropy of ``template`` on the training shots, set on both boxes; paid for once and counted. Else None.

    The hand template's class texts are the text search's first candidate, so the first generation reuses them.
    """
    from craft_adapter.training.temperature import choose_logit_scale

    if not box.needs_logit_scale:
        return None
    scale = choose_logit_scale(box.cosines_text(template), labels)
    for b in (box, hold):
        if b is not None:
            b.use_logit_scale(scale)
    return scale


def check_embedding_head(backend: Any) -> None:
    """:class:`SettingsError` unless ``backend`` returns embeddings, which ``embedding_head`` reads (checked before
    any call)."""
    caps = getattr(backend, "capabilities", None)
    if getattr(caps, "style", None) != "embedding":
        name = (getattr(backend, "identity", None) or {}).get("name", type(backend).__name__)
        raise SettingsError(f"embedding_head (--embedding-head) needs a vendor that returns embeddings (the "
                            "in-process model, openai-embeddings, cohere, voyage, embedding-api); "
                            f"{name} returns only scores, so it keeps the logit refiner: drop --embedding-head")


def vendor_from_url(url: str, protocol: str = "hf-zero-shot", model: str | None = None,
                    timeout: float = 60.0) -> EmbeddingBackend | ScoringBackend:
    """The vendor ``protocol`` at ``url`` (keyless), made by the registry; :class:`SettingsError` if it cannot be."""
    from craft_adapter.vendors.registry import make_vendor

    try:
        return make_vendor(protocol, url, model=model, timeout=timeout)
    except ValueError as e:  # a bad URL, an unknown protocol, settings it does not take
        raise SettingsError(str(e)) from e


def fit_adapter(data: str | Path | LabeledImages | Sequence[Image.Image],
                backend_or_vendor: EmbeddingBackend | ScoringBackend | str, config: FitConfig | None = None, *,
                labels: Sequence[int] | np.ndarray | None = None, class_names: Sequence[str] | None = None,
                cache: QueryCache | None = None, resume: FitRun | None = None, output: str | Path | None = None,
                on_progress: Callable[[FitState], None] | None = None, price_per_1k: float | None = None,
                invocation: Mapping[str, Any] | None = None, protocol: str = "hf-zero-shot") -> FitOutcome:
    """Fit a CraFT adapter (prompt + refiner) for few-shot ``data`` against a black-box backend.

    ``data`` is an image folder (``root/<class name>/*.png``), a :class:`LabeledImages`, or a list of PIL images
    with ``labels`` and ``class_names``; ``config.shots`` per class are drawn by ``config.seed``.
    ``backend_or_vendor`` is a backend (e.g. ``OpenClipBackend``, a vendor from ``make_vendor``) or a vendor URL,
    spoken to in ``protocol`` (default ``hf-zero-shot``; see :mod:`craft_adapter.vendors.registry`; a vendor that
    needs a key is made with ``make_vendor`` and passed in). A backend that publishes no logit scale (an embedding
    API) gets one chosen from the few-shot data before the search (:func:`choose_temperature`), recorded as the
    adapter's ``logit_scale`` with ``fit["logit_scale_source"] = "fitted"``. With ``cache`` (a ``QueryCache``),
    answers are looked up there and every paid one is stored first. With ``output``, a manifest is written beside
    it when the fit starts, and the adapter, ``<output>.fitlog.json`` and the finished manifest when it ends;
    ``invocation`` (no secrets) goes in the manifest. ``resume`` (a manifest read back) must match this fit, else
    :class:`ResumeConflict`. ``on_progress`` is called after every generation. Errors: :class:`SettingsError`,
    :class:`VendorStopped`, :class:`CacheFailed`, :class:`ResumeConflict`.
    """
    cfg = config if config is not None else FitConfig()
    use_passive_omp_wait()
    from craft_adapter.blackbox.meter import BudgetExhausted
    from craft_adapter.blackbox.query_cache import CacheError
    from craft_adapter.blackbox.retried_calls import VendorUnavailable
    from craft_adapter.training import job
    from craft_adapter.training.loop import fit
    from craft_adapter.training.resume import FitRun, train_digest

    backend = backend_or_vendor
    if isinstance(backend, str):
        backend = vendor_from_url(backend, protocol, timeout=cfg.timeout)
    if cfg.embedding_head:
        check_embedding_head(backend)
    train = few_shot_set(data, cfg, labels, class_names)
    if len(train.class_names) < 2:
        raise SettingsError(f"the few-shot data has one class ({train.class_names[0]!r}); a classifier needs at "
                            "least two, and a fit would pay for nothing")
    if output is not None:
        try:  # before the first paid call, not after the whole budget
            check_writable(output)
        except AdapterWriteError as e:
            raise OutputFailed(str(e)) from e
    try:
        box, hold, y_train, y_hold = metered_boxes(backend, train, cfg, cache)
    except (TypeError, ValueError) as e:
        raise SettingsError(str(e)) from e
    run = FitRun(cfg.to_dict(), box.identity, train_digest(train.images, train.labels, train.class_names),
                 dict(invocation or {}))
    if resume is not None:
        problems = resume.conflicts(run.config, run.backend, run.train)
        if problems:
            raise ResumeConflict(problems)
    if output is not None:
        job.start(Path(output), run)
    # issue 17: the cache's precision and cap, and the soft-mode resume checkpoints beside the output
    checkpoints = job.prepare(None if output is None else Path(output), run, cfg, cache, resume is not None)
    try:
        scale = choose_temperature(box, hold, y_train, cfg.template)
        result = fit(box, hold, y_train, y_hold if hold else None, cfg, on_generation=on_progress,
                     checkpoints=checkpoints)
        if cfg.embedding_head:  # after the loop, on what it paid for: the loop runs exactly as without it
            from craft_adapter.training.embedding_head import add_embedding_head

            add_embedding_head(result.adapter, [(box, y_train)] + ([(hold, y_hold)] if hold else []), cfg.seed)
    except VendorUnavailable as e:
        raise VendorStopped(str(e)) from e
    except CacheError as e:
        raise CacheFailed(str(e)) from e
    except (BudgetExhausted, ValueError, NotImplementedError, TypeError) as e:
        raise SettingsError(str(e)) from e
    if scale is not None:
        result.adapter.fit["logit_scale_source"] = "fitted"  # chosen from the few-shot data, not the vendor's
    if price_per_1k is not None:
        result.adapter.fit["estimated_price"] = round(result.meter["vendor_calls"] / 1000 * price_per_1k, 4)
        result.adapter.fit["price_per_1k_calls"] = price_per_1k
    record = FitRecord(result.wall_time_s, result.vendor_time_s, result.meter, result.history,
                       resumed=resume is not None, cache=None if cache is None else str(cache.path))
    outcome = FitOutcome(result.adapter, record, cfg)
    if output is not None:
        try:
            job.finish(Path(output), outcome, run)
        except AdapterWriteError as e:  # paid for, so never lost: keep it where it can be written
            raise OutputFailed(str(e), job.rescue(outcome.adapter, Path(output))) from e
    return outcome
