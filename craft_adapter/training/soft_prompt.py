"""The prompt generation module, soft mode: context vectors ``p0 + A z`` with ``z`` searched by CMA-ES.

Two engines (``cma_engine``): ``numpy``, our vectorized separable CMA-ES (:mod:`.sep_cma`, the default), and the
``cma`` package (full covariance as the paper, or separable as fits before the numpy engine existed).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

with warnings.catch_warnings():  # cma warns on import that it cannot plot without matplotlib; a fit never plots
    warnings.filterwarnings("ignore", message="Could not import matplotlib", category=UserWarning)
    import cma

from craft_adapter.training.config import FitConfig
from craft_adapter.training.sep_cma import SepCMA


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
        self.bound, self.engine = cfg.bound, cfg.cma_engine
        self.es: Any
        if cfg.cma_engine == "numpy":  # separable only (FitConfig checks): our vectorized sep-CMA-ES
            self.es = SepCMA(np.zeros(cfg.intrinsic_dim), cfg.sigma, cfg.popsize, cfg.bound, seed=cfg.seed + 1)
            return
        opts = {"popsize": cfg.popsize, "seed": cfg.seed + 1, "verbose": -9, "bounds": [-cfg.bound, cfg.bound]}
        if cfg.cma_diagonal:  # sep-CMA: O(d) per sample instead of O(d^2), and no eigendecomposition
            opts["CMA_diagonal"] = True
        self.es = cma.CMAEvolutionStrategy(np.zeros(cfg.intrinsic_dim), cfg.sigma, opts)

    def ask(self) -> np.ndarray:
        """One generation of candidates ``z [popsize, d]``."""
        return self.es.ask() if self.engine == "numpy" else np.asarray(self.es.ask())

    def tell(self, z: np.ndarray, fitness: np.ndarray) -> None:
        """Report the candidates' fitness (lower is better)."""
        if self.engine == "numpy":
            self.es.tell(z, fitness)
        else:
            self.es.tell(list(z), [float(f) for f in fitness])

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """What a checkpoint keeps of the search to check a replay against: arrays and JSON values (copies).

        Mean, step size and iteration count, and the random state: the engine's own generator, or numpy's global
        one, from which the ``cma`` package draws (kept as checkpoints written before the numpy engine had it).
        """
        arrays = {"es.mean": np.asarray(self.es.mean, np.float64).copy()}
        meta: dict[str, Any] = {"sigma": float(self.es.sigma), "countiter": int(self.es.countiter)}
        if self.engine == "numpy":
            return arrays, meta | {"rng": self.es.rng_state()}
        state = np.random.get_state()
        return arrays | {"np_rng": np.asarray(state[1], dtype=np.uint32)}, meta | {"np_rng_pos": int(state[2])}

    def context(self, z: np.ndarray) -> np.ndarray:
        """Context vectors ``[p, n_ctx, width]`` for candidates ``z [p, d]``."""
        return self.p0[None] + (z.astype(np.float32) @ self.A).reshape(len(z), *self.p0.shape)
