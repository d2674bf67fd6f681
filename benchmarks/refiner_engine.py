"""Which engine runs a ``.safetensors`` adapter's refiner in the runtime: onnxruntime on written bytes, or numpy.

    .venv/bin/python benchmarks/refiner_engine.py [--reps 5000] [--out benchmarks/results/refiner_engine.json]

The runtime must load a ``.safetensors`` adapter without the ``onnx`` package (issue 12). Two ways do that:

- ``onnxruntime``: the session built from the bytes ``build_refiner_onnx`` now writes itself (no ``onnx``),
  through ``make_session`` (1 thread, as the runtime runs it);
- ``numpy``: the same work in numpy, ``x + fc2(relu(fc1(x)))`` and its softmax, weights pre-transposed
  once, BLAS on one thread like onnxruntime (the script re-runs itself with ``OPENBLAS_NUM_THREADS=1``).

Side by side in one process, for 10 and 1,000 classes (hidden 256) at batch 1 and 64, it times the median and p99
per call (the input already preprocessed, as both engines receive it) and the one-off cost of getting ready
(build + session, or transposing). It checks both against the previous engine (onnxruntime on the model
``onnx.helper`` built, when ``onnx`` is installed): the written bytes must be identical and every output within
1e-6. The runtime keeps whichever engine wins; the result is recorded in the JSON's ``verdict``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from craft_adapter.artifact.adapter_file import REFINER_KEYS, Adapter, refiner_input
from craft_adapter.artifact.onnx_graph import INPUT_NAME, OUTPUT_NAMES, build_refiner_onnx
from craft_adapter.artifact.synthetic import synthetic_adapter

# isort: split
from craft_adapter.serve.session import make_session

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark scripts
from runtime_overhead import time_us  # noqa: E402 (one timer for both refiner benchmarks)

ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TOLERANCE = 1e-6


class NumpyRefiner:
    """The refiner and its softmax in numpy, weights transposed once."""

    def __init__(self, adapter: Adapter) -> None:
        r = adapter.refiner
        self.w1t = np.ascontiguousarray(r[REFINER_KEYS[0]].T)
        self.b1 = r[REFINER_KEYS[1]]
        self.w2t = np.ascontiguousarray(r[REFINER_KEYS[2]].T)
        self.b2 = r[REFINER_KEYS[3]]

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Refined logits and probabilities for preprocessed scores ``x [n, c]``."""
        h = x @ self.w1t
        h += self.b1
        np.maximum(h, 0, out=h)
        refined = h @ self.w2t
        refined += self.b2
        refined += x
        z = refined - refined.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return refined, z


def helper_bytes(adapter: Adapter) -> bytes | None:
    """The refiner as the previous engine built it (``onnx.helper``), or None without ``onnx``."""
    try:
        sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "artifact"))
        from test_onnx_writer import helper_build  # the previous builder, kept in its test
    except ImportError:
        return None
    return helper_build(adapter)


def once_ms(fn: Callable[[], object], reps: int = 20) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples) * 1e3)


def run(reps: int) -> tuple[list[dict], list[dict]]:
    """Timing rows and parity rows for every (classes, batch)."""
    rows, parity = [], []
    for n_classes in (10, 1000):
        adapter = synthetic_adapter(n_classes, logit_kind="probabilities")
        written = build_refiner_onnx(adapter)
        previous = helper_bytes(adapter)
        session = make_session(written, "cpu")
        engine = NumpyRefiner(adapter)
        ready = {"onnxruntime": once_ms(lambda a=adapter: make_session(build_refiner_onnx(a), "cpu")),
                 "numpy": once_ms(lambda a=adapter: NumpyRefiner(a))}
        old_session = make_session(previous, "cpu") if previous is not None else None
        for batch in (1, 64):
            scores = np.random.default_rng(batch).dirichlet(np.ones(n_classes), size=batch).astype(np.float32)
            x = refiner_input(scores, adapter.logit_kind)
            calls = {"onnxruntime": lambda s=session, x=x: s.run(OUTPUT_NAMES, {INPUT_NAME: x}),
                     "numpy": lambda e=engine, x=x: e.run(x)}
            n = reps if batch == 1 else max(reps // 5, 200)
            for name, fn in calls.items():
                rows.append({"classes": n_classes, "batch": batch, "engine": name, "reps": n,
                             "ready_ms": ready[name], **time_us(fn, n)})
            if old_session is not None:
                ref = old_session.run(OUTPUT_NAMES, {INPUT_NAME: x})
                for name, fn in calls.items():
                    got = fn()
                    diff = max(float(np.max(np.abs(g - r))) for g, r in zip(got, ref, strict=True))
                    parity.append({"classes": n_classes, "batch": batch, "engine": name, "max_abs_diff": diff,
                                   "bytes_identical": written == previous})
    return rows, parity


def verdict(rows: list[dict], parity: list[dict]) -> dict:
    """Which engine wins: numpy only if it is at least as fast in every case and within tolerance."""
    def median(engine: str, c: int, b: int) -> float:
        return next(r["median_us"] for r in rows if (r["engine"], r["classes"], r["batch"]) == (engine, c, b))

    cases = sorted({(r["classes"], r["batch"]) for r in rows})
    ratios = {f"{c} classes, batch {b}": median("numpy", c, b) / median("onnxruntime", c, b) for c, b in cases}
    numpy_ok = all(p["max_abs_diff"] <= TOLERANCE for p in parity if p["engine"] == "numpy")
    keep = "numpy" if numpy_ok and all(v <= 1.0 for v in ratios.values()) else "onnxruntime"
    return {"keep": keep, "numpy_over_onnxruntime_median": ratios, "numpy_within_tolerance": numpy_ok,
            "why": "numpy must be as fast in every case and match within 1e-6 to replace onnxruntime, which also "
                   "runs the exported .onnx and the GPU build with the same numerics"}


def main() -> None:
    """Run, print, write JSON."""
    if any(os.environ.get(k) != v for k, v in ONE_THREAD.items()):  # BLAS reads these only at import
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ONE_THREAD})
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "refiner_engine.json")
    args = parser.parse_args()
    rows, parity = run(args.reps)
    print(f"{'classes':>7} {'batch':>5} {'engine':<12} {'median µs':>10} {'p99 µs':>8} {'ready ms':>9}")
    for r in rows:
        print(f"{r['classes']:>7} {r['batch']:>5} {r['engine']:<12} {r['median_us']:>10.1f} {r['p99_us']:>8.1f} "
              f"{r['ready_ms']:>9.2f}")
    for p in parity:
        print(f"parity {p['classes']} classes batch {p['batch']} {p['engine']}: max |diff| {p['max_abs_diff']:.2g}"
              f" (bytes identical: {p['bytes_identical']})")
    result = verdict(rows, parity)
    print(f"keep: {result['keep']}")
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "load_average": os.getloadavg(), "onnxruntime": ort.__version__, "numpy": np.__version__,
               "python": platform.python_version(), "threads": 1}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"verdict": result, "tolerance": TOLERANCE, "machine": machine, "rows": rows,
                                    "parity": parity}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
