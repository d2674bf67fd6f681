"""The runtime's own overhead per request, vendor call excluded, beside a direct numpy forward of the same refiner.

    .venv/bin/python benchmarks/runtime_overhead.py [--reps 5000] [--out benchmarks/results/runtime_overhead.json]

For 10 and 1000 classes (hidden 256) at batch 1 and 64, with vendor scores already in hand, it times:

- ``runtime``: ``AdapterRuntime.predict_scores(scores).labels``, everything the runtime does per request:
  shape and finiteness checks, ``refiner_input``, the refiner and softmax on onnxruntime (1 thread), argmax, labels;
- ``onnxruntime``: the session call alone;
- ``numpy refine``: ``Adapter.refine`` (``refiner_input`` and the MLP), the artifact's numpy reference forward;
- ``numpy same work``: ``Adapter.refine`` plus softmax, argmax and labels, i.e. the runtime's work in numpy.

Goal (issue 4): runtime median at batch 1 at most 15 µs at 10 classes and 40 µs at 1000 classes.
Synthetic adapters; timings in µs; the garbage collector is paused while timing. numpy's BLAS runs on one
thread, like onnxruntime (the script re-runs itself with ``OPENBLAS_NUM_THREADS=1``). Needs no torch.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from craft_adapter.artifact.adapter_file import Adapter
from craft_adapter.artifact.synthetic import synthetic_adapter

# isort: split
# (serve/ installs as craft_adapter.serve; ruff cannot place it, so it sorts apart)
from craft_adapter.artifact.onnx_graph import INPUT_NAME, OUTPUT_NAMES
from craft_adapter.serve import AdapterRuntime, load_runtime

GOALS_US = {10: 15.0, 1000: 40.0}
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def time_us(fn: Callable[[], object], reps: int, warmup: int = 200) -> dict[str, float]:
    """Median and p99 of ``reps`` timed calls, in microseconds."""
    for _ in range(warmup):
        fn()
    samples = np.empty(reps)
    gc.disable()
    try:
        for i in range(reps):
            t0 = time.perf_counter_ns()
            fn()
            samples[i] = time.perf_counter_ns() - t0
    finally:
        gc.enable()
    return {"median_us": float(np.median(samples) / 1e3), "p99_us": float(np.percentile(samples, 99) / 1e3)}


def numpy_same_work(adapter: Adapter, scores: np.ndarray) -> list[str]:
    """The runtime's per-request work in plain numpy."""
    refined = adapter.refine(scores)
    z = np.exp(refined - refined.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    return [adapter.class_names[i] for i in probs.argmax(axis=1)]


def scores_for(n_classes: int, batch: int) -> np.ndarray:
    """CLIP-like vendor probabilities ``[batch, n_classes]``."""
    logits = np.random.default_rng(batch).normal(20, 5, (batch, n_classes)).astype(np.float32)
    z = np.exp(logits - logits.max(1, keepdims=True))
    return (z / z.sum(1, keepdims=True)).astype(np.float32)


def time_methods(runtime: AdapterRuntime, adapter: Adapter, scores: np.ndarray,
                 reps: int) -> dict[str, dict[str, float]]:
    """Each method's timing on the same scores."""
    x = np.log(np.maximum(scores, np.float32(1e-12)))
    session = runtime.adapter.session
    methods = {
        "runtime": lambda: runtime.predict_scores(scores).labels,
        "onnxruntime": lambda: session.run(OUTPUT_NAMES, {INPUT_NAME: x}),
        "numpy refine": lambda: adapter.refine(scores),
        "numpy same work": lambda: numpy_same_work(adapter, scores),
    }
    return {name: time_us(fn, reps) for name, fn in methods.items()}


def run(reps: int, workdir: Path) -> list[dict]:
    """Every (classes, batch, method) timing."""
    rows = []
    for n_classes in (10, 1000):
        adapter = synthetic_adapter(n_classes, logit_kind="probabilities")
        runtime = load_runtime(adapter.save(workdir / f"adapter_{n_classes}.safetensors"), lambda i, p: None,
                               device="cpu")
        for batch in (1, 64):
            n = reps if batch == 1 else max(reps // 5, 200)
            for name, t in time_methods(runtime, adapter, scores_for(n_classes, batch), n).items():
                rows.append({"classes": n_classes, "batch": batch, "method": name, "reps": n, **t})
    return rows


def main() -> None:
    """Run, print a table, write JSON."""
    if any(os.environ.get(k) != v for k, v in ONE_THREAD.items()):  # BLAS reads these only at import
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ONE_THREAD})
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "runtime_overhead.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.reps, Path(tmp))
    table = Table(title="Runtime overhead per request, vendor call excluded (µs)")
    for col in ("classes", "batch", "method", "median", "p99", "goal (median)"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        goal = f"≤ {GOALS_US[r['classes']]:g}" if r["method"] == "runtime" and r["batch"] == 1 else ""
        table.add_row(str(r["classes"]), str(r["batch"]), r["method"], f"{r['median_us']:.1f}", f"{r['p99_us']:.1f}",
                      goal)
    Console().print(table)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "load_average": os.getloadavg(), "onnxruntime": ort.__version__, "numpy": np.__version__,
               "python": platform.python_version(), "numpy_blas_threads": 1, "onnxruntime_threads": 1}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"goals_median_batch1_us": GOALS_US, "machine": machine, "rows": rows},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
