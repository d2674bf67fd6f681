"""The refit: once the hold-out checks have chosen the prompt and refiner, the refiner learns from every shot.

Selection spends a quarter of the shots (``shots // 4`` a class) on choosing the pair, so the loop's refiner never
sees them; the white-box linear probe it is compared with sees all of them. After the loop, the chosen refiner trains
``refit_epochs`` more epochs on every shot, the held-out ones too, under the chosen context, with the loop's loss (the
KL term on), its learning rate and a fresh Adam. The prompt is fixed by then, so the refiner trains on fixed logits
instead of chasing a moving prompt. The context's class texts are asked for once, one query the loop reserves from its
first generation; both image sets' logits come from that answer and the image embeddings already paid for. Above
``fitness_rows`` shots an epoch trains on a class-balanced sample of that many, as a loop generation does, so the
refit's work stays bounded at many classes.

Chosen side by side on the same fits (``benchmarks/refit_probe.py``: the suite's four tuning tasks, seeds 1 to 3,
``benchmarks/results/refit_probe.json``), never on the held-out task: 50 epochs at the loop's 1e-4 gained 1.24 points
on the tasks' mean and gained on every task; 1e-3 gained as much on the mean but lost on fashion-night, and a fresh
refiner trained as many epochs as the chosen one had gained as much at up to four times the epochs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from craft_adapter.artifact.adapter_file import refiner_input
from craft_adapter.blackbox.box import BlackBox
from craft_adapter.training.config import FitConfig
from craft_adapter.training.prompt_modules import balanced_rows, half_precision
from craft_adapter.training.refiner import Refiner, train_epoch
from craft_adapter.training.threads import one_thread

REFIT_SALT = 2909  # keeps the refit's row samples apart from the loop's (prompt_modules.ROWS_SALT)


def refit_on_every_shot(refiner: Refiner, boxes: Sequence[BlackBox], labels: Sequence[np.ndarray], ctx: np.ndarray,
                        cfg: FitConfig, gen: torch.Generator) -> dict:
    """Train the chosen ``refiner`` in place on every shot of ``boxes`` (training, held-out) under context ``ctx``
    (one query); returns what the adapter's fit summary records of it."""
    # the one paid call; it keeps every thread, as the loop's do (an answer's bits depend on the thread count and
    # the batch, and a resumed fit may read it back from the cache); the refiner's small sums run on one
    emb = boxes[-1].soft_embeddings_alone(ctx)  # [1, c, d]
    with one_thread():
        if cfg.cache_precision == "float16":  # as the loop saw its answers
            emb = half_precision(emb)
        kind = boxes[0].capabilities.returns
        x = torch.from_numpy(np.concatenate([refiner_input(b.cosine_logits(emb)[0], kind) for b in boxes]))
        y = torch.from_numpy(np.concatenate([np.asarray(v, dtype=np.int64) for v in labels]))
        opt = torch.optim.Adam(refiner.parameters(), lr=cfg.resolved_lr)
        capped = bool(cfg.fitness_rows) and len(y) > cfg.fitness_rows
        by_class = [np.flatnonzero(y.numpy() == c) for c in range(x.shape[1])] if capped else []
        for epoch in range(cfg.resolved_refit_epochs):
            rows = slice(None)
            if capped:  # as a loop generation: a class-balanced sample, drawn afresh, so the work is bounded
                draw = np.random.default_rng([cfg.seed % 2**64, epoch, REFIT_SALT])
                rows = balanced_rows(by_class, cfg.fitness_rows, draw)
            train_epoch(refiner, opt, x[rows], y[rows], cfg.kl_weight, cfg.refiner_batch, gen)
    return {"epochs": cfg.resolved_refit_epochs, "lr": cfg.resolved_lr, "images": len(y),
            **({"rows_an_epoch": cfg.fitness_rows} if capped else {})}
