"""Fit speed on the reference task: a 16-shot, 8000-query CraFT fit, repeated, with the wall time split
between backend calls and everything else (CMA-ES, refiner, bookkeeping). Quotes medians.

    .venv/bin/python benchmarks/fit_speed.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from craft_adapter.reference.task import REFERENCE_VENDOR_DIR, reference_train
from craft_adapter.training.api import FitOutcome, fit_adapter, use_passive_omp_wait
from craft_adapter.training.config import FitConfig
from craft_adapter.training.soft_prompt import SoftPromptSearch

if TYPE_CHECKING:
    from craft_adapter.blackbox.query_cache import QueryCache
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

RESULTS = Path(__file__).resolve().parent / "results"


def timed_cma() -> dict[str, float]:
    """Wrap the CMA-ES calls to time them separately."""
    spent = {"cma": 0.0}
    for name in ("ask", "tell"):
        original = getattr(SoftPromptSearch, name)

        def wrapper(self, *a, _f=original, **k):
            t = time.perf_counter()
            try:
                return _f(self, *a, **k)
            finally:
                spent["cma"] += time.perf_counter() - t

        setattr(SoftPromptSearch, name, wrapper)
    return spent


def setup() -> tuple[argparse.Namespace, OpenClipBackend, FitConfig]:
    """``--repeats``/``--seed``, the reference vendor on the CPU, and the 16-shot 8000-query config."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    use_passive_omp_wait()  # before torch loads (measured: the reference fit runs 2.5x slower without it)
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    backend = OpenClipBackend(f"local-dir:{REFERENCE_VENDOR_DIR}", device="cpu")
    return args, backend, FitConfig(shots=16, seed=args.seed, budget=8000)


def reference_fit(backend: OpenClipBackend, cfg: FitConfig, cache: QueryCache | None = None) -> FitOutcome:
    """One fit on the reference task's few-shot set for ``cfg``, optionally through a query cache."""
    return fit_adapter(reference_train(cfg.shots, cfg.seed), backend, cfg, cache=cache)


def main() -> None:
    """Run the fits and print the split."""
    args, backend, cfg = setup()
    spent = timed_cma()
    runs = []
    for _ in range(args.repeats):
        spent["cma"] = 0.0
        rec = reference_fit(backend, cfg).record
        runs.append({"wall_s": rec.wall_time_s, "backend_s": rec.vendor_time_s, "cma_s": spent["cma"],
                     "queries": rec.meter["queries"]})
        print(f"fit: {rec.wall_time_s:.1f}s wall, backend {rec.vendor_time_s:.1f}s, CMA-ES {spent['cma']:.1f}s",
              flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "backend_s", "cma_s")}
    other = med["wall_s"] - med["backend_s"]
    print(f"median of {args.repeats}: wall {med['wall_s']:.1f}s; backend calls {med['backend_s']:.1f}s "
          f"({100 * med['backend_s'] / med['wall_s']:.1f}%); everything else {other:.1f}s "
          f"({100 * other / med['wall_s']:.1f}%), of which CMA-ES ask/tell {med['cma_s']:.1f}s "
          f"({100 * med['cma_s'] / med['wall_s']:.1f}%)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fit_speed.json").write_text(json.dumps({"runs": runs, "median": med,
                                                        "command": "python benchmarks/fit_speed.py"}, indent=1))


if __name__ == "__main__":
    main()
