"""Fit settings: one validated dataclass, the one source of every setting's default, help text and group.

Each field carries its help text and its group in ``metadata``, as peft keeps help on its config dataclasses;
the ``fit`` command line is generated from these fields, so a default or a help text is written once. A
*decisive* setting decides the adapter: it is recorded in the adapter's fit summary, and a resumed fit must match
it. An *operational* one changes how fast a fit runs or how hard it tries, never what it finds (a fit through
vendor faults at concurrency 1 writes the bytes a clean one writes at 8), so it is left out of both.

``budget`` is the budget as asked for (``None``: the default for the mode and the shots);
:attr:`FitConfig.resolved_budget` is the budget in force, in :attr:`FitConfig.budget_unit`.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from craft_adapter.vendors.protocols import MEMORY_BUDGET_MB

DEFAULT_BUDGETS = {1: 2000, 2: 4000, 4: 4000, 8: 8000, 16: 8000}
TEXT_DEFAULT_BUDGET = 20_000  # vendor calls
# A capped generation's own arithmetic (logits, refiner, fitness) is about popsize x FITNESS_ROWS x C x (width +
# 2 x hidden) multiply-adds, linear in C as the vendor's popsize x C class texts are: at 1,000 classes on the
# reference vendor, a quiet machine, 5.6 s of a 14.3 s generation, against 22.1 s of 27.4 s uncapped
# (benchmarks/results/scale_steady.json, scale_uncapped.json). It bites only above 170 classes at 16 shots (12
# training images a class), so every fit measured before it (reference task, task suite) is unchanged.
FITNESS_ROWS = 2048
# After the loop, the chosen refiner trains this many more epochs on every shot (the held-out ones too) at the loop's
# learning rate, with the KL term: chosen on the mean over the suite's tuning tasks, never per task (+1.24 points on
# it, and more on every task: benchmarks/results/refit_probe.json; training/refit.py).
REFIT_EPOCHS = 50
GROUPS = ("decisive", "operational")


def default_budget(shots: int) -> int:
    """The paper's query budget for ``shots`` (8000 for 8 and 16 shots, 4000 for 2 and 4, 2000 for 1)."""
    if shots in DEFAULT_BUDGETS:
        return DEFAULT_BUDGETS[shots]
    return 2000 if shots < 2 else 4000 if shots < 8 else 8000


def setting(default: Any, help_text: str, group: str = "decisive") -> Any:
    """A :class:`FitConfig` field: its default, its help text (the CLI's too) and its group."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    return field(default=default, metadata={"help": help_text, "group": group})


@dataclass
class FitConfig:
    """Everything that decides a fit; two fits with equal configs and inputs give equal adapter files.

    The field order is the order of the adapter's ``fit.config``: do not reorder.
    """

    shots: int = setting(16, "Images per class.")
    seed: int = setting(1, "Seed for sampling, projection, CMA-ES, refiner.")
    budget: int | None = setting(None, "Budget: queries in soft mode (default by shots: 8000 for 8 and 16, 4000 "
                                 "for 2 and 4, 2000 for 1); vendor calls in text mode (default 20000).")
    prompt: Literal["soft", "text"] = setting("soft", "soft (context vectors) or text (a template string).")
    init_prompt: str = setting("a photo of a", "p0: the words the context starts from; the hand-written template "
                               "is '<init_prompt> {}.'.")
    # prompt generation module (CMA-ES)
    intrinsic_dim: int = setting(512, "CMA-ES search dimension.")
    popsize: int = setting(40, "CMA-ES population (queries per generation).")
    sigma: float = setting(1.0, "CMA-ES initial step size.")
    bound: float = setting(5.0, "CMA-ES box bound on z.")
    proj_std: float = setting(0.2, "Projection std (in units of std(p0) when relative).")
    step_scale: Literal["relative", "absolute"] = setting("relative", "relative (steps in units of std(p0)) or "
                                                          "absolute.")
    # prompt generation module, text mode (word edits)
    vocab_size: int = setting(4000, "Text mode: words to edit with (most frequent first).")
    text_children: int = setting(16, "Text mode: new templates per generation.")
    text_elites: int = setting(4, "Text mode: templates kept per generation.")
    minibatch_start: int = setting(3, "Text mode: images per class in a generation's minibatch, at first.")
    minibatch_end: int = setting(3, "Text mode: ... growing linearly to this by the end of the budget (measured: "
                                 "benchmarks/results/text_schedules.json).")
    # how vendor calls are made: operational
    concurrency: int = setting(8, "Scoring vendors: calls in flight (results do not depend on it).", "operational")
    rate_limit: float | None = setting(None, "Scoring vendors: at most this many calls per second.", "operational")
    retries: int = setting(5, "Retries per vendor call on transient faults (timeouts, 429, 5xx, garbled replies).",
                           "operational")
    retry_backoff: float = setting(0.5, "Seconds before the first retry, doubling (jittered, capped at 30); a "
                                   "Retry-After hint wins.", "operational")
    max_failed_calls: int | None = setting(None, "Stop after this many failed vendor calls in all; default half "
                                           "the budget.", "operational")
    timeout: float = setting(60.0, "Seconds per HTTP vendor call.", "operational")
    # prediction refinement module
    hidden: int = setting(256, "Refiner hidden width.")
    lr: float | None = setting(None, "Refiner Adam learning rate; default 1e-4 in soft mode (the paper's 1e-3 "
                               "over-fits the refiner on hard tasks: benchmarks/results/suite_tuning.json), 1e-3 in "
                               "text mode, which runs about a fifth as many refiner epochs.")
    refiner_batch: int = setting(32, "Refiner batch size.")
    kl_weight: float = setting(1.0, "Weight of the prediction-consistent KL terms.")
    kl_decay_n: int = setting(1, "The refiner's KL weight drops to 0 after budget // n queries; 1 (the default): "
                              "never, since the refiner drifts once it drops (measured over the task suite: "
                              "benchmarks/results/suite_tuning.json; the paper uses 2).")
    # what trains (the ablations switch one off)
    train_prompt: bool = setting(True, "Search the prompt (off: refiner only).")
    train_refiner: bool = setting(True, "Train the refiner (off: prompt only).")
    # model selection on held-out shots, never on the test set
    holdout_shots: int | None = setting(None, "Shots per class held out to choose the prompt and refiner; default "
                                        "shots // 4.")
    eval_every: int = setting(10, "Generations between hold-out checks (1 query each).")
    # scale (issue 17): operational, except cache_precision (float16 answers change the adapter, so it is opt-in
    # and decisive: recorded when it is not float32, so adapters fitted before it existed keep their bytes)
    memory_budget_mb: float = setting(MEMORY_BUDGET_MB, "Memory for scoring a generation: the fitness is computed "
                                      "a few candidates (and images) at a time within it, and the in-process model "
                                      "encodes as many texts or images at once as fit in it; same adapter as one "
                                      "pass.", "operational")
    checkpoint_every: int = setting(10, "Write a resume checkpoint beside the output every this many generations "
                                    "(and on Ctrl-C or a vendor stop): soft mode, and text mode against a scoring "
                                    "vendor when a query cache is kept; 0: never (a resume replays from the cache).",
                                    "operational")
    checkpoint_seconds: float = setting(5.0, "Also write one after any generation that ends this many seconds after "
                                        "the last write, so a kill loses about this much work (or one slow "
                                        "generation) at most; 0: by generations only.", "operational")
    cache_precision: Literal["float32", "float16"] = setting(
        "float32", "Soft mode: precision of the context answers kept in the query cache and used by the fit; "
        "float16 halves the cache but changes the adapter (measured: benchmarks/results/scale.json).")
    cache_max_mb: float | None = setting(None, "Cap on the query cache's answers; over it the oldest answers of "
                                         "other backends, then of this one that no resume needs, are evicted.",
                                         "operational")
    # issue 15: settings added after adapters were first shipped are recorded only when they differ from the value
    # that reproduces a fit from before they existed (NEW_SETTING_DEFAULTS), so such an adapter keeps its bytes
    embedding_head: bool = setting(False, "Embedding vendors: after the fit, learn a linear head on the image "
                                   "embeddings, initialised at the learned prompt's zero-shot text classifier; it "
                                   "replaces the logit refiner (no extra queries: the embeddings are already paid "
                                   "for; measured: benchmarks/results/suite_accuracy.json).")
    cma_diagonal: bool = setting(True, "Soft mode: separable CMA-ES (a diagonal covariance), linear rather than "
                                 "quadratic in the search dimension and as accurate over the task suite; off: "
                                 "full covariance, as the paper.")
    cma_engine: Literal["numpy", "cma"] | None = setting(None, "Soft mode: the CMA-ES code: numpy (our vectorized "
                                                         "separable CMA-ES, a fraction of a millisecond a generation) "
                                                         "or cma (the cma package, as fits before it); default numpy, "
                                                         "cma with --no-cma-diagonal.")
    # issue 17 (time per generation): scoring every image against every class is O(C^2) a generation; the cap makes
    # it O(FITNESS_ROWS * C), like the vendor's share (see FITNESS_ROWS).
    fitness_rows: int = setting(FITNESS_ROWS, "Soft mode: at most this many training images a generation (a "
                                "class-balanced sample, drawn afresh), so its work grows with classes, not classes x "
                                "images; 0: every image.")
    # issue 15 (the gap to the linear probe): the held-out shots choose the pair, then teach the refiner too
    refit_epochs: int | None = setting(None, "Soft mode with held-out shots: once the prompt and refiner are "
                                       "chosen, train the refiner this many more epochs on every shot, held-out "
                                       f"ones too (one query); default {REFIT_EPOCHS}, 0: off.")

    def __post_init__(self) -> None:
        if self.cma_engine is None:  # the numpy engine is separable only; full covariance is the cma package's
            self.cma_engine = "numpy" if self.cma_diagonal else "cma"
        checks = [
            (self.shots >= 1, "shots must be at least 1"),
            (self.budget is None or self.budget >= 1, "budget must be positive"),
            (self.prompt in ("soft", "text"), "prompt must be 'soft' or 'text'"),
            (self.intrinsic_dim >= 1, "intrinsic_dim must be positive"),
            (self.popsize >= 2, "popsize must be at least 2"),
            (self.sigma > 0 and self.bound > 0 and self.proj_std > 0, "sigma, bound, proj_std must be > 0"),
            (self.step_scale in ("relative", "absolute"), "step_scale must be 'relative' or 'absolute'"),
            (self.hidden >= 1 and (self.lr is None or self.lr > 0) and self.refiner_batch >= 1,
             "hidden, lr, refiner_batch must be > 0"),
            (self.kl_weight >= 0 and self.kl_decay_n >= 1, "kl_weight >= 0 and kl_decay_n >= 1 required"),
            (self.holdout_shots is None or 0 <= self.holdout_shots < self.shots,
             "holdout_shots must be between 0 and shots - 1"),
            (self.eval_every >= 1, "eval_every must be positive"),
            (self.vocab_size >= 10 and min(self.text_elites, self.text_children) >= 1,
             "vocab_size >= 10, text_elites >= 1 and text_children >= 1 required"),
            (1 <= self.minibatch_start <= self.minibatch_end, "need 1 <= minibatch_start <= minibatch_end"),
            (self.concurrency >= 1, "concurrency must be at least 1"),
            (self.rate_limit is None or self.rate_limit > 0, "rate_limit must be positive"),
            (self.retries >= 0 and self.retry_backoff >= 0, "retries and retry_backoff must be non-negative"),
            (self.max_failed_calls is None or self.max_failed_calls >= 0, "max_failed_calls must be non-negative"),
            (self.timeout > 0, "timeout must be positive"),
            (self.memory_budget_mb > 0 and self.checkpoint_every >= 0,
             "memory_budget_mb must be positive and checkpoint_every non-negative"),
            (self.checkpoint_seconds >= 0, "checkpoint_seconds must be non-negative"),
            (self.fitness_rows >= 0, "fitness_rows must be non-negative (0: every image)"),
            (self.refit_epochs is None or self.refit_epochs >= 0, "refit_epochs must be non-negative (0: off)"),
            (self.prompt == "soft" or not self.refit_epochs, "refit_epochs is a soft-mode setting (text mode keeps "
             "the loop's refiner)"),
            (self.cache_precision in ("float32", "float16"), "cache_precision must be 'float32' or 'float16'"),
            (self.cma_engine in ("numpy", "cma"), "cma_engine must be 'numpy' or 'cma'"),
            (self.cma_engine == "cma" or self.cma_diagonal, "cma_engine 'numpy' is separable only: with "
             "--no-cma-diagonal (full covariance) use --cma-engine cma"),
            (self.cache_max_mb is None or self.cache_max_mb > 0, "cache_max_mb must be positive"),
            (self.train_prompt or self.train_refiner, "nothing to train: enable the prompt or the refiner"),
            (self.init_prompt.strip() != "", "init_prompt must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def resolved_budget(self) -> int:
        """The budget in force, in :attr:`budget_unit`: ``budget``, or the default for the mode and the shots."""
        if self.budget is not None:
            return self.budget
        return TEXT_DEFAULT_BUDGET if self.prompt == "text" else default_budget(self.shots)

    @property
    def resolved_lr(self) -> float:
        """The refiner's learning rate in force: ``lr``, or the default for the mode."""
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.prompt == "text" else 1e-4

    @property
    def resolved_refit_epochs(self) -> int:
        """Refit epochs in force: ``refit_epochs``, or :data:`REFIT_EPOCHS` in soft mode (text mode: none)."""
        if self.refit_epochs is not None:
            return self.refit_epochs
        return 0 if self.prompt == "text" else REFIT_EPOCHS

    @property
    def budget_unit(self) -> str:
        """Queries in soft mode; vendor calls in text mode, where a string-only vendor bills per call."""
        return "vendor_calls" if self.prompt == "text" else "queries"

    @property
    def n_holdout(self) -> int:
        """Held-out shots per class."""
        return self.shots // 4 if self.holdout_shots is None else self.holdout_shots

    @property
    def template(self) -> str:
        """The hand-written template matching ``init_prompt``."""
        return f"{self.init_prompt} {{}}."

    def to_dict(self) -> dict[str, Any]:
        """The decisive settings, for the adapter's fit summary and the resume manifest (operational ones are not)."""
        d = asdict(self)
        skip = operational_settings() | {k for k, v in NEW_SETTING_DEFAULTS.items() if d[k] == v}
        if self.prompt == "text":  # no CMA-ES and no refit in text mode: they decide nothing there (text adapters
            skip |= {"cma_engine", "refit_epochs"}  # keep their bytes)
        return {k: v for k, v in d.items() if k not in skip}

    @property
    def failure_cap(self) -> int:
        """Failed vendor calls tolerated in all before the fit stops: ``max_failed_calls``, or half the budget.

        A vendor failing 20% of calls needs 25% more attempts than answers; half the budget leaves room for that.
        """
        return self.max_failed_calls if self.max_failed_calls is not None else max(50, self.resolved_budget // 2)

    @classmethod
    def read_file(cls, path: str | Path) -> dict[str, Any]:
        """The settings in a ``.json`` or ``.toml`` file, names checked."""
        path = Path(path)
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a table of settings")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown fit settings {sorted(unknown)}; known: {sorted(known)}")
        return data

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> FitConfig:
        """Load from ``.json`` or ``.toml``; ``overrides`` win over the file."""
        return cls(**{**cls.read_file(path), **overrides})


# Decisive settings newer than the first shipped adapters, with the value that means "as before": recorded in
# the fit summary only when set otherwise (cache_precision: float16 answers change the adapter). fitness_rows: the
# default cap reproduces every earlier fit of at most FITNESS_ROWS training images (all the ones measured), so it
# is the one left out; a fit of more, started before the cap existed, resumes capped.
NEW_SETTING_DEFAULTS: dict[str, Any] = {"cache_precision": "float32", "embedding_head": False, "cma_diagonal": False,
                                        "fitness_rows": FITNESS_ROWS, "cma_engine": "cma",
                                        "refit_epochs": 0}


def operational_settings() -> frozenset[str]:
    """The settings that change how fast a fit runs or how hard it tries, never what it finds (from the metadata)."""
    return frozenset(f.name for f in fields(FitConfig) if f.metadata["group"] == "operational")

