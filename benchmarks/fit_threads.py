"""The fit's wall-time split with its own arithmetic on one thread (training/threads.py) and without, side by side.

Reference soft fits at the default settings, alternating the two arms round by round so that the machine's load
hits both alike; the "without" arm swaps ``one_thread`` for a no-op. Prints and writes medians of the seconds spent
outside backend calls and their share of the wall time: benchmarks/results/fit_threads.json. With
``--fitness-threads``: the fitness's population pass on torch's threads (as fits run it) against on one thread, the
rest on one thread in both, with each adapter's hash (the two must be equal): fit_threads_fitness.json.

    .venv/bin/python -m benchmarks.fit_threads --rounds 3
    .venv/bin/python -m benchmarks.fit_threads --rounds 3 --fitness-threads
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path

from craft_adapter.training.api import use_passive_omp_wait

RESULTS = Path(__file__).resolve().parent / "results" / "fit_threads.json"


def split_of(outcome) -> dict:  # noqa: ANN001 (a FitOutcome)
    """A fit's wall time, backend time, the rest, its share, and the adapter's hash."""
    import hashlib

    rec = outcome.record
    return {"wall_s": rec.wall_time_s, "vendor_s": rec.vendor_time_s, "other_s": rec.wall_time_s - rec.vendor_time_s,
            "other_share": 1 - rec.vendor_time_s / rec.wall_time_s,
            "adapter_sha256": hashlib.sha256(outcome.adapter.to_bytes()).hexdigest()}


def alternate(arms: dict[str, Callable[[], dict]], rounds: int, path: Path, command: str, **extra: object) -> None:
    """Run every arm (a fit returning :func:`split_of`) once a round, the order reversed every other round so that
    the machine's load hits all alike; print, and write the medians and runs to ``path``."""
    names = list(arms)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for arm in (names if r % 2 == 0 else names[::-1]):
            runs[arm].append(arms[arm]())
            print(f"round {r + 1} {arm}: {runs[arm][-1]}", flush=True)
    med = {arm: {k: statistics.median(x[k] for x in rs) for k in ("wall_s", "vendor_s", "other_s", "other_share")}
           for arm, rs in runs.items()}
    out = {"median": med, "runs": runs, "load_average": os.getloadavg(), **extra, "command": command}
    path.write_text(json.dumps(out, indent=1) + "\n")
    for arm, m in med.items():
        print(f"{arm:16s} wall {m['wall_s']:.1f}s, outside backend calls {m['other_s']:.2f}s "
              f"({100 * m['other_share']:.1f}%)")


def one_fit(backend, data, cfg, single: bool, fitness_threads: bool = False) -> dict:
    """One fit's :func:`split_of`. ``single`` off: no ``one_thread`` at all; with ``fitness_threads``, ``single`` off
    keeps ``one_thread`` but runs the fitness on one thread too."""
    from craft_adapter.training import loop
    from craft_adapter.training.api import fit_adapter
    from craft_adapter.training.threads import one_thread, torch_threads

    if fitness_threads:
        loop.torch_threads = torch_threads if single else lambda n: contextlib.nullcontext()
    else:
        loop.one_thread = one_thread if single else contextlib.nullcontext
    try:
        return split_of(fit_adapter(data, backend, cfg))
    finally:
        loop.one_thread, loop.torch_threads = one_thread, torch_threads


def main() -> None:
    """Alternate the arms; print and write the medians."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fitness-threads", action="store_true", help="the fitness on torch's threads (as fits run) "
                    "against on one thread, the rest on one thread in both: fit_threads_fitness.json")
    args = ap.parse_args()
    use_passive_omp_wait()
    from craft_adapter.reference.task import REFERENCE_VENDOR_DIR, reference_train
    from craft_adapter.training.config import FitConfig
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    backend = OpenClipBackend(f"local-dir:{REFERENCE_VENDOR_DIR}", device="cpu")
    data, cfg = reference_train(16, 1), FitConfig(seed=1)
    names = ("fitness on torch's threads", "all on one thread") if args.fitness_threads else ("one thread",
                                                                                            "default threads")
    arms = {n: functools.partial(one_fit, backend, data, cfg, n == names[0], args.fitness_threads) for n in names}
    alternate(arms, args.rounds, RESULTS.with_name("fit_threads_fitness.json") if args.fitness_threads else RESULTS,
              f"python -m benchmarks.fit_threads --rounds {args.rounds}"
              + (" --fitness-threads" if args.fitness_threads else ""), config=cfg.to_dict())

if __name__ == "__main__":
    main()
