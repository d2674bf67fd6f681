"""The prediction refinement module and the prediction-consistent losses (CraFT section 1.2-1.3)."""

from __future__ import annotations

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


def prompt_fitness(logits: torch.Tensor, refined: torch.Tensor, y: torch.Tensor, w: float) -> torch.Tensor:
    """Per-candidate ``CE(logits, y) + w * KL(softmax(refined) || softmax(logits))``; inputs ``[p, n, c]``."""
    ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(logits)), reduction="none").view(len(logits), -1)
    return (ce + w * kl_rows(refined, logits)).mean(-1)  # [p]


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
