"""Attack benchmark: ``craft-adapter serve`` (one worker) under each attack class, as real processes on loopback.

    .venv/bin/python benchmarks/server_attacks.py [--duration 15] [--long-duration 40] [--phases idle,...,mix]
        [--nice -10] [--tree DIR] [--out benchmarks/results/server_attacks.json]

Four processes: the stub vendor (20 ms latency; its faults switched per phase through its stdin), the server, an
attacker and an observer. For each phase the attacker runs one attack class (:mod:`attack_clients`) for a fixed
time while the observer polls ``/healthz`` every 50 ms on a fresh connection (as a load balancer would) and four
well-behaved clients classify real PNGs, each answer checked against the independently computed one. This
process samples the server's RSS every 100 ms from /proc and also reads its kernel high-water mark (``VmHWM``,
reset before each phase through ``clear_refs``), so no spike between samples is missed. After each phase the
server's JSON log is searched for status 500 and tracebacks. ``--nice -10`` raises the priority of the server,
the vendor and the observer over the attacker and whatever else shares the machine, as separate hosts would be.

Phases: ``baseline`` no attack (the machine's own noise); ``idle`` 2,000 idle sockets; ``slowloris`` 100 heads
at 1 byte/s; ``slow_body`` 100 bodies of 1 MB at 1 byte/s (long: the body deadline is 30 s); ``bombs`` 39.9
M-pixel WebP/PNG of a few KB, 16 clients and batches of 16; ``deep_json`` JSON nested 100,000 deep;
``oversized`` bodies past the limit and junk just under it; ``vendor`` half the vendor's replies a gzip bomb, an
endless 600 MB stream or a redirect, under 16 more clients; ``mix`` all of them at once (long).
Goals: RSS never above 512 MB, ``/healthz`` p99 under 100 ms, no 500. ``--tree DIR`` runs the server from
another source tree (e.g. an older commit's, from ``git archive``) for side-by-side runs.
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

import numpy as np
from serve_common import make_adapter, start_server

PHASES = ("baseline", "idle", "slowloris", "slow_body", "bombs", "deep_json", "oversized", "vendor", "mix")
LONG = frozenset({"slow_body", "mix"})
HOSTILE = "gzip_bomb,endless,redirect"
GOALS = {"rss_mb": 512, "healthz_p99_ms": 100}


class Stub:
    """The stub vendor in its own process; ``faults(rate, kinds)`` switches its hostile replies on or off."""

    def __init__(self, log: Path, latency_s: float) -> None:
        self._log = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([sys.executable, __file__, "--role", "stub", "--latency", str(latency_s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.url = self.proc.stdout.readline().split(" at ")[1].strip()

    def faults(self, rate: float, kinds: str = HOSTILE) -> None:
        """Answer a share ``rate`` of calls with one of ``kinds``."""
        self.proc.stdin.write(f"{rate} {kinds}\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        """Close its stdin (it exits), then make sure."""
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def stub_role(latency_s: float) -> None:
    """Serve the stub vendor until stdin closes; each stdin line ``RATE KINDS`` sets its faults."""
    from craft_adapter.testing import hostile_replies
    from craft_adapter.testing.stub_vendor import StubVendor, serve_stub_in_thread

    stub = StubVendor(latency_s=latency_s)
    hostile_replies.gzip_bomb(stub.bomb_mb)  # built once, before any phase's clock runs
    serve_stub_in_thread(stub)
    print(f"stub vendor at {stub.url}", flush=True)
    for line in sys.stdin:
        rate, _, kinds = line.strip().partition(" ")
        stub.fault_kinds = tuple(k for k in kinds.split(",") if k) or stub.fault_kinds
        stub.fault_rate = float(rate)
    stub.shutdown()


def _status(pids: list[int], field: str) -> float:
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += int(next(ln for ln in text.splitlines() if ln.startswith(field)).split()[1])
    return total / 1024


def _pids(proc) -> list[int]:  # noqa: ANN001 (a serve_common.Proc)
    try:
        kids = Path(f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children").read_text().split()
    except OSError:
        kids = []
    return [proc.proc.pid, *map(int, kids)]


def renice(pid: int, nice: int) -> None:
    """Set every thread of ``pid`` to ``nice`` (threads started later inherit it from the main thread)."""
    if nice:
        for task in Path(f"/proc/{pid}/task").iterdir():
            os.setpriority(os.PRIO_PROCESS, int(task.name), nice)


def _log_findings(text: str) -> dict:
    statuses: dict[str, int] = {}
    s500 = tracebacks = 0
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            tracebacks += "Traceback" in line
            continue
        if "status" in doc:
            statuses[str(doc["status"])] = statuses.get(str(doc["status"]), 0) + 1
            s500 += doc["status"] == 500
        tracebacks += "exception" in doc or "Traceback" in line
    return {"status_500": s500, "tracebacks": tracebacks, "statuses_logged": statuses}


def run_phase(phase: str, args: argparse.Namespace, server, stub: Stub, tmp: Path, log: Path) -> dict:  # noqa: ANN001
    """One attack class with its observer; the figures."""
    duration = args.long_duration if phase in LONG else args.duration
    stub.faults(0.5 if phase in ("vendor", "mix") else 0.0)
    pids = _pids(server)
    for pid in pids:  # reset the kernel's peak-RSS mark, so VmHWM is this phase's peak
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    offset = log.stat().st_size
    start_at = time.time() + 4.0  # both children import and get ready before this
    common = ["--url", server.url, "--start-at", str(start_at), "--duration", str(duration), "--tmp", str(tmp)]
    children = {role: subprocess.Popen([sys.executable, __file__, "--role", role, "--phase", phase, *common,
                                        "--out", str(tmp / f"{phase}-{role}.json")]) for role in ("observe", "attack")}
    renice(children["observe"].pid, args.nice)
    rss_before, load_before = _status(pids, "VmRSS"), os.getloadavg()[0]
    spy = None
    if args.profile is not None:  # py-spy's raw (collapsed) stacks of every server thread, during the attack
        args.profile.mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pids[0]),
                                "--duration", str(int(duration)), "--format", "raw", "--threads", "--nonblocking",
                                "-o", str(args.profile / f"{phase}.txt")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    samples = []
    hard_stop = time.monotonic() + duration + 120
    while any(p.poll() is None for p in children.values()) and time.monotonic() < hard_stop:
        samples.append(_status(pids, "VmRSS"))
        time.sleep(0.1)
    for p in children.values():
        if p.poll() is None:
            p.kill()
            p.wait()
    hwm = _status(pids, "VmHWM")
    if spy is not None:
        spy.wait(60)
    stub.faults(0.0)
    time.sleep(3.0)  # let the server settle before the next phase
    seen = json.loads((tmp / f"{phase}-observe.json").read_text())
    attack = json.loads((tmp / f"{phase}-attack.json").read_text())
    with open(log, "rb") as f:
        f.seek(offset)
        findings = _log_findings(f.read().decode("utf-8", "replace"))
    row = {"phase": phase, "duration_s": duration, "load_avg_1min": [load_before, os.getloadavg()[0]],
           "rss_mb": {"before": rss_before, "peak_sampled": max(samples, default=0.0), "peak_hwm": hwm,
                      "after": _status(pids, "VmRSS")},
           **seen, "attack": attack, "server_log": findings}
    row["goals_met"] = {"rss": max(hwm, row["rss_mb"]["peak_sampled"]) <= GOALS["rss_mb"],
                        "healthz_p99": seen["healthz"]["p99_ms"] < GOALS["healthz_p99_ms"]
                        and seen["healthz"]["failed"] == 0,
                        "no_500": findings["status_500"] == 0 and findings["tracebacks"] == 0 and not any(
                            ":http_500" in k for k in [*attack["outcomes"], *seen["well_behaved"]["outcomes"]])}
    return row


def show(row: dict) -> None:
    """One line per phase."""
    h, w, r = row["healthz"], row["well_behaved"], row["rss_mb"]
    print(f"{row['phase']:10} rss peak {max(r['peak_hwm'], r['peak_sampled']):6.1f} MB (before {r['before']:.0f})  "
          f"healthz p50 {h['p50_ms']:6.1f} p99 {h['p99_ms']:6.1f} ms fail {h['failed']}  well-behaved "
          f"{w['success_rate']:.3f} ok p99 {w['p99_ms']:7.1f} ms  500s {row['server_log']['status_500']} "
          f"tb {row['server_log']['tracebacks']}  load {row['load_avg_1min'][1]:.1f}  goals {row['goals_met']}",
          flush=True)
    print("           attack:", dict(sorted(row["attack"]["outcomes"].items())), flush=True)


def main() -> None:
    """Parse flags; as the orchestrator run every phase, else play one role."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", default="main", choices=("main", "stub", "observe", "attack"))
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per phase")
    ap.add_argument("--long-duration", type=float, default=40.0, help="seconds of the slow_body and mix phases")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--latency", type=float, default=0.02, help="the stub vendor's latency in seconds")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/server_attacks.json"))
    ap.add_argument("--nice", type=int, default=0, help="nice value of the server, vendor and observer (e.g. -10: "
                    "on a shared machine, other work and the attacker's own CPU then do not delay them)")
    ap.add_argument("--profile", type=Path, default=None, help="folder for py-spy stacks of the server per phase")
    ap.add_argument("--tree", type=Path, default=None, help="run the server from this source tree")
    ap.add_argument("--phase", default="")
    ap.add_argument("--url", default="")
    ap.add_argument("--start-at", type=float, default=0.0)
    ap.add_argument("--tmp", type=Path, default=None)
    args = ap.parse_args()
    if args.role == "stub":
        stub_role(args.latency)
        return
    if args.role in ("observe", "attack"):
        from attack_roles import attack_role, observe_role

        result = asyncio.run((observe_role if args.role == "observe" else attack_role)(args))
        args.out.write_text(json.dumps(result))
        return
    from attack_clients import make_bombs

    if args.tree is not None:
        args.tree = args.tree.resolve()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        make_adapter(tmp / "adapter.safetensors")
        make_bombs(tmp)
        stub = Stub(tmp / "stub.log", args.latency)
        server = None
        try:
            server = start_server(tmp / "adapter.safetensors", stub.url + "/", tmp / "server.log", "--workers", "1",
                                  tree=args.tree)
            for pid in (*_pids(server), stub.proc.pid):
                renice(pid, args.nice)
            for phase in args.phases.split(","):
                row = run_phase(phase, args, server, stub, tmp, tmp / "server.log")
                show(row)
                rows.append(row)
        finally:
            if server is not None:
                server.stop()
            stub.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "goals": GOALS, "cpus": os.cpu_count(), "nice": args.nice, "stub_latency_s": args.latency, "workers": 1,
        "tree": str(args.tree) if args.tree else None,
        "all_goals_met": bool(np.all([all(r["goals_met"].values()) for r in rows])), "phases": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
