"""Shared by the suite benchmarks: one fit of a task, scored on the task's test set as it goes.

A task is anything with ``train(shots, seed)``, ``test()``, ``vendor_dir`` and ``name`` (benchmarks/suite). The
test set is scored through its own black box, on a meter apart from the fit's, so curves never touch the budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from craft_adapter.artifact.adapter_file import refiner_input
from craft_adapter.blackbox.box import BlackBox
from craft_adapter.blackbox.meter import QueryMeter
from craft_adapter.training.api import fit_adapter
from craft_adapter.training.config import FitConfig
from craft_adapter.training.evaluate import accuracy, zero_shot_probabilities

_BACKENDS: dict[str, Any] = {}
_SCORERS: dict[str, TestScorer] = {}


def backend_at(vendor_dir: Path) -> Any:
    """The in-process open_clip backend of the vendor in ``vendor_dir``, on the CPU (one per vendor per process)."""
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    spec = f"local-dir:{vendor_dir}"
    if spec not in _BACKENDS:
        _BACKENDS[spec] = OpenClipBackend(spec, device="cpu")
    return _BACKENDS[spec]


def backend_for(task: Any) -> Any:
    """The in-process backend of the task's vendor."""
    return backend_at(task.vendor_dir)


class TestScorer:
    """Scores a prompt (context or template), optionally refined, on a task's fixed test set."""

    def __init__(self, task: Any) -> None:
        backend = backend_for(task)
        test = task.test()
        self.y = test.labels
        self.class_names = list(test.class_names)
        self.box = BlackBox(backend, test.images, test.class_names, QueryMeter())
        self.emb = backend.embed_images(test.images)  # [n, d], for the white-box bounds and the head

    def raw(self, prompt: np.ndarray | str) -> np.ndarray:
        """Scores ``[n, c]`` of a context ``[n_ctx, width]`` or a template string."""
        if isinstance(prompt, str):
            return self.box.logits_text([prompt])[0]
        return self.box.logits_soft(prompt[None])[0]

    def acc(self, prompt: np.ndarray | str, refine=None) -> float:
        """Test accuracy of ``prompt``, refined by ``refine`` (scores -> scores) if given."""
        raw = self.raw(prompt)
        return accuracy(refine(raw) if refine else raw, self.y)


def scorer_for(task: Any) -> TestScorer:
    """One test scorer per task per process."""
    if task.name not in _SCORERS:
        _SCORERS[task.name] = TestScorer(task)
    return _SCORERS[task.name]


def run_fit(task: Any, shots: int, seed: int, every: int = 10, vendor: Any = None,
            probe: Callable[[Any], None] | None = None, **overrides: Any) -> dict:
    """One fit of ``task`` (against ``vendor``, default the in-process model); test accuracy of the adapter, of
    its prompt alone, and curves every ``every`` generations; ``probe(state)`` sees every generation. ``wall_s``
    leaves out the time spent in curves and probe."""
    import torch

    cfg = FitConfig(shots=shots, seed=seed, **overrides)
    scorer = scorer_for(task)
    curve: list[tuple[int, float]] = []
    prompt_curve: list[tuple[int, float]] = []

    spent = [0.0]  # seconds in this callback: inside the fit's wall time, so taken out of it below

    def on_gen(s) -> None:
        if probe is not None:
            t = time.perf_counter()
            probe(s)
            spent[0] += time.perf_counter() - t
        if every and (s.generation % every == 0 or s.generation == 1):
            t = time.perf_counter()

            def refine(x: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    return s.refiner(torch.from_numpy(x)).numpy()

            raw = as_vendor(scorer.raw(s.prompt))
            curve.append((s.queries if cfg.budget_unit == "queries" else s.vendor_calls,
                          accuracy(refine(refiner_input(raw, kind)), scorer.y)))
            prompt_curve.append((curve[-1][0], accuracy(raw, scorer.y)))
            spent[0] += time.perf_counter() - t

    backend = vendor or backend_for(task)
    kind = backend.capabilities.returns

    def as_vendor(logits: np.ndarray) -> np.ndarray:  # the test scores as this vendor returns them
        return zero_shot_probabilities(logits) if kind == "probabilities" else logits

    t0 = time.perf_counter()
    res = fit_adapter(task.train(shots, seed), backend, cfg, on_progress=on_gen)
    a, rec = res.adapter, res.record
    prompt = a.ctx if a.ctx is not None else a.template
    raw = as_vendor(scorer.raw(prompt))
    head = getattr(a, "head", None)
    out = {"acc": accuracy(a.refine(raw, scorer.emb) if head is not None else a.refine(raw), scorer.y),
           "prompt_acc": accuracy(raw, scorer.y), "template": a.template if a.ctx is None else None,
           "queries": rec.meter["queries"], "vendor_calls": rec.meter["vendor_calls"],
           "wall_s": rec.wall_time_s - spent[0], "vendor_s": rec.vendor_time_s, "bench_s": time.perf_counter() - t0,
           "holdout_acc": a.fit.get("holdout_acc"), "curve": curve, "prompt_curve": prompt_curve,
           "adapter": a}
    return out
