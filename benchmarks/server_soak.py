"""Long load run: ``craft-adapter serve`` (one worker) under 64 closed-loop clients for 10 minutes, on loopback.

    .venv/bin/python benchmarks/server_soak.py [--duration 600] [--clients 64] [--latency 0.02]
        [--profile-s 60] [--tree DIR] [--label NAME] [--out benchmarks/results/server_soak.json]

The stub vendor answers after ``--latency`` seconds; every answer is checked against the independently computed
refined label. Each second the server's RSS and CPU time (utime + stime from /proc/PID/stat) are sampled with
the count of answered requests. Reported: throughput, errors, the RSS slope in MB per minute (least squares
over the last 8 minutes, with the residuals' spread as the noise it must be read against), the server's CPU
time per request (over the whole run and over the last 8 minutes) and the 1-minute load average seen during
the run (the load driver and other work share the machine's cores; CPU time, unlike wall time, is measured on
the server process alone). With ``--profile-s`` py-spy samples the server for that long from the middle of
the run, and its stacks are summed by where the time is spent (:mod:`profile_summary`). ``--tree DIR`` runs
the server from another source tree (e.g. an older commit's, from ``git archive``) for side-by-side runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from profile_summary import summarize
from serve_common import closed_loop, make_adapter, sample_images, start_server, start_stub, stub_expected

SLOPE_WINDOW_S = 480.0


async def soak(args: argparse.Namespace, tmp: Path) -> dict:
    """The run; its figures."""
    adapter = make_adapter(tmp / "adapter.safetensors")
    images = sample_images(256, seed=1)
    want = [adapter.class_names[int(stub_expected(adapter, im).argmax())] for im in images]
    stub = start_stub(tmp / "stub.log", args.latency)
    server = None
    spy = None
    try:
        server = start_server(tmp / "adapter.safetensors", stub.url + "/", tmp / "server.log", "--workers", "1",
                              "--max-vendor-in-flight", str(args.clients), tree=args.tree)
        answered = [0]
        n_pools = -(-args.clients // 8)  # small pools, as in server_load.py
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
        pools = [httpx.AsyncClient(limits=limits, timeout=60) for _ in range(n_pools)]

        async def one(i: int) -> str:
            r = await pools[i % n_pools].post(server.url + "/v1/classify", content=images[i % len(images)],
                                              headers={"Content-Type": "image/png"})
            answered[0] += 1
            if r.status_code != 200:
                return f"http_{r.status_code}"
            return "ok" if r.json()["label"] == want[i % len(images)] else "wrong_answer"

        await closed_loop(args.clients, args.warmup, one)
        samples: list[tuple[float, float, float, int, float]] = []  # t, rss MB, server CPU s, answered, load
        t0 = time.monotonic()
        profile_at = args.duration / 2 - args.profile_s / 2

        def tick() -> None:
            nonlocal spy
            t = time.monotonic() - t0
            samples.append((t, server.rss_mb(), server.cpu_seconds(), answered[0], os.getloadavg()[0]))
            if args.profile_s > 0 and spy is None and t >= profile_at:
                spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                                        str(server.proc.pid), "--duration", str(int(args.profile_s)), "--format",
                                        "raw", "--threads", "--nonblocking", "-o", str(tmp / "profile.txt")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        tick()
        result = await closed_loop(args.clients, args.duration, one, on_tick=tick)
        tick()
        for p in pools:
            await p.aclose()
        if spy is not None:
            spy.wait(120)
    finally:
        if server is not None:
            server.stop()
        stub.stop()
    t, rss, cpu, n, load = (np.array(c) for c in zip(*samples, strict=True))
    late = t >= t[-1] - SLOPE_WINDOW_S
    fit = np.polyfit(t[late] / 60, rss[late], 1)
    residual = rss[late] - np.polyval(fit, t[late] / 60)
    s = result.summary()
    row = {"label": args.label, "tree": str(args.tree) if args.tree else None, "clients": args.clients,
           "duration_s": args.duration, "stub_latency_s": args.latency, **s,
           "cpu_ms_per_request": {"whole_run": 1000 * (cpu[-1] - cpu[0]) / max(n[-1] - n[0], 1),
                                  "last_8_min": 1000 * (cpu[-1] - cpu[late][0]) / max(n[-1] - n[late][0], 1)},
           "server_cpu_utilisation": float((cpu[-1] - cpu[0]) / (t[-1] - t[0])),
           "rss_mb": {"first": float(rss[0]), "last": float(rss[-1]), "peak": float(rss.max()),
                      "slope_mb_per_min_last_8_min": float(fit[0]), "residual_sd_mb": float(residual.std()),
                      "samples": [[round(a, 1), round(b, 2)] for a, b in zip(t[::10], rss[::10], strict=True)]},
           "load_avg_1min": {"min": float(load.min()), "median": float(np.median(load)), "max": float(load.max())}}
    if (tmp / "profile.txt").exists():
        row["profile"] = summarize(tmp / "profile.txt")
        if args.keep_profile:
            args.keep_profile.write_text((tmp / "profile.txt").read_text())
    return row


def main() -> None:
    """Parse flags, run, print and save."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.02, help="the stub vendor's latency in seconds")
    ap.add_argument("--profile-s", type=float, default=60.0, help="py-spy window from mid-run; 0: none")
    ap.add_argument("--keep-profile", type=Path, default=None, help="also save py-spy's raw stacks here")
    ap.add_argument("--tree", type=Path, default=None, help="run the server from this source tree")
    ap.add_argument("--label", default="current")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/server_soak.json"))
    args = ap.parse_args()
    if args.tree is not None:
        args.tree = args.tree.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        row = asyncio.run(soak(args, Path(tmp)))
    summary = {k: v for k, v in row.items() if k not in ("rss_mb", "profile")}
    print(json.dumps({**summary, "rss": {k: v for k, v in row["rss_mb"].items() if k != "samples"}}, indent=1))
    if "profile" in row:
        for name, share in row["profile"]["by_category"].items():
            print(f"  {share:6.1%}  {name}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpus": os.cpu_count(), "python": sys.version.split()[0], **row}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
