"""The kill test: a fit killed with SIGKILL at random points and resumed ends with the same adapter, paying for
(almost) nothing twice.

    .venv/bin/python benchmarks/kill_resume.py [--modes soft text] [--kills 20] [--text-kills 10] [--seed 0]

For each mode, one uninterrupted fit from an empty cache gives the reference adapter bytes and U, the vendor calls
it started, counted outside the fit's own accounting:

- ``soft``: the in-process reference vendor (open_clip); the fit runs in a child through
  ``benchmarks/kill_child.py``, which appends one byte to a ledger file before each backend call starts;
- ``text``: ``--vendor URL`` against ``craft-adapter vendor`` in its own process, counted by the vendor's
  ``GET /stats``; ``--concurrency 8``, so at most 8 calls are in flight when the kill lands.

Then for each kill point drawn uniformly from (0, U) by a seeded RNG: a fresh output folder (and so a fresh default
cache beside it), the fit started, SIGKILL once the count reaches the point, and ``fit --resume`` run to the end.
Checked: the adapter is byte-identical to the uninterrupted one, and calls before the kill plus calls in the resume
are at most U + the calls that can be in flight. Writes ``benchmarks/results/kill_resume.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from craft_adapter.cli.shared import DEFAULT_MODEL

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
KILL_CHILD = BENCH_DIR / "kill_child.py"
sys.path.insert(0, str(BENCH_DIR))  # sibling scripts, also when a test loads this file by path
from serve_common import Proc, start_reference_vendor  # noqa: E402

CLI = [sys.executable, "-m", "craft_adapter.cli"]


class CallCounter(Protocol):
    """Counts vendor calls started, from outside the fit, and says how to start a fit it can count."""

    in_flight: int  # calls that can be under way at once (lost by a kill, paid again by the resume)
    poll_s: float  # how often to look while waiting for a kill point

    def command(self, cli_args: list[str]) -> list[str]:
        """The argv that runs ``craft-adapter CLI_ARGS`` so that this counter sees its calls."""
        ...

    def count(self) -> int:
        """Calls started so far."""
        ...


@dataclass
class LedgerCounter:
    """In-process backend calls, one byte each in a ledger file written by ``kill_child.py``."""

    ledger: Path
    in_flight: int = 1
    poll_s: float = 0.002

    def command(self, cli_args: list[str]) -> list[str]:
        """Run the CLI through the counting wrapper."""
        return [sys.executable, str(KILL_CHILD), str(self.ledger), *cli_args]

    def count(self) -> int:
        """The ledger's size in bytes."""
        try:
            return self.ledger.stat().st_size
        except FileNotFoundError:
            return 0


@dataclass
class VendorStatsCounter:
    """Calls a local vendor (``craft-adapter vendor``) received, from its ``GET /stats``."""

    url: str
    in_flight: int = 8
    poll_s: float = 0.01

    def command(self, cli_args: list[str]) -> list[str]:
        """Run the CLI directly; the vendor does the counting."""
        return [*CLI, *cli_args]

    def count(self) -> int:
        """Every POST the vendor has received, all endpoints together."""
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            conn.request("GET", "/stats")
            return sum(json.loads(conn.getresponse().read())["calls"].values())
        finally:
            conn.close()


@dataclass
class FitRun:
    """One fit process: exit code, wall time, and what its fit log's meter said (if it wrote one)."""

    rc: int
    wall_s: float
    calls: int
    meter: dict = field(default_factory=dict)


@dataclass
class KillResult:
    """One kill point: what was paid before the kill and in the resume, and whether the adapter matched."""

    point: int
    calls_before_kill: int
    calls_in_resume: int
    excess: int  # calls_before_kill + calls_in_resume - U
    resume_wall_s: float
    resume_rc: int
    identical: bool
    resume_meter: dict = field(default_factory=dict)
    note: str = ""


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_meter(output: Path) -> dict:
    """The ``meter`` of ``OUTPUT.fitlog.json``, or {} when there is none."""
    log = output.with_name(output.name + ".fitlog.json")
    try:
        return json.loads(log.read_text()).get("meter", {})
    except (OSError, ValueError):
        return {}


def settle(counter: CallCounter, quiet_s: float = 0.3, limit_s: float = 10.0) -> int:
    """The count once it has stopped moving for ``quiet_s`` (requests still in socket buffers get counted)."""
    last, deadline = counter.count(), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = counter.count()
        if now == last:
            break
        last = now
    return last


def run_fit(counter: CallCounter, cli_args: list[str], log: Path, output: Path) -> FitRun:
    """Run ``craft-adapter CLI_ARGS`` to the end; the calls are counted from the counter's value before it."""
    before = counter.count()
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        rc = subprocess.run(counter.command(cli_args), stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    wall = time.perf_counter() - t0
    return FitRun(rc, wall, settle(counter) - before, read_meter(output))


def kill_at(counter: CallCounter, cli_args: list[str], point: int, log: Path) -> tuple[int, str]:
    """Start the fit and SIGKILL it once ``point`` calls have started; the calls started by its death, and a note."""
    before = counter.count()
    with open(log, "ab") as f:
        proc = subprocess.Popen(counter.command(cli_args), stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        note = ""
        while counter.count() - before < point:
            if proc.poll() is not None:
                note = f"the fit ended (rc {proc.returncode}) before the kill point"
                break
            time.sleep(counter.poll_s)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return settle(counter) - before, note


def kill_and_resume(counter: CallCounter, fit_args: list[str], folder: Path, point: int, reference: str,
                    upper: int) -> KillResult:
    """Fit into a fresh ``folder``, kill at ``point`` calls, resume to the end, compare with ``reference`` bytes."""
    folder.mkdir(parents=True, exist_ok=False)
    output = folder / "adapter.safetensors"
    log = folder / "fit.log"
    before, note = kill_at(counter, ["fit", "-o", str(output), *fit_args], point, log)
    resumed = run_fit(counter, ["fit", "-o", str(output), "--resume"], log, output)
    identical = resumed.rc == 0 and output.exists() and sha256(output) == reference
    if resumed.rc != 0:
        note = (note + "; " if note else "") + f"resume exited {resumed.rc}: " + _tail(log)
    return KillResult(point, before, resumed.calls, before + resumed.calls - upper, round(resumed.wall_s, 2),
                      resumed.rc, identical, resumed.meter, note)


def _tail(log: Path, n: int = 3) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


def kill_points(n: int, upper: int, seed: int) -> list[int]:
    """``n`` kill points drawn uniformly from the integers in (0, upper) by ``random.Random(seed)``."""
    rng = random.Random(seed)
    return [rng.randint(1, max(1, upper - 1)) for _ in range(n)]


def run_scenario(name: str, counter_for: Callable[[Path], CallCounter], fit_args: list[str], workdir: Path,
                 n_kills: int, seed: int) -> dict:
    """The uninterrupted fit, then ``n_kills`` kill-and-resume runs; everything measured, as a JSON-able dict."""
    base_dir = workdir / f"{name}-uninterrupted"
    base_dir.mkdir(parents=True, exist_ok=False)
    output = base_dir / "adapter.safetensors"
    counter = counter_for(base_dir)
    base = run_fit(counter, ["fit", "-o", str(output), *fit_args], base_dir / "fit.log", output)
    if base.rc != 0 or not output.exists():
        raise RuntimeError(f"the uninterrupted {name} fit failed (rc {base.rc}): {_tail(base_dir / 'fit.log', 8)}")
    if not (base_dir / "craft-adapter-cache.sqlite").exists():
        print(f"warning: no cache at {base_dir / 'craft-adapter-cache.sqlite'} (the documented default)", flush=True)
    reference = sha256(output)
    kills = []
    for i, point in enumerate(kill_points(n_kills, base.calls, seed)):
        folder = workdir / f"{name}-kill{i:02d}"
        result = kill_and_resume(counter_for(folder), fit_args, folder, point, reference, base.calls)
        kills.append(result)
        print(f"  {name} kill {i + 1}/{n_kills}: {_row(result, counter.in_flight)}", flush=True)
    return {"mode": name, "fit_args": fit_args, "kill_seed": seed, "uncut_calls": base.calls,
            "uncut_wall_s": round(base.wall_s, 2), "uncut_meter": base.meter, "adapter_sha256": reference,
            "in_flight": counter.in_flight, "kills": [asdict(k) for k in kills],
            "all_identical": all(k.identical for k in kills),
            "max_excess": max((k.excess for k in kills), default=0),
            "bound_held": all(k.excess <= counter.in_flight for k in kills)}


def _row(k: KillResult, in_flight: int) -> str:
    ok = "yes" if k.identical else "NO"
    bound = "" if k.excess <= in_flight else f"  OVER BOUND (+{in_flight} allowed)"
    return (f"point {k.point:>5}  before kill {k.calls_before_kill:>5}  in resume {k.calls_in_resume:>5}  "
            f"excess {k.excess:>+3}  resume {k.resume_wall_s:>6.1f}s  identical {ok}{bound}"
            + (f"  ({k.note})" if k.note else ""))


def table(scenario: dict) -> str:
    """The per-kill table of one scenario, as printed."""
    head = (f"{scenario['mode']}: uninterrupted {scenario['uncut_calls']} calls in {scenario['uncut_wall_s']:.1f}s; "
            f"bound U + {scenario['in_flight']}\n"
            "| point | calls before kill | calls in resume | excess over U | resume wall s | identical |\n"
            "|---|---|---|---|---|---|")
    rows = [f"| {k['point']} | {k['calls_before_kill']} | {k['calls_in_resume']} | {k['excess']:+d} | "
            f"{k['resume_wall_s']:.1f} | {'yes' if k['identical'] else 'NO'} |" for k in scenario["kills"]]
    tail = (f"all identical: {scenario['all_identical']}; max excess {scenario['max_excess']:+d} "
            f"(allowed {scenario['in_flight']}); bound held: {scenario['bound_held']}")
    return "\n".join([head, *rows, tail])


def start_vendor(log: Path) -> Proc:
    """``craft-adapter vendor`` with the reference vendor, in its own process on a free loopback port."""
    return start_reference_vendor(log, DEFAULT_MODEL)


def main() -> None:
    """Run the chosen modes, print their tables, write the results file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=["soft", "text"], choices=["soft", "text"])
    ap.add_argument("--kills", type=int, default=20, help="kill points in soft mode")
    ap.add_argument("--text-kills", type=int, default=10, help="kill points in text mode")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    ap.add_argument("--fit-seed", type=int, default=1)
    ap.add_argument("--text-budget", type=int, default=3000, help="vendor calls of the text-mode fit")
    ap.add_argument("--concurrency", type=int, default=8, help="text mode: calls in flight at most")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a fresh temporary folder")
    ap.add_argument("--out", type=Path, default=RESULTS / "kill_resume.json")
    args = ap.parse_args()
    import tempfile

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kill_resume-"))
    print(f"working in {workdir}", flush=True)
    scenarios = []
    t0 = time.perf_counter()
    if "soft" in args.modes:
        scenarios.append(run_scenario("soft", lambda d: LedgerCounter(d / "ledger"), ["--seed", str(args.fit_seed)],
                                      workdir, args.kills, args.seed))
        print(table(scenarios[-1]), flush=True)
    if "text" in args.modes:
        vendor = start_vendor(workdir / "vendor.log")
        try:
            counter = VendorStatsCounter(vendor.url, in_flight=args.concurrency)
            fit_args = ["--vendor", vendor.url + "/", "--seed", str(args.fit_seed), "--budget", str(args.text_budget),
                        "--concurrency", str(args.concurrency)]
            scenarios.append(run_scenario("text", lambda d: counter, fit_args, workdir, args.text_kills, args.seed))
        finally:
            vendor.stop()
        print(table(scenarios[-1]), flush=True)
    command = "python benchmarks/kill_resume.py " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command.strip(), "total_wall_s": round(time.perf_counter() - t0, 1),
                                    "scenarios": scenarios}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
