"""The prediction refinement module and the prediction-consistent losses (CraFT section 1.2-1.3)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from craft_adapter.artifact.adapter_file import REFINER_KEYS


class Refiner(nn.Module):
    """``refined = x + fc2(relu(fc1(x)))`` on the vendor's (preprocessed) scores ``x [n, c]``."""

    def __init__(self, n_classes: int, hidden: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_classes, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)
        # Start as the identity, so the refiner never makes zero-shot worse before it has learned anything.
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Refined logits ``[n, c]``."""
        return x + self.fc2(F.relu(self.fc1(x)))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The weights as float32 numpy arrays under the adapter file's tensor names."""
        sd = self.state_dict()
        return {k: sd[k.removeprefix("refiner.")].detach().cpu().float().numpy().copy() for k in REFINER_KEYS}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Refiner:
        """Rebuild a refiner from adapter-file arrays."""
        hidden, n_classes = arrays["refiner.fc1.weight"].shape
        r = cls(n_classes, hidden)
        r.load_state_dict({k.removeprefix("refiner."): torch.from_numpy(np.array(v)) for k, v in arrays.items()})
        return r


def kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(p) || softmax(q))`` along the last axis, one value per row."""
    p_log = F.log_softmax(p_logits, -1)
    return (p_log.exp() * (p_log - F.log_softmax(q_logits, -1))).sum(-1)


def fitness_rows(logits: torch.Tensor, refined: torch.Tensor, y: torch.Tensor, w: float) -> torch.Tensor:
    """Per image ``CE(logits, y) + w * KL(softmax(refined) || softmax(logits))``; ``[p, n, c]`` in, ``[p, n]`` out."""
    ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(logits)), reduction="none").view(len(logits), -1)
    return ce + w * kl_rows(refined, logits)


def prompt_fitness(logits: torch.Tensor, refined: torch.Tensor, y: torch.Tensor, w: float) -> torch.Tensor:
    """Per-candidate mean of :func:`fitness_rows`; inputs ``[p, n, c]``."""
    return fitness_rows(logits, refined, y, w).mean(-1)  # [p]


# float32 values alive per score while a chunk's fitness is computed: the input, the refiner's output and residual,
# three log-softmaxes, the softmax and two products (measured on [1, 12000, 1000] chunks: about 10 before freeing)
LIVE_PER_SCORE = 10


def chunk_plan(p: int, m: int, c: int, hidden: int, budget_mb: float) -> tuple[int, int]:
    """Candidates and image rows per chunk so that one chunk's temporaries stay within ``budget_mb``.

    Whole candidates are preferred (the population in one chunk when it fits, which is today's single pass);
    rows are split only when one candidate alone is over the budget.
    """
    row_bytes = 4 * (LIVE_PER_SCORE * c + 2 * hidden)
    rows = max(1, int(budget_mb * 2**20) // row_bytes)
    if rows >= m:
        return max(1, min(p, rows // max(m, 1))), m
    return 1, rows


def population_fitness(take: Callable[[int, int], np.ndarray], shape: tuple[int, int, int],
                       as_input: Callable[[np.ndarray], torch.Tensor], refine: Callable[[torch.Tensor], torch.Tensor],
                       y: torch.Tensor, w: float, hidden: int,
                       budget_mb: float) -> tuple[torch.Tensor, int, np.ndarray]:
    """:func:`prompt_fitness` of a population whose scores ``take(i, j)`` makes a few candidates at a time.

    Memory is bounded by ``budget_mb``, not by population x images x classes. Every per-image term is
    computed as in one pass and the means are taken over whole rows, so chunking does not change the values
    (torch's row-wise kernels do not depend on how many rows are in a call). Returns the fitness ``[p]``, the
    index of the first best candidate and its raw scores ``[m, c]`` (kept from its chunk, never made twice).
    """
    p, m, c = shape
    q, r = chunk_plan(p, m, c, hidden, budget_mb)
    out: list[torch.Tensor] = []
    best, best_f, best_raw = -1, math.inf, None
    for i in range(0, p, q):
        raw = take(i, min(p, i + q))  # [q, m, c]
        x = as_input(raw)
        rows = [fitness_rows(x[:, a:a + r], refine(x[:, a:a + r]), y[a:a + r], w) for a in range(0, m, r)]
        out.append((rows[0] if len(rows) == 1 else torch.cat(rows, 1)).mean(-1))
        j = int(torch.argmin(out[-1]))  # the first of equal minima, as argmin over the whole population
        if best < 0 or float(out[-1][j]) < best_f:
            best, best_f = i + j, float(out[-1][j])
            best_raw = raw[j] if q >= p else raw[j].copy()  # a copy frees the chunk for the next one
        del raw, x, rows
    return (out[0] if len(out) == 1 else torch.cat(out)), best, best_raw


def refiner_loss(refined: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, w: float) -> torch.Tensor:
    """``CE(refined, y) + w * KL(softmax(logits) || softmax(refined))``."""
    loss = F.cross_entropy(refined, y)
    return loss + w * kl_rows(logits, refined).mean() if w > 0 else loss


def train_epoch(refiner: Refiner, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, w: float,
                batch_size: int, gen: torch.Generator) -> float:
    """One shuffled epoch of refiner updates on inputs ``x [n, c]``; returns the mean loss."""
    refiner.train()
    order = torch.randperm(len(x), generator=gen)
    total = 0.0
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        loss = refiner_loss(refiner(x[idx]), x[idx], y[idx], w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    refiner.eval()
    return total / len(x)

