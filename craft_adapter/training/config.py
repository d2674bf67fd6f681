"""Fit hyperparameters: one validated dataclass, loadable from JSON or TOML, overridable from the CLI."""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

DEFAULT_BUDGETS = {1: 2000, 2: 4000, 4: 4000, 8: 8000, 16: 8000}
TEXT_DEFAULT_BUDGET = 20_000  # vendor calls
# change how fast a fit runs or how hard it tries, never what it finds
OPERATIONAL = ("concurrency", "rate_limit", "retries", "retry_backoff", "max_failed_calls", "timeout")


def default_budget(shots: int) -> int:
    """The paper's query budget for ``shots`` (8000 for 8 and 16 shots, 4000 for 2 and 4, 2000 for 1)."""
    if shots in DEFAULT_BUDGETS:
        return DEFAULT_BUDGETS[shots]
    return 2000 if shots < 2 else 4000 if shots < 8 else 8000


@dataclass
class FitConfig:
    """Everything that decides a fit; two fits with equal configs and inputs give equal adapter files."""

    shots: int = 16
    seed: int = 1
    budget: int | None = None  # soft: queries (default by shots); text: vendor calls (default 20000)
    prompt: Literal["soft", "text"] = "soft"
    init_prompt: str = "a photo of a"  # soft mode: p0; the template becomes "<init_prompt> {}."
    # prompt generation module (CMA-ES)
    intrinsic_dim: int = 512
    popsize: int = 40
    sigma: float = 1.0
    bound: float = 5.0
    proj_std: float = 0.2
    step_scale: Literal["relative", "absolute"] = "relative"  # relative: steps in units of std(p0)
    # prompt generation module, text mode (word edits)
    vocab_size: int = 4000
    text_children: int = 16  # new templates per generation
    text_elites: int = 4  # templates that survive a generation
    minibatch_start: int = 3  # images per class in a generation's minibatch, at the start of the budget
    minibatch_end: int = 3  # ... and at its end (measured: benchmarks/results/text_schedules.json)
    concurrency: int = 8  # scoring vendors: calls in flight (the result never depends on it)
    rate_limit: float | None = None  # scoring vendors: calls per second
    retries: int = 5  # per vendor call, on transient faults (timeouts, 429, 5xx, garbled replies)
    retry_backoff: float = 0.5  # seconds before the first retry, doubling each time (jittered, capped at 30)
    max_failed_calls: int | None = None  # stop after this many failed calls in all; None: half the budget
    timeout: float = 60.0  # seconds per HTTP vendor call
    # prediction refinement module
    hidden: int = 256
    lr: float = 1e-3
    refiner_batch: int = 32
    kl_weight: float = 1.0
    kl_decay_n: int = 2  # the refiner's KL weight drops to 0 after budget // kl_decay_n queries
    # what trains (the ablations switch one off)
    train_prompt: bool = True
    train_refiner: bool = True
    # model selection on held-out shots, never on the test set
    holdout_shots: int | None = None  # None: shots // 4
    eval_every: int = 10  # generations between hold-out checks (each costs one query)

    def __post_init__(self) -> None:
        checks = [
            (self.shots >= 1, "shots must be at least 1"),
            (self.budget is None or self.budget >= 1, "budget must be positive"),
            (self.prompt in ("soft", "text"), "prompt must be 'soft' or 'text'"),
            (self.intrinsic_dim >= 1, "intrinsic_dim must be positive"),
            (self.popsize >= 2, "popsize must be at least 2"),
            (self.sigma > 0 and self.bound > 0 and self.proj_std > 0, "sigma, bound, proj_std must be > 0"),
            (self.step_scale in ("relative", "absolute"), "step_scale must be 'relative' or 'absolute'"),
            (self.hidden >= 1 and self.lr > 0 and self.refiner_batch >= 1, "hidden, lr, refiner_batch must be > 0"),
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
            (self.train_prompt or self.train_refiner, "nothing to train: enable the prompt or the refiner"),
            (self.init_prompt.strip() != "", "init_prompt must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def query_budget(self) -> int:
        """The budget in force, in :attr:`budget_unit`."""
        if self.budget is not None:
            return self.budget
        return TEXT_DEFAULT_BUDGET if self.prompt == "text" else default_budget(self.shots)

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
        """The settings that decide the result, for the adapter's fit summary (how fast calls go does not)."""
        return {k: v for k, v in asdict(self).items() if k not in OPERATIONAL}

    @property
    def failure_cap(self) -> int:
        """Failed vendor calls tolerated in all before the fit stops: ``max_failed_calls``, or half the budget.

        A vendor failing 20% of calls needs 25% more attempts than answers; half the budget leaves room for that.
        """
        return self.max_failed_calls if self.max_failed_calls is not None else max(50, self.query_budget // 2)

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
