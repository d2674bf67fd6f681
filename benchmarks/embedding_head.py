"""The embedding-access head (issue 15, part 4): accuracy against CraFT soft and the white-box linear probe, its
sensitivity to the L2 weight, and the adapter's size with and without it.

Accuracy: 16 shots, seeds 1-3, the default budget (8,000 queries), in-process open_clip on the reference vendor
(``--tasks`` adds the suite's tuning tasks; the held-out task is never run here). Per seed: CraFT soft (a plain
fit), then the same fit with ``embedding_head=True`` (replayed from a query cache: the loop is the same, only the
head is added after it) as shipped, and the white-box linear probe of ``benchmarks/whitebox.py`` on the same 16
shots. The variants retrain only the head, on the fit's own data rebuilt from the model (no refit): the head over
the loop's refiner (``keep_refiner=True``) and the L2 sweep of the shipped form.

Size: the adapter file (.safetensors) and its ONNX graph at 10 and 1,000 classes, refiner hidden 256, without a
head and with one of width 128 (the reference vendor), 512 (CLIP ViT-B/32, B/16) and 768 (ViT-L/14).

    .venv/bin/python benchmarks/embedding_head.py                 # reference task, about 10 minutes on 2 cores
    .venv/bin/python benchmarks/embedding_head.py --sizes-only    # the size table alone (printed), in seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from craft_adapter.artifact.onnx_graph import build_refiner_onnx
from craft_adapter.artifact.synthetic import synthetic_adapter
from craft_adapter.training.api import fit_adapter, use_passive_omp_wait
from craft_adapter.training.config import FitConfig
from craft_adapter.training.embedding_head import HEAD_KEEPS_REFINER, HEAD_L2, HEAD_STEPS, HeadData, train_head
from craft_adapter.training.evaluate import accuracy
from craft_adapter.vendors.replies import unit_rows

RESULTS = Path(__file__).resolve().parent / "results"
L2_SWEEP = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
WIDTHS = {"reference vendor": 128, "CLIP ViT-B": 512, "CLIP ViT-L": 768}


def sizes() -> list[dict[str, Any]]:
    """Bytes of the adapter file and its ONNX graph, per class count, without and with a head of each width."""
    rows = []
    for c in (10, 1000):
        base = dataclasses.replace(synthetic_adapter(c, logit_kind="logits"), fit={"config": {"embedding_head": True}})
        for name, d in {"no head": None, **WIDTHS}.items():
            a = base if d is None else dataclasses.replace(base, head=np.zeros((c, d), np.float32))
            rows.append({"classes": c, "head": name, "dim": d, "safetensors_bytes": len(a.to_bytes()),
                         "onnx_bytes": len(build_refiner_onnx(a))})
    return rows


def mean_std(xs: list[float]) -> dict[str, Any]:
    """Mean and sample std in percent, and the runs."""
    return {"mean": 100 * statistics.mean(xs), "std": 100 * statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "runs": [100 * x for x in xs]}


def task_data(name: str, seed: int) -> tuple[Any, Any, str]:
    """(train 16 shots, test set, vendor spec) of the reference task or a suite tuning task."""
    if name == "reference":
        from craft_adapter.reference.task import REFERENCE_VENDOR_DIR, reference_task

        train, test = reference_task(16, seed)
        return train, test, f"local-dir:{REFERENCE_VENDOR_DIR}"
    from benchmarks.suite.tasks import task

    t = task(name)
    if t.held_out:  # reported apart by the suite's own benchmark, never tuned or looked at here
        raise SystemExit(f"{name} is the held-out task; this benchmark never runs it")
    return t.train(16, seed), t.test(), t.vendor_spec


HEAD = "CraFT soft + head" + ("" if HEAD_KEEPS_REFINER else " (refiner dropped)")
OTHER = "CraFT soft + head" + (" (refiner dropped)" if HEAD_KEEPS_REFINER else " over the refiner")


def run_task(name: str, seeds: list[int], workdir: Path) -> dict[str, Any]:
    """One task: per seed a plain fit and the same fit with a head, scored with the linear probe, and the head's
    variants (its base, its L2 weight) on that fit's data."""
    from benchmarks.whitebox import linear_probe
    from craft_adapter.blackbox.query_cache import QueryCache
    from craft_adapter.training.refiner import Refiner
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    rows: dict[str, list[float]] = {"prompt zero-shot": [], "CraFT soft": [], HEAD: [], OTHER: [],
                                    "white-box linear probe": []}
    sweep: dict[str, list[float]] = {str(lam): [] for lam in L2_SWEEP}
    fits = []
    backend = test_emb = None
    for seed in seeds:
        train, test, spec = task_data(name, seed)
        if backend is None:
            backend = OpenClipBackend(spec, device="cpu")
            test_emb = unit_rows(backend.embed_images(test.images))  # [n, d]
        t0 = time.perf_counter()
        with QueryCache(workdir / f"{name}-{seed}.sqlite") as cache:
            plain = fit_adapter(train, backend, FitConfig(shots=16, seed=seed), cache=cache).adapter
            t1 = time.perf_counter()
            out = fit_adapter(train, backend, FitConfig(shots=16, seed=seed, embedding_head=True), cache=cache)
        a = out.adapter
        assert np.array_equal(a.ctx, plain.ctx), "the head changed the loop"
        w = unit_rows(backend.embed_soft(a.ctx[None], train.class_names)[0])  # [c, d], the learned prompt's
        raw = np.float32(a.logit_scale) * test_emb @ w.T  # [n, c], what the vendor answers the runtime
        rows["prompt zero-shot"].append(accuracy(raw, test.labels))
        rows["CraFT soft"].append(accuracy(plain.refine(raw), test.labels))
        rows[HEAD].append(accuracy(a.refine(raw, test_emb), test.labels))
        shots_emb = backend.embed_images(train.images)
        rows["white-box linear probe"].append(linear_probe(shots_emb, train.labels, backend.embed_images(test.images),
                                                           test.labels, len(train.class_names), seed=seed))
        e = unit_rows(shots_emb)
        data = HeadData((np.float32(a.logit_scale) * e @ w.T).astype(np.float32), e, train.labels)
        loop_refiner = Refiner.from_arrays(plain.refiner)
        base = plain.refine(raw) if HEAD_KEEPS_REFINER else raw
        other = train_head(None if HEAD_KEEPS_REFINER else loop_refiner, data, a.logit_scale, HEAD_L2, HEAD_STEPS)
        other_base = raw if HEAD_KEEPS_REFINER else plain.refine(raw)
        rows[OTHER].append(accuracy(other_base + np.float32(a.logit_scale) * test_emb @ other.T, test.labels))
        for lam in L2_SWEEP:
            delta = train_head(loop_refiner if HEAD_KEEPS_REFINER else None, data, a.logit_scale, lam, HEAD_STEPS)
            sweep[str(lam)].append(accuracy(base + np.float32(a.logit_scale) * test_emb @ delta.T, test.labels))
        fits.append({"seed": seed, "queries": out.record.meter["queries"], "vendor_calls": out.record.meter[
            "vendor_calls"], "plain_fit_s": round(t1 - t0, 1), "replayed_head_fit_s": round(
            time.perf_counter() - t1, 1), "head": a.fit["embedding_head"]})
        print(f"{name} seed {seed}: " + ", ".join(f"{k} {100 * v[-1]:.2f}" for k, v in rows.items()), flush=True)
    return {"table": {k: mean_std(v) for k, v in rows.items()},
            "l2_sweep": {k: mean_std(v) for k, v in sweep.items()}, "fits": fits}


def main() -> None:
    """Print and write benchmarks/results/embedding_head.json."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--tasks", nargs="+", default=["reference"], help="reference and/or suite tuning tasks")
    ap.add_argument("--sizes-only", action="store_true")
    args = ap.parse_args()
    use_passive_omp_wait()
    t0 = time.time()
    size_rows = sizes()
    print("| classes | head | .safetensors | .onnx |\n|---|---|---|---|")
    for r in size_rows:
        head = r["head"] if r["dim"] is None else f"{r['head']} (d={r['dim']})"
        print(f"| {r['classes']} | {head} | {r['safetensors_bytes'] / 1024:.1f} KiB | "
              f"{r['onnx_bytes'] / 1024:.1f} KiB |")
    out: dict[str, Any] = {"sizes": size_rows, "head_l2": HEAD_L2, "head_steps": HEAD_STEPS,
                           "head_keeps_refiner": HEAD_KEEPS_REFINER}
    if args.sizes_only:
        return
    with tempfile.TemporaryDirectory() as workdir:
        out["tasks"] = {name: run_task(name, args.seeds, Path(workdir)) for name in args.tasks}
    if len(args.tasks) > 1:
        out["mean_over_tasks"] = {k: statistics.mean(t["table"][k]["mean"] for t in out["tasks"].values())
                                  for k in next(iter(out["tasks"].values()))["table"]}
    for name, res in out["tasks"].items():
        print(f"\n| {name}: method (16 shots, budget 8000, seeds {args.seeds}) | accuracy % |\n|---|---|")
        for k, v in res["table"].items():
            print(f"| {k} | {v['mean']:.2f} ± {v['std']:.2f} |")
        print("\n| head L2 weight | accuracy % |\n|---|---|")
        for k, v in res["l2_sweep"].items():
            print(f"| {k}{' (default)' if float(k) == HEAD_L2 else ''} | {v['mean']:.2f} ± {v['std']:.2f} |")
    for k, v in out.get("mean_over_tasks", {}).items():
        print(f"mean over tasks, {k}: {v:.2f}")
    out["seeds"] = args.seeds
    out["command"] = "python benchmarks/embedding_head.py " + " ".join(sys.argv[1:])
    out["total_s"] = round(time.time() - t0, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "embedding_head.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS / 'embedding_head.json'} in {out['total_s']:.0f}s")


if __name__ == "__main__":
    main()
