"""The prompt generation module, soft mode: context vectors ``p0 + A z`` with ``z`` searched by CMA-ES."""

from __future__ import annotations

import warnings

import numpy as np

with warnings.catch_warnings():  # cma warns on import that it cannot plot without matplotlib; a fit never plots
    warnings.filterwarnings("ignore", message="Could not import matplotlib", category=UserWarning)
    import cma

from craft_adapter.training.config import FitConfig


class SoftPromptSearch:
    """CMA-ES over a low-dimensional ``z``; a fixed random projection ``A`` maps it to context vectors.

    The paper draws ``A`` with entries of std ``proj_std`` in raw embedding units (``"absolute"``). With
    ``step_scale="relative"`` (the default) the entries have std ``proj_std * std(p0)``, so a step of
    ``sigma`` moves each context entry by about ``sigma * proj_std * sqrt(intrinsic_dim) * std(p0)``: the
    same move relative to the model's own embedding spread, whatever that spread is.
    """

    def __init__(self, p0: np.ndarray, cfg: FitConfig) -> None:
        self.p0 = p0.astype(np.float32)  # [n_ctx, width]
        unit = float(p0.std()) if cfg.step_scale == "relative" else 1.0
        rng = np.random.default_rng(cfg.seed)
        std = cfg.proj_std * unit
        self.A = rng.normal(0.0, std, size=(cfg.intrinsic_dim, p0.size)).astype(np.float32)  # [d, n_ctx*width]
        self.bound = cfg.bound
        opts = {"popsize": cfg.popsize, "seed": cfg.seed + 1, "verbose": -9, "bounds": [-cfg.bound, cfg.bound]}
        if cfg.cma_diagonal:  # sep-CMA: O(d) per sample instead of O(d^2), and no eigendecomposition
            opts["CMA_diagonal"] = True
        self.es = cma.CMAEvolutionStrategy(np.zeros(cfg.intrinsic_dim), cfg.sigma, opts)

    def ask(self) -> np.ndarray:
        """One generation of candidates ``z [popsize, d]``."""
        return np.asarray(self.es.ask())

    def tell(self, z: np.ndarray, fitness: np.ndarray) -> None:
        """Report the candidates' fitness (lower is better)."""
        self.es.tell(list(z), [float(f) for f in fitness])

    def context(self, z: np.ndarray) -> np.ndarray:
        """Context vectors ``[p, n_ctx, width]`` for candidates ``z [p, d]``."""
        return self.p0[None] + (z.astype(np.float32) @ self.A).reshape(len(z), *self.p0.shape)
