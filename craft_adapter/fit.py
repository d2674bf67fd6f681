"""CraFT's collaborative fit: the prompt module and the refiner take turns until the query budget is spent.

Each round: one CMA-ES generation scores ``popsize`` candidate prompts on the few-shot set (the fitness is
``CE + w * KL(refined || logits)``), then the refiner trains one epoch on the generation's best candidate's
logits (``CE + w * KL(logits || refined)``, w dropping to 0 after ``budget // kl_decay_n`` queries). Every
``eval_every`` generations the current prompt and refiner are scored on held-out shots (one query); the
best pair is kept. Every call goes through the :class:`BlackBox`, so every call is counted and capped.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .artifact import Adapter, refiner_input
from .boundary import BlackBox
from .config import FitConfig
from .prompt import SoftPromptSearch
from .refiner import Refiner, prompt_fitness, train_epoch


@dataclass
class FitState:
    """Where a fit stands after a generation; handed to progress callbacks."""

    generation: int
    queries: int
    vendor_calls: int
    budget: int
    best_fitness: float
    train_acc: float
    holdout_acc: float | None
    ctx: np.ndarray | None = field(repr=False, default=None)  # current prompt, soft mode
    refiner: Refiner | None = field(repr=False, default=None)


@dataclass
class FitResult:
    """The adapter and how it was reached."""

    adapter: Adapter
    history: list[dict]
    wall_time_s: float
    vendor_time_s: float


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def fit(train: BlackBox, holdout: BlackBox | None, y_train: np.ndarray, y_holdout: np.ndarray | None,
        cfg: FitConfig, on_generation: Callable[[FitState], None] | None = None) -> FitResult:
    """Fit a CraFT adapter against the black box; ``holdout`` shares ``train``'s meter."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    meter, kind = train.meter, train.capabilities.returns
    budget = cfg.query_budget
    if meter.budget is None or meter.budget != budget:
        raise ValueError(f"the black box's meter must carry the fit budget ({budget})")
    y = torch.from_numpy(y_train)
    n_classes = len(train.class_names)
    refiner = Refiner(n_classes, cfg.hidden)
    opt = torch.optim.Adam(refiner.parameters(), lr=cfg.lr)
    kl_until = budget // cfg.kl_decay_n
    soft = cfg.prompt == "soft"
    if soft and cfg.train_prompt:
        search = SoftPromptSearch(train.soft_prompt_init(cfg.init_prompt), cfg)
    elif cfg.train_prompt:
        raise NotImplementedError("text-mode prompt search is not available yet; "
                                  "use --prompt soft, or --no-train-prompt for a fixed template")
    p0 = train.soft_prompt_init(cfg.init_prompt) if soft and not cfg.train_prompt else None

    def score(box: BlackBox, ctx: np.ndarray | None) -> torch.Tensor:
        raw = box.logits_soft(ctx) if soft else box.logits_text([cfg.template])
        return torch.from_numpy(refiner_input(raw, kind))  # [p, n, c]

    holdout_x: dict[str, torch.Tensor] = {}

    def holdout_acc(ctx: np.ndarray | None) -> float:
        # A fixed prompt is scored on the hold-out shots once; a searched one at every check.
        if cfg.train_prompt or "fixed" not in holdout_x:
            holdout_x["fixed"] = score(holdout, ctx)[0]
        with torch.no_grad():
            return _acc(refiner(holdout_x["fixed"]), torch.from_numpy(y_holdout))

    use_holdout = holdout is not None and holdout.n_images > 0
    rounds = plan_rounds(cfg, use_holdout)
    fixed = None if cfg.train_prompt else score(train, p0[None] if soft else None)[0]
    best: tuple[float, np.ndarray | None, dict] | None = None
    history: list[dict] = []
    cur_ctx = p0
    for gen in range(1, rounds + 1):
        if cfg.train_prompt:
            z = search.ask()
            ctx = search.context(z)  # [pop, n_ctx, width]
            x = score(train, ctx)  # [pop, n, c]
            with torch.no_grad():
                w = cfg.kl_weight if cfg.train_refiner else 0.0
                fitness = prompt_fitness(x, refiner(x) if cfg.train_refiner else x, y, w)  # [pop]
            search.tell(z, fitness.numpy())
            b = int(fitness.argmin())
            cur_ctx, cur_x, best_fit = ctx[b], x[b], float(fitness[b])
        else:
            cur_x, best_fit = fixed, float("nan")
        if cfg.train_refiner:
            w = cfg.kl_weight if meter.used < kl_until else 0.0
            train_epoch(refiner, opt, cur_x, y, w, cfg.refiner_batch, shuffle)
        with torch.no_grad():
            train_acc = _acc(refiner(cur_x), y)
        h_acc = None
        if use_holdout and (gen % cfg.eval_every == 0 or gen == rounds):
            h_acc = holdout_acc(None if cur_ctx is None else cur_ctx[None])
            if best is None or h_acc >= best[0]:
                best = (h_acc, None if cur_ctx is None else cur_ctx.copy(), copy.deepcopy(refiner.state_dict()))
        history.append({"generation": gen, "queries": meter.queries, "vendor_calls": meter.vendor_calls,
                        "best_fitness": best_fit, "train_acc": train_acc, "holdout_acc": h_acc})
        if on_generation is not None:
            on_generation(FitState(gen, meter.queries, meter.vendor_calls, budget, best_fit, train_acc, h_acc,
                                   cur_ctx, refiner))

    final_ctx = cur_ctx
    if best is not None:
        _, final_ctx, sd = best
        refiner.load_state_dict(sd)
    adapter = Adapter(
        class_names=list(train.class_names), template=cfg.template, mode=cfg.prompt,
        logit_kind=kind, logit_scale=train.logit_scale,
        refiner=refiner.to_arrays(), backend=train.identity,
        ctx=None if final_ctx is None else np.ascontiguousarray(final_ctx, dtype=np.float32),
        prompt_reading=train.describe_soft(final_ctx) if final_ctx is not None else "",
        fit={"shots": cfg.shots, "seed": cfg.seed, "budget": budget, "budget_unit": meter.unit,
             "queries": meter.queries, "vendor_calls": meter.vendor_calls, "images_sent": meter.images_sent,
             "generations": rounds, "holdout_shots": cfg.n_holdout if use_holdout else 0,
             "holdout_acc": None if best is None else best[0], "config": cfg.to_dict()},
    )
    return FitResult(adapter, history, time.perf_counter() - t0, meter.vendor_seconds)


def plan_rounds(cfg: FitConfig, use_holdout: bool) -> int:
    """How many rounds fit the budget, counting the hold-out checks (one query each, every ``eval_every``)."""
    budget = cfg.query_budget
    if not cfg.train_prompt:
        # A fixed prompt costs one query (plus one on the hold-out shots); the refiner gets as many epochs
        # as a collaborative fit of the same budget would give it.
        if budget < 1 + use_holdout:
            raise ValueError(f"budget {budget} is too small: a fixed prompt needs {1 + use_holdout} queries")
        return max(1, budget // cfg.popsize)
    rounds = budget // cfg.popsize
    while rounds > 0 and rounds * cfg.popsize + (-(-rounds // cfg.eval_every) if use_holdout else 0) > budget:
        rounds -= 1
    if rounds == 0:
        raise ValueError(f"budget {budget} is too small for one generation of {cfg.popsize} candidates"
                         + (" plus a hold-out check" if use_holdout else ""))
    return rounds
