"""Refit and head variants side by side on the same CraFT soft fits (issue 15): the suite's tuning tasks only.

Each (task, seed) runs one soft fit at the defaults in force with the refit off (``refit_epochs=0``), then scores on
the task's test set, from the same chosen prompt and refiner:
- ``base``: the adapter as the loop chose it; ``identity``: its prompt alone;
- ``cont_lr{lr}_k{k}``: the chosen refiner trained ``k`` more epochs on every shot (held-out ones too) at ``lr``,
  the KL term on (what ``refit_epochs`` does, at the loop's learning rate);
- ``scratch_{all|12}_x{m}``: a fresh refiner trained ``m`` x (the chosen generation) epochs on every shot, or on the
  training shots only (a control: fixed logits without the held-out shots);
- ``head_l2_{lam}``: the embedding head at that penalty (training/embedding_head.py).
letters-stamp is refused: it is held out of all tuning. Results: benchmarks/results/refit_probe.json.

    .venv/bin/python -m benchmarks.refit_probe --tasks fashion-catalogue fashion-night --seeds 1 2 3
    .venv/bin/python -m benchmarks.refit_probe --report
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.suite import TUNING_TASKS
from craft_adapter.training.api import use_passive_omp_wait

RESULTS = Path(__file__).resolve().parent / "results" / "refit_probe.json"
TUNING = TUNING_TASKS  # never the held-out task


def one_fit(task_name: str, seed: int) -> dict:
    """Every variant's test accuracy for one fit."""
    import torch

    from benchmarks.suite import task as get_task
    from benchmarks.suite_runs import backend_for, scorer_for
    from craft_adapter.blackbox.box import BlackBox
    from craft_adapter.blackbox.meter import QueryMeter
    from craft_adapter.training.api import few_shot_set, fit_adapter
    from craft_adapter.training.config import FitConfig
    from craft_adapter.training.embedding_head import HeadData, train_head
    from craft_adapter.training.evaluate import accuracy
    from craft_adapter.training.image_sets import split_holdout
    from craft_adapter.training.refiner import Refiner, train_epoch
    from craft_adapter.vendors.replies import unit_rows

    t = get_task(task_name)
    if t.held_out:
        raise SystemExit(f"{task_name} is held out of all tuning")
    backend, scorer = backend_for(t), scorer_for(t)
    cfg = FitConfig(shots=16, seed=seed, refit_epochs=0)
    data = t.train(16, seed)
    t0 = time.time()
    a = fit_adapter(data, backend, cfg)
    adapter, hist = a.adapter, a.record.history
    fit_s = time.time() - t0
    train = few_shot_set(data, cfg, None, None)
    tr, ho = split_holdout(train.labels, cfg.n_holdout, seed)

    def logits(idx: np.ndarray) -> torch.Tensor:
        box = BlackBox(backend, [train.images[i] for i in idx], train.class_names, QueryMeter())
        return torch.from_numpy(box.logits_soft(adapter.ctx[None])[0])

    xtr, xho = logits(tr), logits(ho)
    ytr, yho = torch.from_numpy(train.labels[tr]), torch.from_numpy(train.labels[ho])
    xall, yall = torch.cat([xtr, xho]), torch.cat([ytr, yho])
    xte, yte = torch.from_numpy(scorer.raw(adapter.ctx)), scorer.y
    checks = [(h["generation"], h["holdout_acc"]) for h in hist if h["holdout_acc"] is not None]
    best_acc = max(c[1] for c in checks)
    sel_gen = max(g for g, acc in checks if acc == best_acc)
    if adapter.fit["holdout_acc"] > best_acc + 1e-9:  # the check after the loop chose the last pair
        sel_gen = adapter.fit["generations"]
    chosen = Refiner.from_arrays(adapter.refiner)

    def test(net) -> float:
        with torch.no_grad():
            return accuracy(net(xte).numpy(), yte)

    acc = {"base": test(chosen), "identity": accuracy(xte.numpy(), yte)}
    for lr in (1e-4, 1e-3):
        for k in (5, 20, 50, 100):
            net, g = copy.deepcopy(chosen), torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam(net.parameters(), lr=lr)
            for _ in range(k):
                train_epoch(net, opt, xall, yall, 1.0, 32, g)
            acc[f"cont_lr{lr:g}_k{k}"] = test(net)
    for name, (xx, yy) in {"all": (xall, yall), "12": (xtr, ytr)}.items():
        for mult in (1.0, 0.75):
            torch.manual_seed(seed)
            net, g = Refiner(xx.shape[1], 256), torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam(net.parameters(), lr=1e-4)
            for _ in range(max(1, int(sel_gen * mult))):
                train_epoch(net, opt, xx, yy, 1.0, 32, g)
            acc[f"scratch_{name}_x{mult}"] = test(net)
    emb = unit_rows(np.concatenate([backend.embed_images([train.images[i] for i in idx]) for idx in (tr, ho)]))
    head = HeadData(np.concatenate([xtr.numpy(), xho.numpy()]), emb, yall.numpy())
    for lam in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2):
        d = train_head(None, head, adapter.logit_scale, lam=lam, seed=seed)
        acc[f"head_l2_{lam:g}"] = accuracy(xte.numpy() + adapter.logit_scale * unit_rows(scorer.emb) @ d.T, yte)
    return {"task": task_name, "seed": seed, "fit_s": fit_s, "sel_gen": sel_gen,
            "generations": adapter.fit["generations"], "holdout_acc": adapter.fit["holdout_acc"], "acc": acc}


def report(runs: list[dict]) -> dict:
    """Mean test accuracy (%) of every variant per task, over tasks, and against ``base``."""
    tasks = sorted({r["task"] for r in runs})
    per = {k: {t: statistics.mean(100 * r["acc"][k] for r in runs if r["task"] == t) for t in tasks}
           for k in runs[0]["acc"]}
    base = statistics.mean(per["base"].values())
    return {k: {**v, "mean": statistics.mean(v.values()), "vs base": statistics.mean(v.values()) - base}
            for k, v in per.items()}


def main() -> None:
    """Run the asked fits (appended to the results as each ends), or print the report of those written."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TUNING))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": []}
    if not args.report:
        use_passive_omp_wait()
        for name in args.tasks:
            for seed in args.seeds:
                data["runs"].append(one_fit(name, seed))
                data["report"] = report(data["runs"])
                RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    for k, v in report(data["runs"]).items():
        print(f"{k:26s} " + " ".join(f"{t[:12]:>12s} {x:6.2f}" for t, x in v.items()))


if __name__ == "__main__":
    main()
