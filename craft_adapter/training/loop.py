"""CraFT's collaborative fit: the prompt module and the refiner take turns until the budget is spent.

Each generation the prompt module (soft context by CMA-ES, or text templates by word edits) proposes
candidates, which are scored on the few-shot set (text mode: on a minibatch; soft mode: on a class-balanced
sample when the set has more than ``fitness_rows`` images) with fitness
``CE(logits) + w * KL(refined || logits)``; then the refiner trains one epoch on the best candidate's logits
with ``CE(refined) + w * KL(logits || refined)``, w dropping to 0 after ``budget // kl_decay_n``. Every
``eval_every`` generations the current prompt and refiner are scored on held-out shots and the best pair is
kept; in soft mode that refiner then trains ``refit_epochs`` more on every shot, the held-out ones too
(:mod:`.refit`). A generation starts only if it, the last hold-out check and the refit fit in what is left of the
budget. Every call goes through the :class:`BlackBox`, so every call is counted and capped.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from craft_adapter.artifact.adapter_file import Adapter, refiner_input
from craft_adapter.blackbox.box import BlackBox
from craft_adapter.training.checkpoint import Checkpoints
from craft_adapter.training.config import FitConfig
from craft_adapter.training.prompt_modules import make_prompt_module
from craft_adapter.training.refiner import Refiner, population_fitness, train_epoch
from craft_adapter.training.refit import refit_on_every_shot
from craft_adapter.training.threads import one_thread, torch_threads


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
    prompt: np.ndarray | str | None = field(repr=False, default=None)  # current context or template
    refiner: Refiner | None = field(repr=False, default=None)
    meter: dict = field(repr=False, default_factory=dict)  # QueryMeter.summary() after this generation


@dataclass
class FitResult:
    """The adapter and how it was reached."""

    adapter: Adapter
    history: list[dict]
    wall_time_s: float
    vendor_time_s: float
    meter: dict = field(default_factory=dict)  # QueryMeter.summary(): what was used, paid, cached, failed


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def fit(train: BlackBox, holdout: BlackBox | None, y_train: np.ndarray, y_holdout: np.ndarray | None,
        cfg: FitConfig, on_generation: Callable[[FitState], None] | None = None,
        checkpoints: Checkpoints | None = None) -> FitResult:
    """Fit a CraFT adapter against the black box; ``holdout`` shares ``train``'s meter.

    With ``checkpoints`` (soft, or text against a scoring vendor), a fit continues from its last checkpoint and
    keeps writing them.
    """
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    meter, kind, budget = train.meter, train.capabilities.returns, cfg.resolved_budget
    if meter.budget != budget or meter.unit != cfg.budget_unit:
        raise ValueError(f"the black box's meter must carry the fit budget ({budget} {cfg.budget_unit})")
    vendor_threads = torch.get_num_threads()
    refiner = Refiner(len(train.class_names), cfg.hidden)
    opt = torch.optim.Adam(refiner.parameters(), lr=cfg.resolved_lr)
    module = make_prompt_module(train, cfg, y_train)
    use_holdout = holdout is not None and holdout.n_images > 0
    y_hold = torch.from_numpy(y_holdout) if use_holdout else None

    def as_input(raw: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(refiner_input(raw, kind))  # [p, m, c]

    def check_cost(cand) -> int:
        return module.cost(holdout, [cand], None) if use_holdout else 0

    def labels(rows) -> torch.Tensor:
        return torch.from_numpy(y_train if rows is None else y_train[rows])

    # The last hold-out check must stay affordable: every generation leaves its worst case unspent; so must the
    # refit's one query (the chosen context on every shot).
    reserve = holdout.n_images if use_holdout and cfg.budget_unit == "vendor_calls" else int(use_holdout)
    # (not under an embedding head, which replaces the refiner: training/embedding_head.py)
    refit = (use_holdout and cfg.prompt == "soft" and cfg.train_refiner and cfg.resolved_refit_epochs > 0
             and not cfg.embedding_head)
    best: tuple[float, object, dict] | None = None
    history: list[dict] = []
    cur, gen, checked = None, 0, True
    # soft and text (scoring vendors) checkpoints; fixed prompts and text through embeddings resume by replay
    ckpt = checkpoints if checkpoints is not None and checkpoints.takes(module) else None
    if ckpt is not None:
        restored = ckpt.restore(module, refiner, opt, shuffle, meter, (train, holdout if use_holdout else None))
        if restored is not None:
            gen, cur, best, history, checked = restored
    try:
        while module.max_generations is None or gen < module.max_generations:
            with one_thread():
                cands = module.propose()
            rows = module.rows(meter.used, budget)  # None: every image
            due = use_holdout and (gen + 1) % cfg.eval_every == 0
            if module.cost(train, cands, rows) + reserve * (1 + due) + refit > meter.remaining:
                break
            scores = module.score(train, cands, rows)  # [p, m, c], made a chunk at a time within the memory budget
            with one_thread():  # everything from here to the hold-out check is the fit's own arithmetic
                with torch.no_grad(), torch_threads(vendor_threads):  # but this product is big: training/threads.py
                    w = cfg.kl_weight if cfg.train_refiner else 0.0
                    fitness, first, best_raw = population_fitness(
                        scores.take, scores.shape, as_input, refiner if cfg.train_refiner else (lambda t: t),
                        labels(rows), w, cfg.hidden, cfg.memory_budget_mb)  # [p]
                b = module.tell(cands, fitness.numpy())
                cur = cands[b]
                raw_b = best_raw if b == first else scores.take(b, b + 1)[0]
                del scores, best_raw
                ref_rows, ref_raw = module.refiner_data(train, cur, rows, raw_b)
                cur_x, cur_y = as_input(ref_raw), labels(ref_rows)
                if cfg.train_refiner:
                    w = cfg.kl_weight if meter.used < budget // cfg.kl_decay_n else 0.0
                    train_epoch(refiner, opt, cur_x, cur_y, w, cfg.refiner_batch, shuffle)
                gen += 1
                with torch.no_grad():
                    train_acc = _acc(refiner(cur_x), cur_y)
            h_acc, checked = None, due
            if due:
                h_acc, best = _check(holdout, module, cur, refiner, as_input, y_hold, best)
            history.append({"generation": gen, "queries": meter.queries, "vendor_calls": meter.vendor_calls,
                            "best_fitness": float(fitness[b]), "train_acc": train_acc, "holdout_acc": h_acc})
            if on_generation is not None:
                on_generation(FitState(gen, meter.queries, meter.vendor_calls, budget, float(fitness[b]), train_acc,
                                       h_acc, cur, refiner, meter.summary()))
            if ckpt is not None:
                ckpt.generation_done(gen, fitness.numpy(), meter, refiner, opt, shuffle, cur, best, history, checked,
                                     module)
    except BaseException:  # Ctrl-C, a vendor stop, a cache failure: keep the last completed generation
        if ckpt is not None:
            with contextlib.suppress(OSError):
                ckpt.save_last()
        raise
    if gen == 0:
        raise ValueError(f"budget {budget} {cfg.budget_unit} is too small for one generation"
                         + (" and a hold-out check" if use_holdout else ""))
    if use_holdout and not checked and check_cost(cur) <= meter.remaining:
        _, best = _check(holdout, module, cur, refiner, as_input, y_hold, best)
    final = cur
    if best is not None:
        _, final, state = best
        refiner.load_state_dict(state)
    refit_info = None
    if refit and isinstance(final, np.ndarray):
        refit_info = refit_on_every_shot(refiner, (train, holdout), (y_train, y_holdout), final, cfg, shuffle)
    ctx = final if isinstance(final, np.ndarray) else None
    adapter = Adapter(
        class_names=list(train.class_names), template=cfg.template if ctx is not None else final,
        mode=cfg.prompt, logit_kind=kind, logit_scale=train.logit_scale, refiner=refiner.to_arrays(),
        backend=train.identity, ctx=None if ctx is None else np.ascontiguousarray(ctx, dtype=np.float32),
        prompt_reading=train.describe_soft(ctx) if ctx is not None else final,
        fit={"shots": cfg.shots, "seed": cfg.seed, "budget": budget, "budget_unit": meter.unit,
             "queries": meter.queries, "vendor_calls": meter.vendor_calls, "images_sent": meter.images_sent,
             "generations": gen, "holdout_shots": cfg.n_holdout if use_holdout else 0,
             "holdout_acc": None if best is None else best[0], "config": cfg.to_dict(),
             **({"refit": refit_info} if refit_info else {})},
    )
    return FitResult(adapter, history, time.perf_counter() - t0, meter.vendor_seconds, meter.summary())


def _check(holdout: BlackBox, module, cand, refiner: Refiner, as_input, y: torch.Tensor, best):
    """Hold-out accuracy of ``cand`` with the current refiner; keep the pair if it is the best so far."""
    x = as_input(module.score(holdout, [cand], None).take(0, 1))[0]
    with torch.no_grad():
        acc = _acc(refiner(x), y)
    if best is None or acc >= best[0]:
        best = (acc, cand.copy() if isinstance(cand, np.ndarray) else cand, copy.deepcopy(refiner.state_dict()))
    return acc, best
