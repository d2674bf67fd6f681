"""Aggregate the suite runs (benchmarks/results/suite/*.json): mean ± std per task and method, the mean over the
tuning tasks, the held-out task apart, one accuracy-against-spend plot per task, and issue 15's goals checked."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks.plots import mean_curve, save_accuracy_plot

HALF = "CraFT soft, 4,000 queries"
ORDER = ("zero-shot", "best hand-written template", "prompt only", "refiner only", "CraFT soft",
         "CraFT soft, its prompt alone", HALF, "CraFT text", "CraFT soft + embedding head", "CoOp", "linear probe")
REFERENCE_TASK = "fashion-catalogue"  # "on the reference vendor": the timing split is read from this task


def _ms(xs: list[float]) -> dict:
    return {"mean": 100 * statistics.mean(xs), "std": 100 * statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "runs": [round(100 * x, 2) for x in xs]}


def _reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first spend at which ``curve`` reaches ``target`` (None: never)."""
    return next((x for x, a in curve if a >= target - 1e-9), None)


def report(runs_dir: Path, out_dir: Path) -> dict:
    """Write suite_accuracy.json and the plots; print the tables and the goals."""
    recs = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*-s*.json"))]
    tasks = list(dict.fromkeys(r["task"] for r in recs))
    table: dict[str, dict] = {}
    goals: dict[str, dict] = {}
    for t in tasks:
        rs = [r for r in recs if r["task"] == t]
        methods = [m for m in ORDER if all(m in r["acc"] for r in rs)]
        table[t] = {"held_out": rs[0]["held_out"], "seeds": [r["seed"] for r in rs],
                    **{m: _ms([r["acc"][m] for r in rs]) for m in methods}}
        curves = {name: mean_curve([r["curves"][name] for r in rs]) for name in rs[0]["curves"]}
        zs = statistics.mean(r["acc"]["zero-shot"] for r in rs)
        # refiner only pays for its one fixed prompt once: against queries spent its curve is a vertical line
        soft_curves = {k: v for k, v in curves.items() if k not in ("CraFT text", "refiner only")}
        save_accuracy_plot(soft_curves, ("zero-shot", zs), "queries spent", f"{t}, 16 shots (mean of seeds)",
                           runs_dir / f"{t}.png")
        if "CraFT text" in curves:
            save_accuracy_plot({"CraFT text": curves["CraFT text"]}, ("zero-shot", zs), "vendor calls",
                               f"{t}, text mode (mean of seeds)", runs_dir / f"{t}-text.png")
        row = table[t]
        g: dict = {}
        if {"CraFT soft", "prompt only", "refiner only"} <= set(row):
            s = row["CraFT soft"]["mean"]
            g["soft >= prompt only"] = round(s - row["prompt only"]["mean"], 2)
            g["soft >= refiner only"] = round(s - row["refiner only"]["mean"], 2)
        if {"CraFT soft + embedding head", "linear probe"} <= set(row):
            g["head >= linear probe"] = round(row["CraFT soft + embedding head"]["mean"] - row["linear probe"]["mean"],
                                              2)
        loop_curve = curves.get("CraFT soft")  # the fit's current pair every 10 generations, mean over seeds
        if loop_curve and "CraFT soft" in row:
            final = row["CraFT soft"]["mean"] / 100
            g["queries to reach the 8,000-query accuracy"] = _reach(loop_curve, final)
            half = [a for x, a in loop_curve if x <= 4000][-1]
            g["accuracy at 4,000 queries minus the 8,000-query adapter's"] = round(100 * (half - final), 2)
        if {"CraFT soft", HALF} <= set(row):  # a whole fit on half the budget, its refit included
            g["a 4,000-query fit minus the 8,000-query fit"] = round(row[HALF]["mean"] - row["CraFT soft"]["mean"], 2)
        goals[t] = g
    out = {"tasks": table, "goals": goals, "means": {}, "timing": _timing(recs)}
    for label, held in (("tuning tasks", False), ("held-out task", True)):
        ts = [t for t in tasks if table[t]["held_out"] == held]
        if ts:
            common = [m for m in ORDER if all(m in table[t] for t in ts)]
            out["means"][label] = {"tasks": ts, **{m: round(statistics.mean(table[t][m]["mean"] for t in ts), 2)
                                                   for m in common}}
    _print(out)
    (out_dir / "suite_accuracy.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def _timing(recs: list[dict]) -> dict:
    """The CraFT soft fit's wall time split on the reference vendor's task: backend calls against the rest."""
    fits = [r["fits"]["CraFT soft"] for r in recs if r["task"] == REFERENCE_TASK and "CraFT soft" in r["fits"]]
    if not fits:
        return {}
    other = [1 - f["vendor_s"] / f["wall_s"] for f in fits]
    return {"task": REFERENCE_TASK, "median_wall_s": statistics.median(f["wall_s"] for f in fits),
            "median_other_share": statistics.median(other), "runs": [round(o, 3) for o in other]}


def _print(out: dict) -> None:
    for t, row in out["tasks"].items():
        print(f"\n{t}{' (held out)' if row['held_out'] else ''}, seeds {row['seeds']}")
        for m in ORDER:
            if m in row:
                print(f"  {m:30s} {row[m]['mean']:6.2f} ± {row[m]['std']:.2f}")
        print(f"  goals: {out['goals'][t]}")
    for label, m in out["means"].items():
        print(f"\nmean over {label} {m['tasks']}:")
        for k, v in m.items():
            if k != "tasks":
                print(f"  {k:30s} {v:6.2f}")
    if out["timing"]:
        tm = out["timing"]
        print(f"\nCraFT soft on {tm['task']}: median wall {tm['median_wall_s']:.1f}s, everything but backend calls "
              f"{100 * tm['median_other_share']:.1f}%")
