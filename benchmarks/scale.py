"""Scale benchmark (issue 17): soft-mode fits on the reference vendor at C classes, 16 shots, a reduced budget.

    .venv/bin/python benchmarks/scale.py [--classes 10 100 1000] [--budget 400] [--resume both|checkpoint|none]
    .venv/bin/python benchmarks/scale.py --prompt text --budget 3000 ...  # through the local vendor (own process)
    .venv/bin/python benchmarks/scale.py --merge A.json B.json          # rows of earlier runs, one exponent
    .venv/bin/python benchmarks/scale.py --probe ViT-B-16 text 4000 ... # peak RSS of one backend call, no fit

For each C a synthetic folder of C classes x 16 Fashion-MNIST training images, relabelled "class 0".."class C-1"
(the reference vendor never saw these names: this measures cost, not accuracy). Each fit runs the CLI in a child
(``benchmarks/kill_child.py``, which counts backend calls in a ledger), so its peak RSS comes from ``wait4``. Measured:
wall time per generation (the fit log's wall time / generations), peak RSS, query-cache bytes per query (soft
answers), and the resume time after a SIGKILL when the fit passes 90% of its budget: once from the checkpoint
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
CACHE = "craft-adapter-cache.sqlite"


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


def answer_bytes(cache: Path) -> tuple[int, int]:
    """(answers, bytes) of the prompt answers in the query cache: soft embeddings (one a candidate) or text scores
    (one a call); not the image embeddings."""
    with sqlite3.connect(cache) as db:
        n, size = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(value)), 0) FROM answers WHERE kind != 'image'"
                             ).fetchone()
    return int(n), int(size)


def steady_generation_s(times: Path) -> float | None:
    """Median seconds between the starts of successive ``embed_soft`` calls (a soft fit makes one a generation):
    a generation's time without the one-off start (image embedding), which wall / generations spreads over however
    many generations the budget allows. None for text fits (many calls a generation)."""
    starts = [float(t) for name, t in (line.split() for line in times.read_text().splitlines()) if name == "embed_soft"]
    return round(float(np.median(np.diff(starts))), 3) if len(starts) > 2 else None


def kill_point(log: dict, calls: int) -> tuple[int, int]:
    """(ledger count, generation): where the fit passes 90% of its budget, ``calls`` the uninterrupted fit's ledger.

    A text fit's budget is in calls, one ledger byte each. A soft fit's is in queries: its ledger holds the image
    calls, then one backend call a generation (hold-out checks reuse that generation's answer), so the kill lands
    as the call of the generation that crosses 90% starts."""
    if log["meter"]["unit"] == "vendor_calls":
        at = int(np.ceil(0.9 * calls))
        return at, next((h["generation"] for h in log["history"] if h["vendor_calls"] >= at), len(log["history"]))
    target = 0.9 * log["meter"]["budget"]
    gen = next(h["generation"] for h in log["history"] if h["queries"] >= target)
    return calls - len(log["history"]) + gen, gen


def start_vendor() -> tuple[subprocess.Popen, str]:
    """The local Hugging Face zero-shot vendor (the reference model) in its own process; its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "craft_adapter.cli", "vendor", "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    return proc, proc.stdout.readline().split(" at ")[1].strip()


def one(n_classes: int, budget: int, work: Path, resume: str, extra: list[str], every: int,
        vendor: str | None = None) -> dict:
    """Every figure for one class count; ``resume``: "both" (checkpoint and replay), "checkpoint" or "none"."""
    data = build_folder(work / f"data{n_classes}", n_classes)
    base = work / f"c{n_classes}"
    base.mkdir()
    out = base / "adapter.safetensors"
    mode = ["--prompt", "text", "--vendor", vendor] if vendor else []
    fit = ["fit", "-o", str(out), "--data", str(data), "--budget", str(budget), "--seed", "1",
           "--checkpoint-every", str(every), *mode, *extra]
    status, wall, rss = run(fit, base / "ledger", base / "fit.log")
    if status != 0:
        raise RuntimeError((base / "fit.log").read_text()[-2000:])
    log = json.loads(out.with_name(out.name + ".fitlog.json").read_text())
    gens, queries = len(log["history"]), log["meter"]["queries"]
    answers, size = answer_bytes(base / CACHE)
    row = {"classes": n_classes, "prompt": "text" if vendor else "soft", "images": n_classes * 16, "budget": budget,
           "budget_unit": log["meter"]["unit"], "queries": queries, "vendor_calls": log["meter"]["vendor_calls"],
           "generations": gens, "checkpoint_every": every,
           "fit_wall_s": round(wall, 2), "fit_wall_in_log_s": log["wall_time_s"],
           "outside_loop_s": round(wall - log["wall_time_s"], 2),  # start-up, decoding, image embedding, writing
           "s_per_generation": round(log["wall_time_s"] / gens, 3), "vendor_s": log["vendor_time_s"],
           "s_per_generation_steady": steady_generation_s(base / "ledger.times"),
           "peak_rss_mb": round(rss / 2**20, 1),  # the fit's process (a text fit's vendor runs in its own)
           "cache_bytes_per_query": round(size / queries),
           "cache_bytes_per_class_per_answer": round(size / max(1, answers) / n_classes, 1),
           "sha256": __import__("hashlib").sha256(out.read_bytes()).hexdigest()}
    if resume != "none":
        cut = work / f"c{n_classes}-kill"
        cut.mkdir()
        kout = cut / "adapter.safetensors"
        row["calls"] = (base / "ledger").stat().st_size
        row["kill_at_calls"], row["kill_in_generation"] = kill_point(log, row["calls"])
        run(fit[:1] + ["-o", str(kout)] + fit[3:], cut / "ledger", cut / "fit.log", kill_at=row["kill_at_calls"])
        ways = [("checkpoint", cut, [])]
        if resume == "both":
            replay = work / f"c{n_classes}-replay"
            shutil.copytree(cut, replay)
            ways.append(("replay", replay, ["--checkpoint-every", "0"]))
        for name, folder, more in ways:
            o = folder / "adapter.safetensors"
            # each resume on its own cache: the manifest names the killed fit's cache, which the other resume fills
            status, wall, rss = run(["fit", "-o", str(o), "--resume", "--cache", str(folder / CACHE), *more],
                                    folder / "ledger2", folder / "resume.log")
            same = status == 0 and __import__("hashlib").sha256(o.read_bytes()).hexdigest() == row["sha256"]
            row[f"resume_{name}_s"] = round(wall, 2)
            row[f"resume_{name}_share"] = round(wall / row["fit_wall_s"], 3)
            row[f"resume_{name}_identical"] = same
            row[f"resume_{name}_paid_calls"] = (folder / "ledger2").stat().st_size
    return row


def hwm() -> int:
    """This process's peak RSS so far (VmHWM), bytes."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


def probe_child(model: str, what: str, n: int) -> None:
    """(child) Load ``model`` (random weights for an architecture name) and run one backend call of ``n`` inputs.

    ``text``: one soft-prompt candidate over ``n`` class names (``n`` sequences, encoded ``text_chunk`` at a time);
    ``images``: ``n`` images (encoded ``image_chunk`` at a time). Both chunks are sized by the default memory budget
    (``--memory-budget-mb``, 512 MB). Prints the peak RSS after loading and the chunks; the parent reads the peak over
    the call by ``wait4``.
    """
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    b = OpenClipBackend(model, device="cpu", allow_random_init=True)
    loaded = hwm()
    if what == "text":
        b.embed_soft(b.soft_prompt_init("a photo of a")[None], [f"class {i}" for i in range(n)])
    else:
        b.embed_images([Image.new("RGB", (224, 224))] * n)
    print(json.dumps({"loaded_peak_rss_mb": round(loaded / 2**20, 1), "text_chunk": b.text_chunk,
                      "image_chunk": b.image_chunk}), flush=True)


def probe(model: str, what: str, n: int) -> dict:
    """Peak RSS of one backend call in a fresh child (see :func:`probe_child`)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--probe-child", model, what, str(n)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"probe {model} {what} {n} failed")
    return {"model": model, "call": what, "n": n, **json.loads(out.splitlines()[-1]),
            "peak_rss_mb": round(usage.ru_maxrss / 2**10, 1), "wall_s": round(time.perf_counter() - t0, 1)}


def report(rows: list[dict], result: dict, out: Path) -> None:
    """Fit the exponent over ``rows``, write ``out`` (JSON) and the plot beside it."""
    rows = sorted(rows, key=lambda r: (r.get("prompt", "soft"), r["classes"]))
    result["rows"] = rows
    modes = {m: [r for r in rows if r.get("prompt", "soft") == m] for m in ("soft", "text")}
    for m, mine in modes.items():
        if len({r["classes"] for r in mine}) < 2:
            continue
        for key in ("s_per_generation", "s_per_generation_steady"):
            if all(r.get(key) for r in mine):
                result[f"exponent_{key}_vs_classes_{m}"] = round(float(np.polyfit(
                    np.log([r["classes"] for r in mine]), np.log([r[key] for r in mine]), 1)[0]), 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        for m, mine in modes.items():
            if mine:
                c = [r["classes"] for r in mine]
                ax[0].loglog(c, [r["s_per_generation"] for r in mine], "o-", label=f"{m} mode")
                ax[1].semilogx(c, [r["peak_rss_mb"] for r in mine], "o-", label=f"{m} mode")
        ax[0].set(xlabel="classes", ylabel="s per generation")
        ax[1].set(xlabel="classes", ylabel="peak RSS of the fit process (MB)")
        ax[0].legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=100)
    except ImportError:
        pass
    print(f"wrote {out}")


def main() -> None:
    """Run the class counts (or merge earlier runs' rows, or probe a backend), write the JSON and the plot."""
    if sys.argv[1:2] == ["--probe-child"]:
        return probe_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--budget", type=int, default=400)
    ap.add_argument("--resume", choices=["both", "checkpoint", "none"], default="both",
                    help="after a kill at 90%% of the budget, resume from the checkpoint and by replay (both)")
    ap.add_argument("--prompt", choices=["soft", "text"], default="soft",
                    help="text: through the local zero-shot vendor in its own process (budget in calls)")
    ap.add_argument("--checkpoint-every", type=int, default=10, help="the fit's checkpoint interval (generations)")
    ap.add_argument("--merge", type=Path, nargs="+", help="no fits: merge the rows of these earlier outputs")
    ap.add_argument("--probe", nargs=3, action="append", metavar=("MODEL", "text|images", "N"),
                    help="no fits: peak RSS of one backend call of N inputs (repeatable)")
    ap.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[], help="more fit options (e.g. --model ...)")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "scale.json")
    args = ap.parse_args()
    command = "python benchmarks/scale.py " + " ".join(sys.argv[1:])
    if args.probe:
        probes = [probe(m, w, int(n)) for m, w, n in args.probe]
        args.out.write_text(json.dumps({"command": command, "probes": probes}, indent=1) + "\n")
        return print(f"wrote {args.out}")
    if args.merge:
        runs = [json.loads(p.read_text()) for p in args.merge]
        rows = [r for run in runs for r in run["rows"]]
        return report(rows, {"command": command, "merged": [run["command"] for run in runs]}, args.out)
    work = Path(tempfile.mkdtemp(prefix="scale-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill stops the vendor process too (finally)
    vendor = start_vendor() if args.prompt == "text" else None
    rows = []
    try:
        for c in args.classes:
            rows.append(one(c, args.budget, work, args.resume, args.fit_args, args.checkpoint_every,
                            vendor and vendor[1]))
            print(json.dumps(rows[-1]), flush=True)
            report(rows, {"command": command}, args.out)
    finally:
        if vendor is not None:
            vendor[0].terminate()
            vendor[0].wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)  # the folders, caches and adapters: 500 MB at 1,000 classes


if __name__ == "__main__":
    main()
