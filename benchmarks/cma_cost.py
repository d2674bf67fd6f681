"""What one CMA-ES generation costs the fit: full covariance against separable (diagonal) CMA-ES, side by side.

Both run the fit's own search (SoftPromptSearch: 512 dimensions, population 40, box bounds), on one thread as in
the fit, on the same synthetic fitness, in alternating rounds so that machine noise hits both alike; medians of the
per-round ms/generation. Writes benchmarks/results/cma_cost.json.

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


def ms_per_generation(diagonal: bool, generations: int, seed: int) -> float:
    """Mean ms of ask + context + tell over ``generations`` generations of a fresh search."""
    search = SoftPromptSearch(np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32),
                              FitConfig(seed=seed, cma_diagonal=diagonal))
    target = np.random.default_rng(1).normal(size=search.A.shape[0])
    t0 = time.perf_counter()
    with one_thread():  # as in the fit (training/threads.py)
        for _ in range(generations):
            z = search.ask()
            search.context(z)
            search.tell(z, ((z - target) ** 2).sum(1))
    return 1000 * (time.perf_counter() - t0) / generations


def main() -> None:
    """Alternate full and separable rounds; print and write the medians and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--generations", type=int, default=100, help="per round (the reference fit runs about 200)")
    args = ap.parse_args()
    runs: dict[str, list[float]] = {"full": [], "separable": []}
    for r in range(args.rounds):
        for name, diag in (("full", False), ("separable", True)) if r % 2 == 0 else (("separable", True),
                                                                                     ("full", False)):
            runs[name].append(ms_per_generation(diag, args.generations, seed=r + 1))
    med = {k: statistics.median(v) for k, v in runs.items()}
    out = {"ms_per_generation_median": med, "ratio_full_over_separable": med["full"] / med["separable"],
           "runs": runs, "dimension": FitConfig().intrinsic_dim, "popsize": FitConfig().popsize,
           "command": "python -m benchmarks.cma_cost"}
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"full {med['full']:.2f} ms/gen, separable {med['separable']:.2f} ms/gen "
          f"({out['ratio_full_over_separable']:.1f}x); wrote {RESULTS}")


if __name__ == "__main__":
    main()
