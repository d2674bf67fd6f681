"""Scale benchmark (issue 17): soft-mode fits on the reference vendor at C classes, 16 shots, a reduced budget.

    .venv/bin/python benchmarks/scale.py [--classes 10 100 1000] [--budget 400] [--no-resume]

For each C a synthetic folder of C classes x 16 Fashion-MNIST training images, relabelled "class 0".."class C-1"
(the reference vendor never saw these names: this measures cost, not accuracy). Each fit runs the CLI in a child
(``benchmarks/kill_child.py``, which counts backend calls in a ledger), so its peak RSS comes from ``wait4``. Measured:
wall time per generation (the fit log's wall time / generations), peak RSS, query-cache bytes per query (soft
answers), and, unless --no-resume, the resume time after a SIGKILL at 90% of the calls: once from the checkpoint
(default) and once by replay only (the same killed folder copied, resumed with --checkpoint-every 0). The exponent
of time per generation against C is fitted in log-log. Writes ``benchmarks/results/scale.json`` and ``scale.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CHILD = [sys.executable, str(BENCH / "kill_child.py")]


def build_folder(root: Path, n_classes: int, shots: int = 16) -> Path:
    """``n_classes`` x ``shots`` Fashion-MNIST training images in ``root/class i/``."""
    from craft_adapter.reference.task import load_fashion_mnist

    x, _ = load_fashion_mnist("train")
    rng = np.random.default_rng(0)
    picks = rng.choice(len(x), size=n_classes * shots, replace=False)
    for c in range(n_classes):
        d = root / f"class {c}"
        d.mkdir(parents=True)
        for j, i in enumerate(picks[c * shots:(c + 1) * shots]):
            Image.fromarray(x[i]).save(d / f"{j}.png")
    return root


def run(args: list[str], ledger: Path, log: Path, kill_at: int | None = None) -> tuple[int, float, int]:
    """Run the CLI in a child; (exit status, wall s, peak RSS bytes); SIGKILL once ``kill_at`` calls started."""
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        proc = subprocess.Popen([*CHILD, str(ledger), *args], stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        while kill_at is not None and proc.poll() is None:
            if ledger.exists() and ledger.stat().st_size >= kill_at:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        _, status, usage = os.wait4(proc.pid, 0)
    return status, time.perf_counter() - t0, usage.ru_maxrss * 1024


def soft_bytes(cache: Path) -> int:
    """Bytes of the soft-prompt answers in the query cache."""
    with sqlite3.connect(cache) as db:
        return int(db.execute("SELECT COALESCE(SUM(LENGTH(value)), 0) FROM answers WHERE kind LIKE 'soft%'")
                   .fetchone()[0])


def one(n_classes: int, budget: int, work: Path, resume: bool, extra: list[str]) -> dict:
    """Every figure for one class count."""
    data = build_folder(work / f"data{n_classes}", n_classes)
    base = work / f"c{n_classes}"
    base.mkdir()
    out = base / "adapter.safetensors"
    fit = ["fit", "-o", str(out), "--data", str(data), "--budget", str(budget), "--seed", "1", *extra]
    status, wall, rss = run(fit, base / "ledger", base / "fit.log")
    if status != 0:
        raise RuntimeError((base / "fit.log").read_text()[-2000:])
    log = json.loads(out.with_name(out.name + ".fitlog.json").read_text())
    gens, queries = len(log["history"]), log["meter"]["queries"]
    row = {"classes": n_classes, "images": n_classes * 16, "budget": budget, "queries": queries, "generations": gens,
           "fit_wall_s": round(wall, 2), "fit_wall_in_log_s": log["wall_time_s"],
           "s_per_generation": round(log["wall_time_s"] / gens, 3), "vendor_s": log["vendor_time_s"],
           "peak_rss_mb": round(rss / 2**20, 1),
           "cache_soft_bytes_per_query": round(soft_bytes(base / "craft-adapter-cache.sqlite") / queries),
           "sha256": __import__("hashlib").sha256(out.read_bytes()).hexdigest()}
    if resume:
        calls = (base / "ledger").stat().st_size
        cut = work / f"c{n_classes}-kill"
        cut.mkdir()
        kout = cut / "adapter.safetensors"
        run(fit[:1] + ["-o", str(kout)] + fit[3:], cut / "ledger", cut / "fit.log", kill_at=int(0.9 * calls))
        replay = work / f"c{n_classes}-replay"
        shutil.copytree(cut, replay)
        for name, folder, more in (("checkpoint", cut, []), ("replay", replay, ["--checkpoint-every", "0"])):
            o = folder / "adapter.safetensors"
            status, wall, rss = run(["fit", "-o", str(o), "--resume", *more], folder / "ledger2", folder / "resume.log")
            same = status == 0 and __import__("hashlib").sha256(o.read_bytes()).hexdigest() == row["sha256"]
            row[f"resume_{name}_s"] = round(wall, 2)
            row[f"resume_{name}_share"] = round(wall / row["fit_wall_s"], 3)
            row[f"resume_{name}_identical"] = same
        row["kill_at_calls"] = int(0.9 * calls)
    return row


def main() -> None:
    """Run the class counts, fit the exponent, write the JSON and the plot."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--budget", type=int, default=400)
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[], help="more fit options (e.g. --model ...)")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "scale.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scale-"))
    rows = []
    for c in args.classes:
        rows.append(one(c, args.budget, work, not args.no_resume, args.fit_args))
        print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]), "rows": rows}
    if len(rows) > 1:
        cs = np.log([r["classes"] for r in rows])
        result["exponent_s_per_generation_vs_classes"] = round(float(np.polyfit(
            cs, np.log([r["s_per_generation"] for r in rows]), 1)[0]), 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        c = [r["classes"] for r in rows]
        ax[0].loglog(c, [r["s_per_generation"] for r in rows], "o-")
        ax[0].set(xlabel="classes", ylabel="s per generation")
        ax[1].semilogx(c, [r["peak_rss_mb"] for r in rows], "o-")
        ax[1].set(xlabel="classes", ylabel="peak RSS (MB)")
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=100)
    except ImportError:
        pass
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
