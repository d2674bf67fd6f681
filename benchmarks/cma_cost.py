"""What one CMA-ES generation costs the fit, engine by engine, side by side: the ``cma`` package with full covariance
and separable (diagonal), and our numpy separable CMA-ES (training/sep_cma.py, the default).

All run the fit's own search (SoftPromptSearch: 512 dimensions, population 40, box bounds), on one thread as in
the fit, on the same synthetic fitness, in rounds whose engine order rotates so that machine noise hits all alike;
medians of the per-round ms/generation, and the fitness each reached (same budget of generations).
Writes benchmarks/results/cma_cost.json.

    .venv/bin/python -m benchmarks.cma_cost
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from craft_adapter.training.config import FitConfig
from craft_adapter.training.soft_prompt import SoftPromptSearch
from craft_adapter.training.threads import one_thread

RESULTS = Path(__file__).resolve().parent / "results" / "cma_cost.json"


ENGINES = {"full": {"cma_engine": "cma", "cma_diagonal": False}, "separable": {"cma_engine": "cma"},
           "numpy": {"cma_engine": "numpy"}}


def ms_per_generation(engine: str, generations: int, seed: int) -> tuple[float, float]:
    """Mean ms of ask + context + tell over ``generations`` generations of a fresh search; the last best fitness."""
    search = SoftPromptSearch(np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32),
                              FitConfig(seed=seed, **ENGINES[engine]))
    target = np.random.default_rng(1).normal(size=search.A.shape[0])
    t0 = time.perf_counter()
    with one_thread():  # as in the fit (training/threads.py)
        for _ in range(generations):
            z = search.ask()
            search.context(z)
            fitness = ((z - target) ** 2).sum(1)
            search.tell(z, fitness)
    return 1000 * (time.perf_counter() - t0) / generations, float(fitness.min())


def main() -> None:
    """Rotate the engines' order round by round; print and write the medians and ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--generations", type=int, default=100, help="per round (the reference fit runs about 200)")
    args = ap.parse_args()
    names = list(ENGINES)
    runs: dict[str, list[float]] = {k: [] for k in names}
    reached: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:
            ms, best = ms_per_generation(name, args.generations, seed=r + 1)
            runs[name].append(ms)
            reached[name].append(best)
    med = {k: statistics.median(v) for k, v in runs.items()}
    out = {"ms_per_generation_median": med, "ratio_full_over_separable": med["full"] / med["separable"],
           "ratio_separable_over_numpy": med["separable"] / med["numpy"],
           "best_fitness_median": {k: statistics.median(v) for k, v in reached.items()}, "runs": runs,
           "dimension": FitConfig().intrinsic_dim, "popsize": FitConfig().popsize,
           "generations": args.generations, "command": "python -m benchmarks.cma_cost"}
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(", ".join(f"{k} {v:.3f} ms/gen" for k, v in med.items())
          + f" (cma separable / numpy {out['ratio_separable_over_numpy']:.1f}x); wrote {RESULTS}")


if __name__ == "__main__":
    main()
