"""Choose fit defaults on the suite's tuning tasks (never the held-out one): soft CraFT under named variants.

Each variant is a set of FitConfig overrides. For every tuning task and seed it records the adapter's test
accuracy, its prompt alone, and both along the fit; results are appended to benchmarks/results/suite_tuning.json
(one record per run, so a sweep can be run in pieces) and the per-variant means are printed.

    .venv/bin/python -m benchmarks.suite_tuning --variants base sep sep_kl --seeds 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from craft_adapter.training.api import use_passive_omp_wait
from craft_adapter.training.config import FitConfig

RESULTS = Path(__file__).resolve().parent / "results" / "suite_tuning.json"
VARIANTS: dict[str, dict] = {
    "base": {},
    "sep": {"cma_diagonal": True},
    "sep_kl": {"cma_diagonal": True, "kl_decay_n": 1},
    "sep_s05": {"cma_diagonal": True, "sigma": 0.5},
    "sep_kl_s05": {"cma_diagonal": True, "kl_decay_n": 1, "sigma": 0.5},
    "sep_kl_s025": {"cma_diagonal": True, "kl_decay_n": 1, "sigma": 0.25},
    "sep_kl_lr1e-4": {"cma_diagonal": True, "kl_decay_n": 1, "lr": 1e-4},
}  # weight averaging and the hold-out metric change no search: SelectionProbe replays them on each fit


class SelectionProbe:
    """Replays model selection offline: at every check (and at the last generation) it scores the current prompt
    with the live refiner and with running averages of its weights, on the held-out shots (accuracy, loss) and on
    the test set, so that selection rules and weight averaging are compared on one fit instead of one fit each."""

    def __init__(self, task, seed: int, cfg: FitConfig, decays: tuple[float, ...] = (0.9, 0.97),
                 shadows: dict[str, dict] | None = None) -> None:
        from benchmarks.suite_runs import backend_for, scorer_for
        from craft_adapter.blackbox.box import BlackBox
        from craft_adapter.blackbox.meter import QueryMeter
        from craft_adapter.training.image_sets import split_holdout

        train = task.train(cfg.shots, seed)
        tr, ho = split_holdout(train.labels, cfg.n_holdout, seed)
        self.hold = BlackBox(backend_for(task), [train.images[i] for i in ho], train.class_names, QueryMeter())
        self.train_box = BlackBox(backend_for(task), [train.images[i] for i in tr], train.class_names, QueryMeter())
        self.y_train = train.labels[tr]
        self.shadows = {k: Shadow(len(train.class_names), cfg, **v) for k, v in (shadows or SHADOWS).items()}
        self.y_hold, self.scorer, self.cfg = train.labels[ho], scorer_for(task), cfg
        self.avgs: dict[float, object] = dict.fromkeys(decays)
        self.checks: list[dict] = []

    def __call__(self, s) -> None:
        import copy

        import torch

        for d, avg in self.avgs.items():
            if avg is None:
                self.avgs[d] = copy.deepcopy(s.refiner)
            else:
                average_into(avg, s.refiner, d)
        w = self.cfg.kl_weight if s.queries < s.budget // self.cfg.kl_decay_n else 0.0  # as the loop (near enough)
        x_train = torch.from_numpy(self.train_box.logits_soft(np.asarray(s.prompt)[None])[0])
        for sh in self.shadows.values():
            sh.epoch(x_train, torch.from_numpy(self.y_train), w)
        last = s.budget - s.queries < self.cfg.popsize + 2
        if s.generation % self.cfg.eval_every and not last:
            return
        raw_h = self.hold.logits_soft(np.asarray(s.prompt)[None])[0]
        raw_t = self.scorer.raw(s.prompt)
        rec = {"generation": s.generation, "queries": s.queries,
               "prompt_test": float((raw_t.argmax(1) == self.scorer.y).mean())}
        nets = [("live", s.refiner), *((f"ema{d}", a) for d, a in self.avgs.items()),
                ("identity", lambda t: t), *((k, sh.net) for k, sh in self.shadows.items())]
        for name, net in nets:
            with torch.no_grad():
                out = net(torch.from_numpy(raw_h))
                loss = float(torch.nn.functional.cross_entropy(out, torch.from_numpy(self.y_hold)))
                test = net(torch.from_numpy(raw_t)).numpy()
            rec[name] = {"hold_acc": float((out.argmax(1).numpy() == self.y_hold).mean()), "hold_loss": loss,
                         "test": float((test.argmax(1) == self.scorer.y).mean())}
        self.checks.append(rec)


# Shadow refiners: trained beside the fit, each generation, on the fit's current prompt's training logits, with
# other settings; they do not steer the search (the live refiner does, through the KL term), so they approximate
# what those settings would give, at the cost of one fit.
SHADOWS: dict[str, dict] = {
    "lr3e-4": {"lr": 3e-4}, "lr1e-4": {"lr": 1e-4}, "wd0.1": {"weight_decay": 0.1}, "wd1": {"weight_decay": 1.0},
    "h32": {"hidden": 32}, "lr3e-4_wd0.1": {"lr": 3e-4, "weight_decay": 0.1},
}


class Shadow:
    """A refiner trained like the fit's (one epoch per generation, same loss), with other settings."""

    def __init__(self, n_classes: int, cfg: FitConfig, lr: float | None = None, weight_decay: float = 0.0,
                 hidden: int | None = None) -> None:
        import torch

        from craft_adapter.training.refiner import Refiner

        torch.manual_seed(cfg.seed)
        self.net = Refiner(n_classes, hidden or cfg.hidden)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=lr or cfg.lr, weight_decay=weight_decay)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.batch = cfg.refiner_batch

    def epoch(self, x, y, w: float) -> None:
        """One epoch on this generation's logits."""
        from craft_adapter.training.refiner import train_epoch

        train_epoch(self.net, self.opt, x, y, w, self.batch, self.gen)


def average_into(avg, live, decay: float) -> None:
    """``avg <- decay * avg + (1 - decay) * live``, parameter by parameter (an exponential moving average)."""
    import torch

    with torch.no_grad():
        for a, p in zip(avg.parameters(), live.parameters(), strict=True):
            a.mul_(decay).add_(p, alpha=1.0 - decay)


def selection_rules(checks: list[dict]) -> dict[str, float]:
    """Test accuracy each selection rule would ship: best hold-out accuracy or loss (ties: the later check, as
    the fit does), or the last generation; for the live refiner and each average."""
    out = {}
    for net in [k for k in checks[0] if isinstance(checks[0][k], dict)]:
        by_acc = max(range(len(checks)), key=lambda i: (checks[i][net]["hold_acc"], i))
        by_loss = min(range(len(checks)), key=lambda i: (checks[i][net]["hold_loss"], -i))
        out[f"{net}/acc"] = checks[by_acc][net]["test"]
        out[f"{net}/loss"] = checks[by_loss][net]["test"]
        out[f"{net}/last"] = checks[-1][net]["test"]
    return out


def load(path: Path = RESULTS) -> list[dict]:
    """Every run recorded so far."""
    return json.loads(path.read_text()) if path.exists() else []


def summary(runs: list[dict]) -> dict[str, dict]:
    """Per variant: mean test accuracy (adapter, prompt alone) over tasks and seeds, and per task."""
    out: dict[str, dict] = {}
    for v in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == v]
        tasks = sorted({r["task"] for r in rs})
        per = {t: statistics.mean(r["acc"] for r in rs if r["task"] == t) for t in tasks}
        rules = {k: statistics.mean(statistics.mean(r["rules"][k] for r in rs if r["task"] == t) for t in tasks)
                 for k in rs[0].get("rules", {})}
        out[v] = {"mean": statistics.mean(per.values()), "runs": len(rs), "per_task": per, "rules": rules,
                  "prompt_mean": statistics.mean(statistics.mean(r["prompt_acc"] for r in rs if r["task"] == t)
                                                 for t in tasks)}
    return out


def main() -> None:
    """Run the asked variants on the tuning tasks and append the runs."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--tasks", nargs="*", default=None, help="default: every tuning task")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    use_passive_omp_wait()
    from benchmarks.suite import SUITE, task
    from benchmarks.suite_runs import run_fit

    tasks = [task(n) for n in args.tasks] if args.tasks else [t for t in SUITE if not t.held_out]
    if any(t.held_out for t in tasks):
        raise SystemExit("the held-out task is never tuned on")
    runs = load(args.out)
    for v in args.variants:
        for t in tasks:
            for seed in args.seeds:
                probe = SelectionProbe(t, seed, FitConfig(shots=16, seed=seed, **VARIANTS[v]))
                r = run_fit(t, 16, seed, every=0, probe=probe, **VARIANTS[v])
                rec = {"variant": v, "overrides": VARIANTS[v], "task": t.name, "seed": seed,
                       "rules": selection_rules(probe.checks), "checks": probe.checks,
                       **{k: r[k] for k in ("acc", "prompt_acc", "queries", "wall_s", "vendor_s", "holdout_acc",
                                            )}}
                runs = [*load(args.out), rec]  # read again: another process may append to the same file
                args.out.write_text(json.dumps(runs, indent=0) + "\n")
                print(f"{v:16s} {t.name:18s} seed {seed}: {100 * r['acc']:.2f}% (prompt {100 * r['prompt_acc']:.2f}%)"
                      f" {r['wall_s']:.0f}s", flush=True)
    for v, s in summary(runs).items():
        per = "  ".join(f"{t} {100 * a:.2f}" for t, a in s["per_task"].items())
        print(f"{v:16s} mean {100 * s['mean']:.2f} (prompt {100 * s['prompt_mean']:.2f}; {s['runs']} runs)  {per}")
        print("    selection replayed: " + "  ".join(f"{k} {100 * a:.2f}" for k, a in s["rules"].items()))


if __name__ == "__main__":
    main()
