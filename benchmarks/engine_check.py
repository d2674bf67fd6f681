"""Accuracy gate for the numpy sep-CMA-ES engine: the suite's tuning tasks refit with it, against the cma engine.

Each (task, seed) fit runs with today's defaults (``cma_engine="numpy"``) and is compared with the stored per-seed
result of benchmarks/suite_accuracy.py (benchmarks/results/suite/<task>-s<seed>.json), made with the ``cma`` package
and otherwise the same code: "CraFT soft" for the full method, "prompt only" (``--what prompt``) for the search
alone. Records the test accuracy, wall and vendor seconds of each fit, one at a time. The held-out task
(letters-stamp) is never run. Writes benchmarks/results/engine_check.json after every fit (resumable). The stored
suite runs it compares with were those of commit 62f0f6f; the suite has since been rerun with the numpy engine and
the refit, so to rerun this gate, first check out benchmarks/results/suite/ from 62f0f6f.

    .venv/bin/python -m benchmarks.engine_check --seeds 1 2
    .venv/bin/python -m benchmarks.engine_check --seeds 1 2 --what prompt

``--split N``: instead, the reference fit's wall-time split (seed 1, defaults) with each engine, alternating the
engines round by round as benchmarks/fit_threads.py alternates its arms; medians of N rounds of the seconds spent
outside backend calls and their share, written to benchmarks/results/engine_split.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path

from benchmarks.suite import TUNING_TASKS
from craft_adapter.training.api import use_passive_omp_wait

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "engine_check.json"
TUNING = TUNING_TASKS  # never the held-out task
WHAT = {"craft": ("CraFT soft", {}), "prompt": ("prompt only", {"train_refiner": False})}


def split(rounds: int) -> None:
    """The reference fit's seconds outside backend calls, numpy engine against cma, alternating; print and write."""
    from benchmarks.fit_threads import alternate, split_of
    from craft_adapter.reference.task import REFERENCE_VENDOR_DIR, reference_train
    from craft_adapter.training.api import fit_adapter
    from craft_adapter.training.config import FitConfig
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    backend = OpenClipBackend(f"local-dir:{REFERENCE_VENDOR_DIR}", device="cpu")
    data = reference_train(16, 1)
    def fit_with(engine: str) -> dict:
        return split_of(fit_adapter(data, backend, FitConfig(seed=1, cma_engine=engine)))

    arms = {e: functools.partial(fit_with, e) for e in ("numpy", "cma")}
    alternate(arms, rounds, RESULTS / "engine_split.json", f"python -m benchmarks.engine_check --split {rounds}")


def main() -> None:
    """Fit each asked (task, seed) with the numpy engine; print and write the comparison with the stored cma runs."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="*", default=list(TUNING), choices=TUNING)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--what", choices=sorted(WHAT), default="craft")
    ap.add_argument("--split", type=int, default=0, metavar="ROUNDS", help="measure the reference fit's split")
    args = ap.parse_args()
    use_passive_omp_wait()
    if args.split:
        split(args.split)
        return
    from benchmarks.suite import task
    from benchmarks.suite_runs import run_fit

    row, overrides = WHAT[args.what]
    out = json.loads(OUT.read_text()) if OUT.is_file() else {}
    runs = out.setdefault(row, {})
    for name in args.tasks:
        for seed in args.seeds:
            key = f"{name}-s{seed}"
            if key in runs:
                continue
            stored = json.loads((RESULTS / "suite" / f"{key}.json").read_text())
            r = run_fit(task(name), 16, seed, every=0, cma_engine="numpy", **overrides)
            runs[key] = {"numpy": r["acc"], "cma": stored["acc"][row], "wall_s": r["wall_s"],
                         "vendor_s": r["vendor_s"], "cma_wall_s": stored["fits"][row]["wall_s"],
                         "cma_vendor_s": stored["fits"][row]["vendor_s"]}
            print(f"{row} {key}: numpy {100 * r['acc']:.2f}  cma {100 * runs[key]['cma']:.2f}  "
                  f"wall {r['wall_s']:.1f}s vendor {r['vendor_s']:.1f}s", flush=True)
            out[f"{row}: mean"] = {k: statistics.mean(v[k] for v in runs.values()) for k in ("numpy", "cma")}
            out[f"{row}: mean"]["fits"] = len(runs)
            out["command"] = "python -m benchmarks.engine_check --seeds 1 2 [--what prompt]"
            OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out.get(f"{row}: mean"), indent=1))


if __name__ == "__main__":
    main()
