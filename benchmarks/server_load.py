"""Load benchmark: the adapter server under 64 concurrent clients, beside calling the vendor directly.

    .venv/bin/python benchmarks/server_load.py [--duration 60] [--clients 64] [--stub-latency 0.02]
        [--vendors stub,reference] [--workers 1] [--out benchmarks/results/server_load.json]

For each vendor (a stub of configurable latency; the local open_clip reference vendor), on loopback:

1. ``direct``: ``clients`` closed-loop clients POST the vendor the very request the server sends (the
   adapter's labels and learned prompt, base64 PNG) for ``--direct-duration`` seconds (default: --duration);
2. ``server``: the same clients POST the PNG bytes to the server's ``/v1/classify`` for ``--duration`` seconds,
   while the server's resident memory is sampled every second.

It reports throughput, p50/p90/p99 latency, errors, the server's added latency (server minus direct, at p50
and p99) and memory over the run (first and last sample, peak, growth per minute). With the stub, every answer
is also checked against the independently computed refined label. A last one-client run of
``--light-duration`` seconds per side gives the server's added latency without CPU queueing. The load driver
(httpx, asyncio), the vendor and the server all share this machine's cores, so the figures are a floor for a
real deployment; CPU time per request is reported for each process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from serve_common import (
    Proc,
    closed_loop,
    make_adapter,
    sample_images,
    self_cpu_seconds,
    start_reference_vendor,
    start_server,
    start_stub,
    stub_expected,
)

from craft_adapter.reference.task import REFERENCE_VENDOR_DIR


async def run_vendor(kind: str, args: argparse.Namespace, tmp: Path) -> dict:
    """Both phases against one vendor; the figures as a dict."""
    adapter_path = tmp / "adapter.safetensors"
    adapter = make_adapter(adapter_path)
    images = sample_images(256, seed=1)
    vendor = start_stub(tmp / f"{kind}-vendor.log", args.stub_latency) if kind == "stub" else \
        start_reference_vendor(tmp / f"{kind}-vendor.log", f"local-dir:{REFERENCE_VENDOR_DIR}")
    server: Proc | None = None
    try:
        server = start_server(adapter_path, vendor.url + "/", tmp / f"{kind}-server.log", "--workers",
                              str(args.workers), "--max-vendor-in-flight", str(args.clients),
                              *(["--port", str(args.port)] if args.workers > 1 else []))
        want = [adapter.class_names[int(stub_expected(adapter, im).argmax())] for im in images] \
            if kind == "stub" else None
        bodies = [json.dumps({"inputs": base64.b64encode(im).decode(), "parameters": {
            "candidate_labels": adapter.class_names, "hypothesis_template": adapter.template}}).encode()
            for im in images]
        # small pools, one per 8 clients: httpcore's per-request pool work grows with the pool's size
        n_pools = -(-args.clients // 8)
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
        async with contextlib.AsyncExitStack() as stack:
            pools = [await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=60))
                     for _ in range(n_pools)]

            async def direct(i: int) -> str:
                r = await pools[i % n_pools].post(vendor.url + "/", content=bodies[i % len(bodies)],
                                    headers={"Content-Type": "application/json"})
                return "ok" if r.status_code == 200 and len(r.json()) == len(adapter.class_names) \
                    else f"http_{r.status_code}"

            async def through_server(i: int) -> str:
                r = await pools[i % n_pools].post(server.url + "/v1/classify", content=images[i % len(images)],
                                    headers={"Content-Type": "image/png"})
                if r.status_code != 200:
                    return f"http_{r.status_code}"
                label = r.json()["label"]
                return "ok" if want is None or label == want[i % len(images)] else "wrong_answer"

            await closed_loop(args.clients, args.warmup, through_server)  # connections, caches, JIT-free warm-up
            await closed_loop(args.clients, args.warmup, direct)
            print(f"[{kind}] direct to the vendor for {args.direct_duration:g} s ...", flush=True)
            cpu0 = (vendor.cpu_seconds(), self_cpu_seconds())
            direct_result = await closed_loop(args.clients, args.direct_duration, direct)
            cpu1 = (vendor.cpu_seconds(), self_cpu_seconds(), server.cpu_seconds())
            rss: list[tuple[float, float]] = []
            t0 = time.monotonic()
            rss.append((0.0, server.rss_mb()))
            print(f"[{kind}] through the server for {args.duration:g} s ...", flush=True)
            served = await closed_loop(args.clients, args.duration, through_server,
                                       on_tick=lambda: rss.append((time.monotonic() - t0, server.rss_mb())))
            rss.append((time.monotonic() - t0, server.rss_mb()))
            cpu2 = (vendor.cpu_seconds(), self_cpu_seconds(), server.cpu_seconds())
            light = {}
            if args.light_duration > 0:  # one client: the server's own overhead, without CPU queueing
                print(f"[{kind}] one client, direct then through the server, {args.light_duration:g} s each ...",
                      flush=True)
                light = {"direct": (await closed_loop(1, args.light_duration, direct)).summary(),
                         "server": (await closed_loop(1, args.light_duration, through_server)).summary()}
    finally:
        if server is not None:
            server.stop()
        vendor.stop()
    d, s = direct_result.summary(), served.summary()
    t, m = np.array([x for x, _ in rss]), np.array([y for _, y in rss])
    slope = float(np.polyfit(t, m, 1)[0] * 60) if len(t) > 2 else float("nan")
    n_direct, n_served = max(d["requests"], 1), max(s["requests"], 1)
    cpu_ms = {"direct": {"vendor": 1000 * (cpu1[0] - cpu0[0]) / n_direct,
                         "driver": 1000 * (cpu1[1] - cpu0[1]) / n_direct},
              "server": {"vendor": 1000 * (cpu2[0] - cpu1[0]) / n_served,
                         "driver": 1000 * (cpu2[1] - cpu1[1]) / n_served,
                         "server": 1000 * (cpu2[2] - cpu1[2]) / n_served}}
    if light:
        light["added_latency_ms"] = {"p50": light["server"]["p50_ms"] - light["direct"]["p50_ms"],
                                     "p99": light["server"]["p99_ms"] - light["direct"]["p99_ms"]}
    return {"vendor": kind, "cpu_ms_per_request": cpu_ms, "one_client": light,
            "stub_latency_s": args.stub_latency if kind == "stub" else None, "direct": d,
            "server": s, "added_latency_ms": {"p50": s["p50_ms"] - d["p50_ms"], "p99": s["p99_ms"] - d["p99_ms"]},
            "server_rss_mb": {"first": float(m[0]), "last": float(m[-1]), "peak": float(m.max()),
                              "growth_mb_per_min": slope, "samples": [[round(a, 1), round(b, 2)] for a, b in rss]}}


def show(row: dict) -> None:
    """Print one vendor's figures."""
    d, s, a, r = row["direct"], row["server"], row["added_latency_ms"], row["server_rss_mb"]
    print(f"\n== {row['vendor']} vendor" + (f" ({row['stub_latency_s'] * 1000:g} ms latency)"
                                           if row["stub_latency_s"] is not None else ""))
    print(f"{'':10}{'req/s':>10}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'requests':>10}{'errors':>8}")
    for name, x in (("direct", d), ("server", s)):
        print(f"{name:10}{x['throughput_rps']:10.1f}{x['p50_ms']:10.2f}{x['p90_ms']:10.2f}{x['p99_ms']:10.2f}"
              f"{x['requests']:10d}{x['errors']:8d}")
    print(f"added by the server: p50 {a['p50']:+.2f} ms, p99 {a['p99']:+.2f} ms; outcomes {s['outcomes']}")
    if row["one_client"]:
        o = row["one_client"]
        print(f"one client: direct p50 {o['direct']['p50_ms']:.2f} ms, through the server p50 "
              f"{o['server']['p50_ms']:.2f} ms: added p50 {o['added_latency_ms']['p50']:+.2f} ms, "
              f"p99 {o['added_latency_ms']['p99']:+.2f} ms; errors {o['direct']['errors'] + o['server']['errors']}")
    c = row["cpu_ms_per_request"]
    print(f"CPU ms per request: direct phase vendor {c['direct']['vendor']:.2f}, driver {c['direct']['driver']:.2f}; "
          f"server phase server {c['server']['server']:.2f}, vendor {c['server']['vendor']:.2f}, driver "
          f"{c['server']['driver']:.2f} (on {os.cpu_count()} cores shared by all three)")
    print(f"server RSS: {r['first']:.1f} MB at start, {r['last']:.1f} MB at end, peak {r['peak']:.1f} MB, "
          f"trend {r['growth_mb_per_min']:+.2f} MB/min")


def main() -> None:
    """Parse flags, run every vendor, print and save."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds through the server")
    ap.add_argument("--direct-duration", type=float, default=None, help="seconds direct (default: --duration)")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--light-duration", type=float, default=10.0, help="seconds per side of the one-client run")
    ap.add_argument("--stub-latency", type=float, default=0.02, help="seconds the stub vendor adds to each call")
    ap.add_argument("--vendors", default="stub,reference")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--port", type=int, default=18765, help="fixed port, needed with --workers above 1")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/server_load.json"))
    args = ap.parse_args()
    args.direct_duration = args.duration if args.direct_duration is None else args.direct_duration
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.vendors.split(","):
            row = asyncio.run(run_vendor(kind, args, Path(tmp)))
            show(row)
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "clients": args.clients, "duration_s": args.duration, "direct_duration_s": args.direct_duration,
        "workers": args.workers, "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "platform": platform.platform(), "results": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
