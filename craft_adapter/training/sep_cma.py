"""Separable CMA-ES (sep-CMA-ES, Ros & Hansen 2008) in a few vectorized numpy lines: the soft prompt's default search.

Why not the ``cma`` package: with a diagonal covariance the arithmetic of a generation at 512 dimensions and a
population of 40 is a few 20,000-element array operations, yet ``cma`` spends about 9.5 ms a generation in Python
bookkeeping around them (repairing and archiving each candidate one by one, per-candidate bound transforms), about
a tenth of a reference fit. Here a generation's ask and tell are a handful of whole-array operations.

The algorithm is the textbook one (Hansen, "The CMA Evolution Strategy: A Tutorial", with the separable learning
rates ``c1`` and ``cmu`` multiplied by ``(N + 2) / 3`` as in Ros & Hansen): log-linear positive recombination weights
over the best half, cumulative step-size adaptation, rank-one and rank-mu updates of the diagonal covariance.

Box bounds ``[-bound, bound]``: the search runs unconstrained (its "genotype") and every candidate is mirrored into
the box before it is scored (the "phenotype"): identity inside, reflected at each wall, periodic beyond. The update
uses the genotypes, so the adaptation never sees the fold; :meth:`SepCMA.tell` therefore takes the candidates of the
last :meth:`SepCMA.ask`.

Randomness comes only from the engine's own ``numpy.random.Generator`` (PCG64, seeded once), never numpy's global
RNG, so its whole state is the mean, step size, paths, covariance and that generator's state (:meth:`rng_state`).
"""

from __future__ import annotations

import json

import numpy as np


class SepCMA:
    """sep-CMA-ES minimising over ``N = len(x0)`` dimensions within ``[-bound, bound]`` (``bound`` None: unbounded).

    ``ask()`` gives ``[popsize, N]`` candidates; ``tell(z, fitness)`` takes them back with their fitness (lower is
    better). ``mean`` (the unconstrained mean), ``sigma`` and ``countiter`` are the state a checkpoint checks.
    """

    def __init__(self, x0: np.ndarray, sigma0: float, popsize: int, bound: float | None, seed: int) -> None:
        self.mean = np.array(x0, dtype=np.float64)  # [N]
        self.N = n = len(self.mean)
        self.popsize, self.sigma, self.bound, self.countiter = int(popsize), float(sigma0), bound, 0
        self.rng = np.random.default_rng(seed)
        self.mu = mu = self.popsize // 2
        w = np.log((self.popsize + 1) / 2) - np.log(np.arange(1, self.popsize + 1))  # [popsize], best first
        self.mueff = mueff = float(w[:mu].sum() ** 2 / (w[:mu] ** 2).sum())
        self.cc = (4 + mueff / n) / (n + 4 + 2 * mueff / n)
        sep = (n + 2) / 3  # Ros & Hansen: a diagonal has N parameters, not N^2/2, so it may learn faster
        self.c1 = min(1.0, sep * 2 / ((n + 1.3) ** 2 + mueff))
        self.cmu = min(1.0 - self.c1, sep * 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
        # active CMA (negative weights on the worse half, as the tutorial's defaults and cma's): scaled so the
        # covariance stays positive
        neg = w[mu:]
        mueff_neg = float(neg.sum() ** 2 / (neg ** 2).sum())
        alpha = min(1 + self.c1 / self.cmu, 1 + 2 * mueff_neg / (mueff + 2), (1 - self.c1 - self.cmu) / (n * self.cmu))
        self.weights = np.concatenate([w[:mu] / w[:mu].sum(), alpha * neg / -neg.sum()])  # [popsize]
        self.ps = np.zeros(n)  # step-size path (CSA)
        self.pc = np.zeros(n)  # covariance path
        self.diag_c = np.ones(n)  # the covariance's diagonal
        # step size: CSA below 300 dimensions, two-point adaptation (TPA) from 300 on, as cma chooses: CSA's path
        # needs about N generations to build up, which a fit of 200 generations in 512 dimensions never gives it
        self.tpa = n >= 300
        self.cs = (mueff + 2) / (n + mueff + 5)
        self.damps = 1 + 2 * max(0.0, np.sqrt((mueff - 1) / (n + 1)) - 1) + self.cs
        self.chi_n = np.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))  # E||N(0, I)||
        self.tpa_c, self.tpa_damp = 0.3, 0.7 + 2 * np.log(n) + 2 * np.log(max(1, self.popsize - n))
        self.tpa_s = 0.0  # TPA's smoothed rank signal
        self.shift: np.ndarray | None = None  # the last mean shift (TPA samples along it), in step units
        self._y: np.ndarray | None = None  # the last ask's steps [popsize, N], (x - mean) / sigma
        self._z: np.ndarray | None = None  # ... and the candidates it returned

    def ask(self) -> np.ndarray:
        """A generation of candidates ``[popsize, N]``, inside the box."""
        y = self.rng.standard_normal((self.popsize, self.N))
        if self.tpa and self.shift is not None:
            # the first two candidates: +- the last mean shift, as long (in the sample's own metric) as a draw
            length = np.sqrt(y[0] @ y[0]) / np.sqrt((self.shift ** 2 / self.diag_c).sum())
            y[0] = length * self.shift / np.sqrt(self.diag_c)  # undone by the scaling below
            y[1] = -y[0]
        y *= np.sqrt(self.diag_c)
        self._y = y
        x = self.mean + self.sigma * y
        self._z = x if self.bound is None else mirror_into_box(x, self.bound)
        return self._z

    def tell(self, z: np.ndarray, fitness: np.ndarray) -> None:
        """Update from the last :meth:`ask`'s candidates ``z`` and their ``fitness`` ``[popsize]``."""
        if self._y is None or self._z is None or (z is not self._z and not np.array_equal(z, self._z)):
            raise ValueError("tell() takes the candidates of the last ask(), once")
        fitness = np.asarray(fitness, dtype=np.float64)
        if fitness.shape != (self.popsize,):
            raise ValueError(f"expected {self.popsize} fitness values, got shape {fitness.shape}")
        ranked = self._y[np.argsort(fitness, kind="stable")]  # [popsize, N], best first
        paired = self.tpa and self.shift is not None
        self._y = self._z = None
        self.countiter += 1
        y_w = self.weights[: self.mu] @ ranked[: self.mu]  # [N]
        self.mean = self.mean + self.sigma * y_w
        self.ps = (1 - self.cs) * self.ps + np.sqrt(self.cs * (2 - self.cs) * self.mueff) * y_w / np.sqrt(self.diag_c)
        ps_norm = float(np.sqrt(self.ps @ self.ps))
        # stall the rank-one path while the step-size path is long (a fast sigma increase is under way); TPA has
        # no path, and never stalls it, as in cma
        hsig = self.tpa or ps_norm / np.sqrt(1 - (1 - self.cs) ** (2 * self.countiter)) / self.chi_n < 1.4 + 2 / (
            self.N + 1)
        self.pc = (1 - self.cc) * self.pc + hsig * np.sqrt(self.cc * (2 - self.cc) * self.mueff) * y_w
        w = self.weights.copy()  # a negative weight acts on a step rescaled to the length N (Mahalanobis)
        w[self.mu:] *= self.N / (ranked[self.mu:] ** 2 / self.diag_c).sum(1)
        keep = 1 - self.c1 - self.cmu * self.weights.sum() + (not hsig) * self.c1 * self.cc * (2 - self.cc)
        self.diag_c = keep * self.diag_c + self.c1 * self.pc ** 2 + self.cmu * (w @ ranked ** 2)
        if self.tpa:
            if paired:  # > 0: the step forward along the last shift ranked better than the step back
                signal = (np.sum(fitness < fitness[1]) - np.sum(fitness < fitness[0])) / (self.popsize - 1)
                self.tpa_s = (1 - self.tpa_c) * self.tpa_s + self.tpa_c * np.sign(signal) * np.sqrt(abs(signal))
                self.sigma = float(self.sigma * np.exp(self.tpa_s / self.tpa_damp))
            self.shift = y_w
        else:
            self.sigma = float(self.sigma * np.exp(self.cs / self.damps * (ps_norm / self.chi_n - 1)))

    def rng_state(self) -> str:
        """The generator's state as canonical JSON text (its integers are 128-bit: kept whole as text)."""
        return json.dumps(self.rng.bit_generator.state, sort_keys=True)


def mirror_into_box(x: np.ndarray, bound: float) -> np.ndarray:
    """``x`` reflected into ``[-bound, bound]``: identity inside, mirrored at the walls, with period ``4 * bound``."""
    out = np.abs(x) > bound
    if not out.any():  # the common case, and 50 times cheaper than folding every entry
        return x
    x = x.copy()
    t = np.mod(x[out] + bound, 4 * bound)  # [0, 4b): [0, 2b] is the box shifted, (2b, 4b) its mirror image
    x[out] = np.where(t > 2 * bound, 4 * bound - t, t) - bound
    return x
