"""The prompt generation module, soft mode: context vectors ``p0 + A z`` with ``z`` searched by CMA-ES."""

from __future__ import annotations

import cma
import numpy as np

from .config import FitConfig


class SoftPromptSearch:
    """CMA-ES over a low-dimensional ``z``; a fixed random projection ``A`` maps it to context vectors.

    With ``step_scale="relative"`` the entries of ``A`` are scaled by the spread of ``p0``, so one unit of
    ``sigma`` moves every context entry by about ``proj_std * std(p0)`` whatever the model's embedding
    scale. ``"absolute"`` keeps the constants in raw embedding units, as tuned for OpenAI CLIP.
    """

    def __init__(self, p0: np.ndarray, cfg: FitConfig) -> None:
        self.p0 = p0.astype(np.float32)  # [n_ctx, width]
        unit = float(p0.std()) if cfg.step_scale == "relative" else 1.0
        rng = np.random.default_rng(cfg.seed)
        std = cfg.proj_std * unit / np.sqrt(cfg.intrinsic_dim)
        self.A = rng.normal(0.0, std, size=(cfg.intrinsic_dim, p0.size)).astype(np.float32)  # [d, n_ctx*width]
        self.bound = cfg.bound
        self.es = cma.CMAEvolutionStrategy(
            np.zeros(cfg.intrinsic_dim), cfg.sigma,
            {"popsize": cfg.popsize, "seed": cfg.seed + 1, "verbose": -9, "bounds": [-cfg.bound, cfg.bound]},
        )

    def ask(self) -> np.ndarray:
        """One generation of candidates ``z [popsize, d]``."""
        return np.asarray(self.es.ask())

    def tell(self, z: np.ndarray, fitness: np.ndarray) -> None:
        """Report the candidates' fitness (lower is better)."""
        self.es.tell(list(z), [float(f) for f in fitness])

    def context(self, z: np.ndarray) -> np.ndarray:
        """Context vectors ``[p, n_ctx, width]`` for candidates ``z [p, d]``."""
        return self.p0[None] + (z.astype(np.float32) @ self.A).reshape(len(z), *self.p0.shape)
