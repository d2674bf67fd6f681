"""Accuracy over the task suite (issue 15): every method, every task, 16 shots, seeds 1-3.

Rows: zero-shot, the best hand-written template (chosen on the few-shot set), prompt only, refiner only, CraFT soft,
CraFT soft on half the budget (does a fit get there in 4,000 queries?), CraFT text (through an in-process zero-shot
scoring vendor, 20,000 calls), CraFT soft with the embedding head, white-box CoOp and the white-box linear probe.
The other soft rows spend 8,000 queries. Each (task, seed) is written to
benchmarks/results/suite/<task>-s<seed>.json as it finishes, so runs can be split across processes and resumed;
``--report`` reads them all and writes benchmarks/results/suite_accuracy.json, one plot per task and the goals.

    .venv/bin/python -m benchmarks.suite_accuracy --tasks fashion-catalogue --seeds 1 2 3
    .venv/bin/python -m benchmarks.suite_accuracy --report
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from craft_adapter.training.api import use_passive_omp_wait

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "suite"
SOFT = {"prompt only": {"train_refiner": False}, "refiner only": {"train_prompt": False}, "CraFT soft": {},
        "CraFT soft, 4,000 queries": {"budget": 4000}}
TEXT_CALLS = 20_000


def hand_written(task, scorer, seed: int) -> dict:
    """The template a user would pick by hand: the best of ``task.templates()`` on the few-shot set."""
    from benchmarks.suite_runs import backend_for
    from craft_adapter.blackbox.box import BlackBox
    from craft_adapter.blackbox.meter import QueryMeter

    train = task.train(16, seed)
    templates = list(task.templates())
    box = BlackBox(backend_for(task), train.images, train.class_names, QueryMeter())
    best = int(np.argmax((box.logits_text(templates).argmax(-1) == train.labels).mean(-1)))
    return {"template": templates[best], "acc": scorer.acc(templates[best])}


def white_box(task, scorer, seed: int) -> dict:
    """CoOp and the linear probe, with gradients through the task's model (upper bounds no vendor allows)."""
    from benchmarks.suite_runs import backend_for
    from benchmarks.whitebox import coop, linear_probe, white_box_model

    backend, train = backend_for(task), task.train(16, seed)
    emb = backend.embed_images(train.images)
    white = white_box_model(f"local-dir:{task.vendor_dir}")
    return {"CoOp": coop(backend, white, train.images, train.labels, scorer.emb, scorer.y, train.class_names,
                         seed=seed),
            "linear probe": linear_probe(emb, train.labels, scorer.emb, scorer.y, len(train.class_names), seed=seed)}


def embedding_head(task, scorer, seed: int, adapter) -> float:
    """Test accuracy of CraFT soft with the embedding head, trained as ``fit --embedding-head`` trains it after the
    same loop (training/embedding_head.py: on every shot, under the learned prompt, no query), on this fit's
    adapter rather than on a second identical fit."""
    from benchmarks.suite_runs import backend_for
    from craft_adapter.artifact.adapter_file import refiner_input
    from craft_adapter.blackbox.box import BlackBox
    from craft_adapter.blackbox.meter import QueryMeter
    from craft_adapter.training.embedding_head import HEAD_KEEPS_REFINER, HeadData, train_head

    assert not HEAD_KEEPS_REFINER, "the head is measured on the learned prompt's logits, as the fit ships it"
    backend, train = backend_for(task), task.train(16, seed)
    box = BlackBox(backend, train.images, train.class_names, QueryMeter())
    x = refiner_input(box.logits_soft(adapter.ctx[None])[0], adapter.logit_kind)
    delta = train_head(None, HeadData(x, backend.embed_images(train.images), train.labels), adapter.logit_scale,
                       seed=seed)
    test = scorer.raw(adapter.ctx) + adapter.logit_scale * scorer.emb @ delta.T
    return float((test.argmax(1) == scorer.y).mean())


def one_seed(task, seed: int, only: list[str] | None = None, out: dict | None = None) -> dict:
    """Every row for one task and seed; with ``only``, just those fit rows, updated in ``out`` (an earlier record)."""
    from benchmarks.suite_runs import backend_for, run_fit, scorer_for
    from benchmarks.suite_scoring import InProcessZeroShot

    scorer = scorer_for(task)
    fits = [*SOFT.items(), ("CraFT text", {"prompt": "text", "budget": TEXT_CALLS})]
    if only is None:
        out = {"task": task.name, "seed": seed, "held_out": task.held_out, "acc": {}, "curves": {}, "fits": {}}
        out["acc"]["zero-shot"] = scorer.acc("a photo of a {}.")
        hand = hand_written(task, scorer, seed)
        out["acc"]["best hand-written template"], out["hand_template"] = hand["acc"], hand["template"]
    else:
        fits = [(name, over) for name, over in fits if name in only]
    keep = ("queries", "vendor_calls", "wall_s", "vendor_s", "holdout_acc", "prompt_acc", "template")
    for name, over in fits:
        vendor = InProcessZeroShot(backend_for(task)) if name == "CraFT text" else None
        r = run_fit(task, 16, seed, every=10 if name != "CraFT text" else 3, vendor=vendor, **over)
        out["acc"][name] = r["acc"]
        if name == "CraFT soft":
            out["acc"]["CraFT soft, its prompt alone"] = r["prompt_acc"]
            out["acc"]["CraFT soft + embedding head"] = embedding_head(task, scorer, seed, r["adapter"])
        out["curves"][name] = r["curve"]
        out["fits"][name] = {k: r[k] for k in keep}
        print(f"  {task.name} seed {seed} {name}: {100 * r['acc']:.2f}% ({r['wall_s']:.0f}s)", flush=True)
    if only is None:
        out["acc"].update(white_box(task, scorer, seed))
    return out


def _head() -> str:
    """The commit the code was run at (and "+dirty" if the tree had changes), for a rerun's record."""
    import subprocess

    git = ["git", "-C", str(RESULTS.parent)]
    sha = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return sha + ("+dirty" if dirty.stdout.strip() else "")


def main() -> None:
    """Run the asked tasks and seeds (each written as it ends), or report on every run written so far."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="*", default=None, help="default: the whole suite")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--report", action="store_true", help="only aggregate what is in benchmarks/results/suite/")
    ap.add_argument("--only", nargs="+", choices=[*SOFT, "CraFT text"], default=None,
                    help="rerun just these fit rows (CraFT soft brings its prompt-alone and head rows) into the "
                         "records already written; the other rows are kept as they were")
    args = ap.parse_args()
    if args.report:
        from benchmarks.suite_report import report

        report(RUNS, RESULTS)
        return
    use_passive_omp_wait()
    from benchmarks.suite import SUITE, task

    RUNS.mkdir(parents=True, exist_ok=True)
    for t in [task(n) for n in args.tasks] if args.tasks else SUITE:
        for seed in args.seeds:
            t0 = time.time()
            path = RUNS / f"{t.name}-s{seed}.json"
            if args.only:
                rec = one_seed(t, seed, args.only, json.loads(path.read_text()))
                rec.setdefault("reruns", []).append({"rows": args.only, "bench_s": time.time() - t0, "commit": _head()})
            else:
                rec = one_seed(t, seed)
                rec["bench_s"] = time.time() - t0
                rec["command"] = f"python -m benchmarks.suite_accuracy --tasks {t.name} --seeds {seed}"
            path.write_text(json.dumps(rec, indent=1) + "\n")
            print(f"{t.name} seed {seed}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in rec["acc"].items()),
                  flush=True)


if __name__ == "__main__":
    main()
