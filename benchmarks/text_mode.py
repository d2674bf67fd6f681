"""Text mode against a string-only vendor: the local vendor over HTTP (Hugging Face protocol), 16 shots.

Every row gets the same budget in vendor calls. Rows: the best single hand-written template (chosen on the
training shots), an ensemble of the hand-written templates, text-mode prompt only, text-mode CraFT; soft-mode
CraFT (in-process, 8000 queries) is read from results/accuracy.json for reference. Test accuracy is measured
in-process on the same model, which gives the vendor's own scores without 10,000 HTTP calls per prompt.

    .venv/bin/python benchmarks/text_mode.py        # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from typing import TYPE_CHECKING

from benchmarks.plots import mean_curve, save_accuracy_plot
from craft_adapter.blackbox.box import BlackBox
from craft_adapter.blackbox.meter import QueryMeter
from craft_adapter.reference.task import REFERENCE_VENDOR_DIR, reference_test, reference_train
from craft_adapter.training.api import fit_adapter, use_passive_omp_wait
from craft_adapter.training.config import FitConfig

# isort: split
from craft_adapter.serve import HttpZeroShotVendor

if TYPE_CHECKING:
    from craft_adapter.training.loop import FitState

RESULTS = Path(__file__).resolve().parent / "results"
# What a user would try by hand: CLIP's own prompt-engineering templates that fit product photos.
HAND_TEMPLATES = [
    "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.", "a close-up photo of a {}.",
    "a bright photo of a {}.", "a dark photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of a {}.",
    "a cropped photo of a {}.", "a good photo of a {}.", "a product photo of a {}.",
]


def softmax(x: np.ndarray) -> np.ndarray:
    """Row softmax."""
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def start_vendor() -> tuple[subprocess.Popen, str]:
    """The local vendor in its own process (so it does not share the fit's interpreter)."""
    proc = subprocess.Popen([sys.executable, "-m", "craft_adapter.cli", "vendor", "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, line.split(" at ")[1].strip()


class TestSet:
    """Vendor probabilities for any template on the 10,000 shifted test images, computed in-process."""

    def __init__(self) -> None:
        from craft_adapter.vendors.open_clip_backend import OpenClipBackend

        backend = OpenClipBackend(f"local-dir:{REFERENCE_VENDOR_DIR}", device="cpu")
        test = reference_test()
        self.y = test.labels
        self.box = BlackBox(backend, test.images, test.class_names, QueryMeter())

    def probs(self, templates: list[str]) -> np.ndarray:
        """``[p, n, c]`` probabilities, as the vendor returns them."""
        return softmax(self.box.logits_text(templates))

    def acc(self, probs: np.ndarray) -> float:
        """Top-1 accuracy of ``[n, c]`` scores."""
        return float((probs.argmax(-1) == self.y).mean())


def run_fit(vendor_url: str, test: TestSet, seed: int, budget: int, concurrency: int, **over) -> dict:
    """One text-mode fit through HTTP; test accuracy and a curve against vendor calls."""
    import torch

    cfg = FitConfig(shots=16, seed=seed, prompt="text", budget=budget, concurrency=concurrency, **over)
    curve = []

    def on_gen(s: FitState) -> None:
        if s.generation % 3 == 1:
            p = test.probs([s.prompt])[0]
            with torch.no_grad():
                refined = s.refiner(torch.from_numpy(np.log(np.maximum(p, 1e-12)).astype(np.float32))).numpy()
            curve.append((s.vendor_calls, test.acc(refined if cfg.train_refiner else p)))

    t0 = time.perf_counter()
    res = fit_adapter(reference_train(16, seed), HttpZeroShotVendor(vendor_url), cfg, on_progress=on_gen)
    a = res.adapter
    p = test.probs([a.template])[0]
    return {"acc": test.acc(a.refine(p)), "template_acc": test.acc(p), "template": a.template,
            "vendor_calls": res.record.meter["vendor_calls"], "wall_s": time.perf_counter() - t0, "curve": curve}


def hand_written(vendor_url: str, test: TestSet, seed: int, concurrency: int) -> dict:
    """Choose the best hand template on the training shots (paying for it), and the ensemble."""
    train = reference_train(16, seed)
    meter = QueryMeter()
    box = BlackBox(HttpZeroShotVendor(vendor_url), train.images, train.class_names, meter, concurrency=concurrency)
    train_acc = (box.logits_text(HAND_TEMPLATES).argmax(-1) == train.labels).mean(-1)
    best = int(np.argmax(train_acc))
    probs = test.probs(HAND_TEMPLATES)
    return {"best": test.acc(probs[best]), "best_template": HAND_TEMPLATES[best],
            "ensemble": test.acc(probs.mean(0)), "calls": meter.vendor_calls,
            "oracle_best_on_test": max(test.acc(p) for p in probs)}


def main() -> None:
    """Run all rows, print the table, write JSON and the plot."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--budget", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--schedules", nargs="*", default=None, metavar="START:END",
                    help="instead: compare minibatch schedules (images per class, start:end) on the first seed")
    args = ap.parse_args()
    use_passive_omp_wait()  # before torch loads (measured: the reference fit runs 2.5x slower without it)
    t0 = time.time()
    proc, url = start_vendor()
    if args.schedules:
        try:
            schedule_study(url, args)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        return
    try:
        test = TestSet()
        rows: dict[str, list[float]] = {k: [] for k in (
            "best hand-written template", "ensemble of hand-written templates", "text-mode prompt only",
            "text-mode CraFT")}
        details = []
        for seed in args.seeds:
            h = hand_written(url, test, seed, args.concurrency)
            rows["best hand-written template"].append(h["best"])
            rows["ensemble of hand-written templates"].append(h["ensemble"])
            po = run_fit(url, test, seed, args.budget, args.concurrency, train_refiner=False)
            cr = run_fit(url, test, seed, args.budget, args.concurrency)
            rows["text-mode prompt only"].append(po["template_acc"])
            rows["text-mode CraFT"].append(cr["acc"])
            details.append({"seed": seed, "hand": h, "prompt_only": po, "craft": cr})
            print(f"seed {seed}: hand best {100 * h['best']:.2f} ({h['best_template']!r}), ensemble "
                  f"{100 * h['ensemble']:.2f}, text prompt only {100 * po['template_acc']:.2f} ({po['template']!r}),"
                  f" text CraFT {100 * cr['acc']:.2f} ({cr['vendor_calls']} calls, {cr['wall_s']:.0f}s)", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    table = {k: {"mean": 100 * statistics.mean(v), "std": 100 * statistics.stdev(v) if len(v) > 1 else 0.0,
                 "runs": [100 * x for x in v]} for k, v in rows.items()}
    soft = json.loads((RESULTS / "accuracy.json").read_text())["table_16_shot"]["CraFT"] \
        if (RESULTS / "accuracy.json").exists() else None
    print(f"\n| method (16 shots, {args.budget} vendor calls, seeds {args.seeds}) | accuracy % |\n|---|---|")
    for k, v in table.items():
        print(f"| {k} | {v['mean']:.2f} ± {v['std']:.2f} |")
    if soft:
        print(f"| soft-mode CraFT (in-process, 8000 queries) | {soft['mean']:.2f} ± {soft['std']:.2f} |")
    curve = mean_curve([d["craft"]["curve"] for d in details])
    final, start = curve[-1][1], curve[0][1]
    reach = next(c for c, a in curve if a - start >= 0.9 * (final - start))
    print(f"text-mode CraFT reaches 90% of its final gain at about {reach} vendor calls (of {args.budget})")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "text_mode.json").write_text(json.dumps({
        "table": table, "soft_mode_craft": soft, "curve_mean": curve, "calls_to_90pct_gain": reach,
        "details": details, "budget_vendor_calls": args.budget, "seeds": args.seeds,
        "command": "python benchmarks/text_mode.py", "total_s": time.time() - t0}, indent=1) + "\n")
    save_accuracy_plot({"text-mode CraFT": curve}, ("best hand-written", table["best hand-written template"]["mean"]
                                                    / 100), "vendor calls spent",
                       "Reference task via HF protocol, 16 shots", RESULTS / "text_mode_accuracy_vs_calls.png")


def schedule_study(url: str, args: argparse.Namespace) -> None:
    """Text-mode CraFT under several minibatch schedules, same seed and budget."""
    test, out = TestSet(), {}
    for sch in args.schedules:
        start, end = (int(v) for v in sch.split(":"))
        r = run_fit(url, test, args.seeds[0], args.budget, args.concurrency, minibatch_start=start, minibatch_end=end)
        out[sch] = {"acc": r["acc"], "template_acc": r["template_acc"], "vendor_calls": r["vendor_calls"],
                    "curve": r["curve"]}
        print(f"minibatch {sch}: CraFT {100 * r['acc']:.2f}, its template {100 * r['template_acc']:.2f}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "text_schedules.json").write_text(json.dumps(
        {"seed": args.seeds[0], "budget": args.budget, "schedules": out,
         "command": "python benchmarks/text_mode.py --schedules " + " ".join(args.schedules)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
