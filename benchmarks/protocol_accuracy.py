"""The embedding route against the HF scoring route at equal budgets in vendor calls, reference task, 16 shots.

The reference vendor runs behind two real servers, each in its own process: the local Hugging Face zero-shot vendor
(``craft-adapter vendor``) and the OpenAI-compatible ``/embeddings`` loopback server (Infinity's shape, 32 images a
request). Rows, at each budget: text-mode CraFT through ``openai-embeddings`` (the embedding route: image embeddings
once, one text request per generation), text-mode CraFT through ``hf-zero-shot`` (one call per image and template),
and zero-shot (the hand template; no fit). Every adapter is evaluated through its own vendor by the runtime (what
ships), on a fixed random 2,000 of the 10,000 shifted test images (seed 0), to keep the HF route's evaluation (one
call per image) affordable.

The embedding fits also record a history: at fixed vendor-call counts, the test accuracy of the fit's current
prompt and refiner (the state after that many calls, before hold-out selection; scored from the test images'
embeddings, fetched once through the same kind of vendor). From it: the calls the embedding route needs to reach
the HF route's accuracy at its largest budget.

    .venv/bin/python benchmarks/protocol_accuracy.py                      # seeds 1-3 at 2,000 / 5,000 / 20,000
    .venv/bin/python benchmarks/protocol_accuracy.py --seed1-budgets 20000 --budgets 2000 5000   # the reduced grid
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from craft_adapter.reference.task import HAND_TEMPLATE, REFERENCE_VENDOR_DIR, reference_test, reference_train
from craft_adapter.training.api import fit_adapter, use_passive_omp_wait
from craft_adapter.training.config import FitConfig
from craft_adapter.vendors.registry import make_vendor

RESULTS = Path(__file__).resolve().parent / "results"
LADDER = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)  # history checkpoints, in vendor calls
ROUTES = {"embedding route (openai-embeddings)": "openai-embeddings", "HF scoring route (hf-zero-shot)": "hf-zero-shot"}


def serve_openai(port: int, device: str = "cpu") -> None:
    """Child process: the reference vendor behind the OpenAI-compatible embeddings server, until killed."""
    use_passive_omp_wait()
    from craft_adapter.testing.fake_embedding_servers import FakeEmbeddingServer
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    server = FakeEmbeddingServer("openai-embeddings", OpenClipBackend(f"local-dir:{REFERENCE_VENDOR_DIR}",
                                                                      device=device), port=port)
    print(f"serving at {server.url}", flush=True)
    server.serve_forever()


def start(kind: str, device: str = "cpu") -> tuple[subprocess.Popen, str]:
    """A vendor in its own process (the model on ``device``); its URL from the first line it prints."""
    cmd = ([sys.executable, "-m", "craft_adapter.cli", "vendor", "--port", "0", "--device", device] if kind == "hf"
           else [sys.executable, __file__, "--serve-openai", "--device", device])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, line.split(" at ")[1].strip()


class TestSubset:
    """A fixed random ``n`` of the shifted test images; the embedding route's image embeddings fetched once."""

    def __init__(self, n: int, seed: int = 0) -> None:
        test = reference_test()
        pick = np.sort(np.random.default_rng(seed).choice(len(test.labels), size=n, replace=False))
        self.images = [test.images[int(i)] for i in pick]
        self.labels = test.labels[pick]
        self.class_names = list(test.class_names)
        self._img: np.ndarray | None = None

    def history_accuracy(self, vendor, template: str, refiner, scale: float) -> float:
        """Accuracy of ``template`` + ``refiner`` on cosine logits from the embeddings vendor."""
        import torch

        if self._img is None:
            self._img = vendor.embed_images(self.images)
        txt = vendor.embed_texts([template.replace("{}", c) for c in self.class_names])
        with torch.no_grad():
            refined = refiner(torch.from_numpy((scale * self._img @ txt.T).astype(np.float32))).numpy()
        return float((refined.argmax(1) == self.labels).mean())


def evaluate(path: Path, protocol: str, url: str, test: TestSubset) -> dict:
    """The runtime's accuracy through the vendor (and the vendor calls it took)."""
    from craft_adapter.serve import load_runtime
    from craft_adapter.training.evaluate import evaluate_runtime

    vendor = make_vendor(protocol, url)
    ev = evaluate_runtime(load_runtime(path, vendor), test.images, test.labels, batch_size=256)
    return {"accuracy": ev.report()["adapted_accuracy"], "prompt_only": ev.report()["prompt_only_accuracy"]}


def run_fit(protocol: str, url: str, seed: int, budget: int, test: TestSubset, out: Path, history: bool) -> dict:
    """One text-mode fit through ``protocol`` at ``budget`` vendor calls; its test accuracy via the runtime."""
    import copy

    from craft_adapter.training.refiner import Refiner

    vendor = make_vendor(protocol, url)
    cfg = FitConfig(shots=16, seed=seed, prompt="text", budget=budget)
    todo, states = [c for c in LADDER if c <= budget], []

    def on_gen(s) -> None:  # the fit's state at each checkpoint, scored after the fit (its scale is known then)
        while todo and s.vendor_calls >= todo[0]:
            states.append((todo.pop(0), s.prompt, copy.deepcopy(s.refiner.state_dict())))

    t0 = time.perf_counter()
    res = fit_adapter(reference_train(16, seed), vendor, cfg, on_progress=on_gen if history else None)
    wall = time.perf_counter() - t0
    path = out / f"{protocol}-s{seed}-b{budget}.safetensors"
    res.adapter.save(path)
    a = res.adapter
    row = {"seed": seed, "budget": budget, "vendor_calls": a.fit["vendor_calls"],
           "client_requests": getattr(vendor, "calls", None), "generations": a.fit["generations"],
           "template": a.template, "logit_scale": a.logit_scale,
           "logit_scale_source": a.fit.get("logit_scale_source", "vendor"), "fit_s": round(wall, 1),
           **evaluate(path, protocol, url, test)}
    if history:
        probe = make_vendor(protocol, url)  # its own client: the fit's request count stays the fit's
        refiner = Refiner(len(a.class_names), cfg.hidden)
        curve = []
        for calls, template, state in states:
            refiner.load_state_dict(state)
            curve.append((calls, test.history_accuracy(probe, template, refiner, a.logit_scale)))
        row["history"] = curve
    print(f"  {protocol} seed {seed} budget {budget}: {100 * row['accuracy']:.2f}% ({row['vendor_calls']} calls, "
          f"{row['generations']} generations, fit {wall:.0f}s)", flush=True)
    return row


def zero_shot(url: str, protocol: str, test: TestSubset) -> float:
    """The hand template's accuracy through the vendor, sent as the runtime sends a prompt."""
    from craft_adapter.training.evaluate import prompt_scores

    scores = prompt_scores(make_vendor(protocol, url), test.class_names, HAND_TEMPLATE, test.images)
    return float((scores.argmax(1) == test.labels).mean())


def summarise(runs: list[dict]) -> dict:
    """Mean and std (in %) over seeds."""
    accs = [100 * r["accuracy"] for r in runs]
    return {"mean": round(statistics.mean(accs), 2), "std": round(statistics.stdev(accs), 2) if len(accs) > 1
            else None, "seeds": [r["seed"] for r in runs], "runs": [round(a, 2) for a in accs]}


def main() -> None:
    """Run the grid, write JSON and the plot."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve-openai", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--budgets", type=int, nargs="*", default=[2000, 5000, 20000])
    ap.add_argument("--seed1-budgets", type=int, nargs="*", default=[], help="budgets run with seed 1 only")
    ap.add_argument("--hf-budgets", type=int, nargs="*", default=[], help="HF route only, every seed")
    ap.add_argument("--hf-seed1-budgets", type=int, nargs="*", default=[], help="HF route only, seed 1")
    ap.add_argument("--embedding-budgets", type=int, nargs="*", default=[], help="embedding route only, every seed")
    ap.add_argument("--test-n", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=RESULTS / "protocol_accuracy.json")
    ap.add_argument("--device", default="cpu", help="where the vendors run their model (cpu or cuda)")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="instead of running: merge the runs of these result files (e.g. one per seed) into --out")
    args = ap.parse_args()
    if args.serve_openai:
        serve_openai(0, args.device)
        return
    if args.merge:
        merge(args)
        return
    use_passive_omp_wait()  # before torch loads
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill stops the vendor processes too (finally)
    t0 = time.time()
    procs = {kind: start(kind, args.device) for kind in ("hf", "openai")}
    urls = {"hf-zero-shot": procs["hf"][1], "openai-embeddings": procs["openai"][1]}
    both, hf = list(ROUTES.values()), ["hf-zero-shot"]
    plan = sorted({(p, seed, b) for b in args.budgets for seed in args.seeds for p in both}
                  | {(p, 1, b) for b in args.seed1_budgets for p in both}
                  | {(p, seed, b) for b in args.hf_budgets for seed in args.seeds for p in hf}
                  | {(p, 1, b) for b in args.hf_seed1_budgets for p in hf}
                  | {("openai-embeddings", seed, b) for b in args.embedding_budgets for seed in args.seeds},
                  key=lambda r: (r[1], r[2], r[0]))
    # seed by seed, so that what is written after each run (the file is rewritten every time) is a whole grid row
    try:
        test = TestSubset(args.test_n)
        zs = {p: zero_shot(url, p, test) for p, url in urls.items()}
        print(f"zero-shot on {args.test_n} test images: {zs}", flush=True)
        runs: dict[str, list[dict]] = {name: [] for name in ROUTES}
        names = {p: name for name, p in ROUTES.items()}
        longest = {s: max(b for p, s2, b in plan if s2 == s and p == "openai-embeddings") for _, s, _ in plan
                   if any(p == "openai-embeddings" and s2 == s for p, s2, _ in plan)}
        out = Path(tempfile.mkdtemp(prefix="protocol_accuracy_"))  # the adapters, evaluated from their files
        for protocol, seed, budget in plan:
            history = protocol == "openai-embeddings" and longest.get(seed) == budget  # each seed's longest fit
            runs[names[protocol]].append(run_fit(protocol, urls[protocol], seed, budget, test, out, history))
            result = report(runs, zs, plan, args, time.time() - t0)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
            if importlib.util.find_spec("matplotlib"):
                plot(result, args.out.with_suffix(".png"))
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(timeout=30)
    print(json.dumps(result["table"], indent=1))
    print(json.dumps(result["embedding_calls_to_reach_hf"], indent=1))


def merge(args: argparse.Namespace) -> None:
    """One result from several partial ones (each run once, e.g. one seed per process or machine)."""
    parts = [json.loads(p.read_text()) for p in args.merge]
    runs: dict[str, list[dict]] = {name: [] for name in ROUTES}
    plan: list[tuple[str, int, int]] = []
    for part in parts:
        for name in ROUTES:
            runs[name] += part["runs"][name]
        plan += [(ROUTES[name], r["seed"], r["budget"]) for name in ROUTES for r in part["runs"][name]]  # what ran
    zs = {p: a / 100 for p, a in parts[0]["table"]["zero-shot (hand template, no fit)"].items()}
    args.test_n = int(parts[0]["test_images"].split()[0])
    result = report(runs, zs, sorted(set(plan), key=lambda r: (r[1], r[2], r[0])), args,
                    sum(p["total_s"] for p in parts))
    result["merged_from"] = [p["command"] for p in parts]
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result["table"], indent=1))


def report(runs: dict[str, list[dict]], zs: dict[str, float], plan: list, args, total_s: float) -> dict:
    """The table (mean ± std per route and budget), the calls-to-reach figure, and every run."""
    table: dict[str, dict] = {}
    for name, rows in runs.items():
        table[name] = {str(b): summarise([r for r in rows if r["budget"] == b])
                       for b in sorted({r["budget"] for r in rows})}
    table["zero-shot (hand template, no fit)"] = {p: round(100 * a, 2) for p, a in zs.items()}
    hf_rows = runs["HF scoring route (hf-zero-shot)"]
    top = max((r["budget"] for r in hf_rows), default=None)
    target = statistics.mean(r["accuracy"] for r in hf_rows if r["budget"] == top) if hf_rows else float("nan")
    hist = [r for r in runs["embedding route (openai-embeddings)"] if "history" in r]  # each seed's longest fit
    seeds = sorted({r["seed"] for r in hist})
    curve: dict[int, list[float]] = {}
    for r in hist:
        for calls, acc in r["history"]:
            curve.setdefault(calls, []).append(acc)
    mean_curve = {c: statistics.mean(a) for c, a in sorted(curve.items()) if len(a) == len(seeds)}
    reach = next((c for c, a in mean_curve.items() if a >= target), None)
    return {
        "table": table,
        "embedding_calls_to_reach_hf": {
            "hf_budget": top, "hf_mean_accuracy": round(100 * target, 2),
            "hf_seeds": sorted({r["seed"] for r in hf_rows if r["budget"] == top}),
            "embedding_history_seeds": seeds,
            "embedding_history_mean": {str(c): round(100 * a, 2) for c, a in mean_curve.items()},
            "calls_to_reach": reach,
            "note": "first checkpoint at which the embedding fits' current prompt + refiner (mean over seeds, "
                    "before hold-out selection) reach the HF route's mean test accuracy at its largest budget"},
        "complete": sum(map(len, runs.values())) == len(plan), "runs": runs,
        "plan": [{"route": p, "seed": s, "budget": b} for p, s, b in plan],
        "test_images": f"{args.test_n} of the 10,000 shifted test images, drawn with numpy seed 0",
        "shots": 16, "command": "python benchmarks/protocol_accuracy.py " + " ".join(sys.argv[1:]),
        "total_s": round(total_s, 1),
    }


def plot(result: dict, path: Path) -> None:
    """Accuracy against budget (vendor calls, log scale): each route's mean ± std, the history, zero-shot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in ROUTES:
        rows = result["table"][name]
        if not rows:
            continue
        xs = [int(b) for b in rows]
        ax.errorbar(xs, [rows[b]["mean"] for b in rows], yerr=[rows[b]["std"] or 0 for b in rows], marker="o",
                    capsize=3, label=name)
    hist = result["embedding_calls_to_reach_hf"]["embedding_history_mean"]
    ax.plot([int(c) for c in hist], list(hist.values()), linestyle=":", marker=".",
            label="embedding route, state during the fit")
    zs = result["table"]["zero-shot (hand template, no fit)"]
    ax.axhline(zs["openai-embeddings"], color="grey", linestyle="--", label="zero-shot")
    ax.set_xscale("log")
    ax.set_xlabel("budget (vendor calls)")
    ax.set_ylabel(f"test accuracy (%), {result['test_images'].split(' of')[0]} shifted images")
    ax.set_title("Reference task, 16 shots: embedding vs scoring vendor")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
