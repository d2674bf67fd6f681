"""What the server benchmarks share: processes on loopback, an adapter, test images, a closed-loop load driver."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from craft_adapter.artifact.synthetic import synthetic_adapter
from craft_adapter.reference.task import CLASS_NAMES

# isort: split
from craft_adapter.testing.stub_vendor import stub_probabilities


class Proc:
    """A subprocess that prints ``... at http://HOST:PORT`` on its first stdout line once it listens."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self._log = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, **(env or {})}, cwd=cwd)
        line = self.proc.stdout.readline()
        if " at http" not in line:
            self.stop()
            raise RuntimeError(f"{args[:4]} did not start: {line!r}; see {log}")
        self.url = "http" + line.split(" at http", 1)[1].split()[0]

    def rss_mb(self) -> float:
        """Resident memory of the process and its children, in MB."""
        total = 0
        for pid in [self.proc.pid, *_children(self.proc.pid)]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            total += int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS")).split()[1])
        return total / 1024

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the process and its children so far, in seconds."""
        return sum(_cpu(pid) for pid in [self.proc.pid, *_children(self.proc.pid)])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._log.close()


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def self_cpu_seconds() -> float:
    """This process's user plus system CPU time, in seconds."""
    t = os.times()
    return t.user + t.system


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids]


def start_stub(log: Path, latency_s: float = 0.0, extra: list[str] | None = None) -> Proc:
    """The stub vendor in its own process."""
    return Proc([sys.executable, "-m", "craft_adapter.testing.stub_vendor", "--latency", str(latency_s),
                 *(extra or [])], log)


def start_reference_vendor(log: Path, model: str) -> Proc:
    """The local open_clip vendor (``craft-adapter vendor``) on CPU."""
    return Proc([sys.executable, "-m", "craft_adapter.cli", "vendor", "--model", model, "--port", "0",
                 "--device", "cpu"], log)


def link_subpackages(tree: Path) -> None:
    """Make ``tree/craft_adapter/{serve,export}`` point at the tree's own ``serve/`` and ``export/``."""
    for name in ("serve", "export"):
        link = tree / "craft_adapter" / name
        if not link.exists():
            link.symlink_to(tree / name, target_is_directory=True)


def start_server(adapter: Path, vendor_url: str, log: Path, *flags: str, tree: Path | None = None) -> Proc:
    """``craft-adapter serve`` on a free loopback port, once it answers ``/healthz``.

    With ``tree``, from that source tree: ``python -m`` puts its working directory first on ``sys.path``, ahead of
    ``PYTHONPATH``, so the server starts in ``tree`` (else the checkout's own package would be imported). The
    source tree keeps ``serve/`` and ``export/`` beside the package (the install maps them in), so they are linked
    in as ``craft_adapter/serve`` and ``craft_adapter/export``: without the links, the editable install's finder
    supplied the checkout's own ``serve/`` to every tree.
    """
    if tree is not None:
        link_subpackages(tree)
    proc = Proc([sys.executable, "-m", "craft_adapter.cli", "serve", str(adapter), "--vendor", vendor_url,
                 "--port", "0", *flags], log, env={"PYTHONPATH": str(tree)} if tree else None,
                cwd=tree)  # access log on, as deployed (to the log file)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(proc.url + "/healthz", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.stop()
    raise RuntimeError(f"the server never answered /healthz; see {log}")


def make_adapter(path: Path, seed: int = 0):  # -> Adapter
    """A 10-class text-mode adapter with the reference task's class names, saved to ``path``."""
    adapter = synthetic_adapter(len(CLASS_NAMES), seed=seed)
    adapter.class_names = list(CLASS_NAMES)
    adapter.save(path)
    return adapter


def sample_images(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct random 28x28 greyscale PNGs."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def stub_expected(adapter, image: bytes) -> np.ndarray:  # noqa: ANN001 (an Adapter)
    """Refined probabilities ``[c]`` the server must answer for ``image`` in front of the stub vendor."""
    scores = stub_probabilities(base64.b64encode(image).decode(), adapter.class_names).astype(np.float32)
    z = adapter.refine(scores[None])[0]
    p = np.exp(z - z.max())
    return p / p.sum()


@dataclass
class LoadResult:
    """One closed-loop phase: latencies of successful requests, outcome counts, wall time."""

    latencies: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def summary(self) -> dict[str, float | int | dict[str, int]]:
        """Throughput, percentiles in ms, outcome counts."""
        lat = np.array(self.latencies) * 1000 if self.latencies else np.array([np.nan])
        return {"requests": int(sum(self.outcomes.values())), "ok": len(self.latencies),
                "errors": int(sum(v for k, v in self.outcomes.items() if k != "ok")),
                "throughput_rps": len(self.latencies) / self.seconds if self.seconds else 0.0,
                "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
                "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(lat.mean()),
                "outcomes": dict(self.outcomes)}


async def closed_loop(clients: int, seconds: float, one_request: Callable[[int], Awaitable[str]],
                      on_tick: Callable[[], None] | None = None) -> LoadResult:
    """``clients`` concurrent loops, each sending its next request as soon as the last is answered."""
    result = LoadResult()
    stop_at = time.monotonic() + seconds

    async def loop(worker: int) -> None:
        i = worker
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                outcome = await one_request(i)
            except Exception as e:  # noqa: BLE001 (a benchmark counts every failure, whatever it is)
                outcome = f"exception:{type(e).__name__}"
            if outcome == "ok":
                result.latencies.append(time.perf_counter() - t0)
            result.outcomes[outcome] += 1
            i += clients

    async def ticker() -> None:
        while time.monotonic() < stop_at:
            await asyncio.sleep(1.0)
            if on_tick is not None:
                on_tick()

    started = time.monotonic()
    await asyncio.gather(ticker(), *(loop(w) for w in range(clients)))
    result.seconds = time.monotonic() - started
    return result
