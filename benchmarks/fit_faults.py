"""Fault injection during a text-mode fit: a vendor failing 20% of calls costs retries, never the result.

    .venv/bin/python benchmarks/fit_faults.py [--budget 3000] [--fault-rate 0.2] [--port 18741] [--seed 1]

The reference vendor (``craft-adapter vendor``) runs in its own process; the stub vendor
(``craft_adapter.testing.stub_vendor``) sits in front of it as a fault-injecting proxy on a fixed loopback port, so
both fits record the same vendor URL in the adapter. Run 1: the proxy fails each call with probability
``--fault-rate``, the kind drawn evenly from timeout (it hangs past the fit's ``--timeout``), 500, 503, 429 (with a
fractional Retry-After), malformed JSON, a truncated body, a NaN score and a missing label. Run 2: the same proxy
with no faults. Each fit starts from an empty cache. Checked: the two adapters are byte-identical. Reported: the
calls the proxy saw by kind, the calls the vendor itself answered, the extra calls the retries cost, the fit log's
meter (``failed_calls`` among it) and wall times. Writes ``benchmarks/results/fit_faults.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kill_resume import CLI, REPO, RESULTS, VendorStatsCounter, read_meter, sha256, start_vendor

from craft_adapter.testing.stub_vendor import StubVendor, serve_stub_in_thread

FAULTS = ("timeout", "500", "503", "429", "malformed", "truncated", "nan", "missing_label")


def fit_through(proxy: StubVendor, vendor: VendorStatsCounter, fault_rate: float, fit_args: list[str],
                folder: Path) -> dict:
    """One fit through ``proxy`` failing at ``fault_rate``, from an empty cache in ``folder``; what it cost."""
    folder.mkdir(parents=True, exist_ok=False)
    output = folder / "adapter.safetensors"
    proxy.fault_rate = fault_rate
    proxy.calls.clear()
    vendor_before = vendor.count()
    t0 = time.perf_counter()
    with open(folder / "fit.log", "wb") as log:
        rc = subprocess.run([*CLI, "fit", "-o", str(output), "--vendor", proxy.url + "/", *fit_args],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    wall = time.perf_counter() - t0
    time.sleep(max(0.0, proxy.hang_s - 0.5))  # a hung call still under way is counted once it reaches the vendor
    seen = dict(sorted(proxy.calls.items()))
    return {"fault_rate": fault_rate, "rc": rc, "wall_s": round(wall, 2),
            "adapter_sha256": sha256(output) if output.exists() else None,
            "proxy_calls": seen, "proxy_total": sum(seen.values()),
            "injected_faults": sum(n for kind, n in seen.items() if kind != "ok"),
            "vendor_calls_answered": vendor.count() - vendor_before, "upstream_errors": proxy.upstream_errors,
            "meter": read_meter(output)}


def compare(faulty: dict, clean: dict) -> dict:
    """What the faults cost and whether they changed anything."""
    meter = faulty["meter"]
    return {"identical": faulty["adapter_sha256"] is not None and faulty["adapter_sha256"] == clean["adapter_sha256"],
            "extra_calls": faulty["proxy_total"] - clean["proxy_total"],
            "failed_calls": meter.get("failed_calls"),
            "failed_calls_match_injected": meter.get("failed_calls") == faulty["injected_faults"],
            "ok_calls_match_fault_free": faulty["proxy_calls"].get("ok", 0) == clean["proxy_total"],
            "extra_wall_s": round(faulty["wall_s"] - clean["wall_s"], 2)}


def report(runs: list[dict], summary: dict) -> str:
    """The printed table."""
    kinds = ["ok", *FAULTS]
    lines = ["| run | " + " | ".join(kinds) + " | proxy total | vendor answered | failed_calls | paid_calls | "
             "vendor_calls (budget) | wall s | rc |",
             "|---" * (len(kinds) + 8) + "|"]
    for run in runs:
        m = run["meter"]
        lines.append(f"| fault rate {run['fault_rate']:g} | " + " | ".join(str(run["proxy_calls"].get(k, 0))
                                                                      for k in kinds)
                     + f" | {run['proxy_total']} | {run['vendor_calls_answered']} | {m.get('failed_calls')} | "
                     f"{m.get('paid_calls')} | {m.get('vendor_calls')} | {run['wall_s']:.1f} | {run['rc']} |")
    lines.append(f"identical adapters: {summary['identical']}; extra calls from retries: {summary['extra_calls']}; "
                 f"failed_calls {summary['failed_calls']} (= injected faults: {summary['failed_calls_match_injected']})"
                 f"; ok calls under faults = fault-free total: {summary['ok_calls_match_fault_free']}; "
                 f"extra wall time {summary['extra_wall_s']:+.1f}s")
    return "\n".join(lines)


def main() -> None:
    """Start the vendor and the proxy, run the faulty fit and the clean one, compare, write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=3000, help="vendor calls")
    ap.add_argument("--seed", type=int, default=1, help="fit seed")
    ap.add_argument("--fault-seed", type=int, default=0, help="seed of the proxy's fault draws")
    ap.add_argument("--fault-rate", type=float, default=0.2)
    ap.add_argument("--port", type=int, default=18741, help="the proxy's fixed port (part of the adapter identity)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=1.0, help="the fit's per-call timeout; the stub hangs 1.5x")
    ap.add_argument("--retries", type=int, default=8)
    ap.add_argument("--retry-backoff", type=float, default=0.05)
    ap.add_argument("--max-failed-calls", type=int, default=None,
                    help="the fit's cap on failed calls in all; default the budget, so that the retries, not the "
                    "cap, are what is measured")
    ap.add_argument("--out", type=Path, default=RESULTS / "fit_faults.json")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fit_faults-"))
    print(f"working in {workdir}", flush=True)
    fit_args = ["--seed", str(args.seed), "--budget", str(args.budget), "--concurrency", str(args.concurrency),
                "--timeout", str(args.timeout), "--retries", str(args.retries), "--retry-backoff",
                str(args.retry_backoff), "--max-failed-calls", str(args.max_failed_calls or args.budget)]
    vendor = start_vendor(workdir / "vendor.log")
    proxy = StubVendor(port=args.port, fault_kinds=FAULTS, hang_s=1.5 * args.timeout, retry_after="0.2",
                       seed=args.fault_seed, upstream=vendor.url + "/")
    serve_stub_in_thread(proxy)
    try:
        counter = VendorStatsCounter(vendor.url)
        faulty = fit_through(proxy, counter, args.fault_rate, fit_args, workdir / "faulty")
        print(f"faulty run: rc {faulty['rc']}, {faulty['wall_s']:.1f}s", flush=True)
        clean = fit_through(proxy, counter, 0.0, fit_args, workdir / "clean")
    finally:
        proxy.shutdown()
        proxy.server_close()
        vendor.stop()
    summary = compare(faulty, clean)
    print(report([faulty, clean], summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": ("python benchmarks/fit_faults.py " + " ".join(sys.argv[1:])).strip(),
        "fit_args": ["--vendor", proxy.url + "/", *fit_args], "faults": list(FAULTS), "retry_after": "0.2",
        "hang_s": proxy.hang_s, "runs": {"faulty": faulty, "fault_free": clean}, "summary": summary}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
