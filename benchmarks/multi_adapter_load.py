"""Load benchmark: 1,000 adapters behind one server and one vendor, side by side with a one-adapter server.

    .venv/bin/python benchmarks/multi_adapter_load.py [--duration 60] [--clients 64] [--stub-latency 0.02]
        [--small 1000] [--large 20] [--out benchmarks/results/multi_adapter_load.json]

A folder of ``--small`` 10-class and ``--large`` 1,000-class synthetic adapters (distinct weights and, for the
large ones, distinct class orders), the stub vendor at ``--stub-latency``, ``--clients`` closed-loop clients
choosing adapters by a Zipf law (s = 1.1, ranks shuffled). Phases, each ``--duration`` seconds:

1. ``single``: ``craft-adapter serve`` with one 10-class adapter, every client on it (the baseline);
2. ``cold``: one client, first answers of cold adapters (10 and 1,000 classes), then the same adapters warm;
3. ``all_loaded``: every adapter loaded (RSS), then the Zipf load;
4. ``budget_10pct``: a server whose memory budget holds 10% of the adapters (its estimate), the Zipf load;
5. ``hot_reload``: the Zipf load while 100 adapter files are replaced (new weights and class order). Every
   answer is checked against the version the server names, and that version against the files' history:
   written before the request ended, and not superseded earlier than the poll interval (+1 s) before it began.

Every answer is checked against the stub's scores refined by the adapter's own numpy forward. The driver,
the stub and the server share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from serve_common import LoadResult, Proc, closed_loop, sample_images, start_server, start_stub

from craft_adapter.artifact.adapter_file import Adapter
from craft_adapter.artifact.synthetic import synthetic_adapter

# isort: split
from craft_adapter.testing.stub_vendor import stub_probabilities


def make_adapters(folder: Path, small: int, large: int) -> dict[str, Adapter]:
    """The folder's adapters, written once; name -> adapter."""
    out = {}
    for i in range(small + large):
        name, n = (f"s{i:04d}", 10) if i < small else (f"L{i - small:02d}", 1000)
        a = variant(synthetic_adapter(n, seed=i), i)
        a.save(folder / f"{name}.safetensors")
        out[name] = a
    return out


def variant(a: Adapter, seed: int) -> Adapter:
    """``a`` with its class names in a seed-dependent order, so versions differ in labels as well as weights."""
    a.class_names = [a.class_names[j] for j in np.random.default_rng(seed).permutation(a.n_classes)]
    return a


class Oracle:
    """Expected (label, probability) per (adapter version, image), computed once each."""

    def __init__(self, images: list[bytes]) -> None:
        self.b64 = [base64.b64encode(im).decode() for im in images]
        self._scores: dict[tuple[tuple[str, ...], int], np.ndarray] = {}
        self._cache: dict[tuple[int, int], tuple[str, float]] = {}

    def expected(self, a: Adapter, image: int) -> tuple[str, float]:
        key = (id(a), image)
        if key not in self._cache:
            names = tuple(a.class_names)
            if (names, image) not in self._scores:
                self._scores[(names, image)] = stub_probabilities(self.b64[image], list(names)).astype(np.float32)
            z = a.refine(self._scores[(names, image)][None])[0]
            p = np.exp(z - z.max())
            p /= p.sum()
            self._cache[key] = (names[int(p.argmax())], float(p.max()))
        return self._cache[key]

    def check(self, a: Adapter, image: int, answer: dict) -> bool:
        label, prob = self.expected(a, image)
        return answer["label"] == label and abs(answer["probability"] - prob) < 1e-4


def start_multi(folder: Path, vendor: str, log: Path, budget_mb: float = 0.0, poll_s: float = 2.0) -> Proc:
    """A multi-adapter server (this file's ``--serve`` mode) once it answers ``/readyz``."""
    proc = Proc([sys.executable, __file__, "--serve", str(folder), "--vendor", vendor, "--budget-mb", str(budget_mb),
                 "--poll-s", str(poll_s)], log)
    for _ in range(600):
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(proc.url + "/readyz", timeout=5).status_code == 200:
                return proc
        time.sleep(0.1)
    raise RuntimeError(f"the multi-adapter server never got ready; see {log}")


def serve_main(args: argparse.Namespace) -> None:
    """Run a multi-adapter server on a free loopback port (what ``serve --adapters DIR`` will do)."""
    import uvicorn

    from craft_adapter.serve.server.adapter_routes import MultiOptions
    from craft_adapter.serve.server.http_app import create_app, uvicorn_options
    from craft_adapter.serve.server.settings import ServerConfig

    config = ServerConfig(adapter=args.serve, vendor_url=args.vendor, port=0, max_vendor_in_flight=64)
    app = create_app(config, adapters=args.serve, options=MultiOptions(
        memory_budget_mb=args.budget_mb, poll_s=args.poll_s))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(f"serving {args.serve} at http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, **uvicorn_options(config))).run(sockets=[sock])


def zipf_choices(names: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` draws of adapter names by Zipf(s=1.1) over shuffled ranks."""
    rng = np.random.default_rng(seed)
    ranked = [names[i] for i in rng.permutation(len(names))]
    p = 1.0 / np.arange(1, len(names) + 1) ** 1.1
    return [ranked[i] for i in rng.choice(len(names), size=n, p=p / p.sum())]


class Driver:
    """HTTP pools and the checked request every phase sends."""

    def __init__(self, clients: int, images: list[bytes], oracle: Oracle) -> None:
        self.images, self.oracle, self.n_pools = images, oracle, -(-clients // 8)
        self.pools = [httpx.AsyncClient(limits=httpx.Limits(max_connections=8, max_keepalive_connections=8),
                                        timeout=60) for _ in range(self.n_pools)]
        # name -> [[write began, write done, sha12, adapter]], oldest first
        self.versions: dict[str, list[list]] = {}
        self.stale_allowance_s = 0.0
        self.violations: list[str] = []

    async def close(self) -> None:
        for pool in self.pools:
            await pool.aclose()

    async def one(self, url: str, name: str, i: int) -> str:
        image = i % len(self.images)
        t0 = time.time()
        r = await self.pools[i % self.n_pools].post(f"{url}/{name}/classify" if "/v1/adapters" in url else
                                                    url + "/v1/classify", content=self.images[image],
                                                    headers={"Content-Type": "image/png"})
        if r.status_code != 200:
            return f"http_{r.status_code}"
        answer, t1 = r.json(), time.time()
        history = self.versions[name]
        got = answer.get("adapter", {}).get("version", history[0][2])
        k = next((k for k, h in enumerate(history) if h[2] == got), None)
        if k is None:
            return "unknown_version"
        if not self.oracle.check(history[k][3], image, answer):
            return "wrong_answer"
        if history[k][0] > t1 or (k + 1 < len(history) and history[k + 1][1] < t0 - self.stale_allowance_s):
            self.violations.append(f"{name}@{got} answered for a request from {t0:.3f} to {t1:.3f}")
            return "wrong_version"
        return "ok"


def sha12(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


async def run(args: argparse.Namespace, tmp: Path) -> dict:
    """Every phase; the figures as a dict."""
    folder = tmp / "adapters"
    folder.mkdir()
    t = time.perf_counter()
    adapters = make_adapters(folder, args.small, args.large)
    print(f"wrote {len(adapters)} adapters in {time.perf_counter() - t:.1f} s", flush=True)
    names = sorted(adapters)
    images = sample_images(64, seed=3)
    driver = Driver(args.clients, images, Oracle(images))
    driver.versions = {n: [[0.0, 0.0, sha12(folder / f"{n}.safetensors"), a]] for n, a in adapters.items()}
    zipf = zipf_choices(names, 2_000_000)
    stub = start_stub(tmp / "stub.log", args.stub_latency)
    out: dict = {}
    D = args.duration

    async def zipf_load(url: str, seconds: float) -> dict:
        return (await closed_loop(args.clients, seconds, lambda i: driver.one(url, zipf[i % len(zipf)], i))).summary()

    try:
        # 1. one adapter, one server
        single = start_server(folder / "s0000.safetensors", stub.url + "/", tmp / "single.log",
                              "--max-vendor-in-flight", str(args.clients), "--no-access-log")
        await closed_loop(args.clients, 3, lambda i: driver.one(single.url, "s0000", i))
        out["single"] = (await closed_loop(args.clients, D, lambda i: driver.one(single.url, "s0000", i))).summary()
        out["single"]["one_client"] = (await closed_loop(1, 5, lambda i: driver.one(single.url, "s0000", i))).summary()
        out["single"]["rss_mb"] = single.rss_mb()
        single.stop()
        print("single", out["single"]["throughput_rps"], flush=True)

        # 2-3. many adapters, no budget: cold first answers, all loaded, Zipf load
        multi = start_multi(folder, stub.url + "/", tmp / "multi.log")
        url = multi.url + "/v1/adapters"
        out["multi_rss_mb_nothing_loaded"] = multi.rss_mb()
        cold: dict = {}
        for kind, picks in (("10_classes", names[:50]), ("1000_classes", [n for n in names if n[0] == "L"])):
            cold[kind] = {phase: (await each(driver, url, picks, 1)).summary() for phase in ("cold", "warm")}
        out["cold_first_answer"] = cold
        await each(driver, url, names, args.clients)  # every adapter loaded
        listing = httpx.get(url, timeout=30).json()
        out["all_loaded"] = {"rss_mb": multi.rss_mb(), "loaded": sum(a["loaded"] for a in listing["adapters"]),
                             "estimated_mb": listing["loaded_bytes_estimate"] / 2**20}
        out["all_loaded"]["zipf"] = await zipf_load(url, D)
        out["all_loaded"]["rss_mb_after"] = multi.rss_mb()
        estimated_all = listing["loaded_bytes_estimate"]
        multi.stop()
        print("all loaded", out["all_loaded"]["zipf"]["throughput_rps"], flush=True)

        # 4. a budget that holds 10%
        budget_mb = 0.1 * estimated_all / 2**20
        multi = start_multi(folder, stub.url + "/", tmp / "budget.log", budget_mb=budget_mb)
        url = multi.url + "/v1/adapters"
        row = {"budget_mb": budget_mb, "zipf": await zipf_load(url, D), "rss_mb": multi.rss_mb()}
        row["store_events"] = _events(httpx.get(multi.url + "/metrics").text)
        row["loaded_at_end"] = sum(a["loaded"] for a in httpx.get(url, timeout=30).json()["adapters"])
        out["budget_10pct"] = row
        multi.stop()
        print("budget", row["zipf"]["throughput_rps"], flush=True)

        # 5. hot reload under load
        poll_s = 0.5
        multi = start_multi(folder, stub.url + "/", tmp / "reload.log", poll_s=poll_s)
        url = multi.url + "/v1/adapters"
        driver.stale_allowance_s = poll_s + 1.0
        popular = list(dict.fromkeys(zipf[:20000]))[:100]
        writer = threading.Thread(target=_replace, args=(folder, popular, driver, adapters, D))
        writer.start()
        load = await zipf_load(url, D)
        writer.join()
        text = httpx.get(multi.url + "/metrics").text
        out["hot_reload"] = {"replaced_files": sum(len(v) - 1 for v in driver.versions.values()), "zipf": load,
                             "violations": driver.violations[:10],
                             "store_events": _events(text), "rss_mb": multi.rss_mb(), "poll_s": poll_s}
        multi.stop()
    finally:
        await driver.close()
        stub.stop()
    return out


async def each(driver: Driver, url: str, names: list[str], concurrency: int) -> LoadResult:
    """One request per name, ``concurrency`` at a time; latencies and outcomes."""
    result, queue, started = LoadResult(), list(reversed(names)), time.monotonic()

    async def worker() -> None:
        while queue:
            name = queue.pop()
            t0 = time.perf_counter()
            outcome = await driver.one(url, name, len(queue))
            if outcome == "ok":
                result.latencies.append(time.perf_counter() - t0)
            result.outcomes[outcome] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.monotonic() - started
    return result


def _replace(folder: Path, names: list[str], driver: Driver, adapters: dict[str, Adapter], seconds: float) -> None:
    """Replace each of ``names`` once, spread over ``seconds``: new weights and class order."""
    gap = 0.8 * seconds / len(names)
    time.sleep(0.1 * seconds)
    for k, name in enumerate(names):
        old = adapters[name]
        new = variant(synthetic_adapter(old.n_classes, seed=10_000 + k), 10_000 + k)
        import hashlib

        entry = [time.time(), float("inf"), hashlib.sha256(new.to_bytes()).hexdigest()[:12], new]
        driver.versions[name].append(entry)  # known before the server can see it
        new.save(folder / f"{name}.safetensors")  # written aside, then renamed over the old file
        entry[1] = time.time()
        time.sleep(gap)


def _events(metrics_text: str) -> dict[str, float]:
    return {line.split("{")[1].split("}")[0]: float(line.split()[-1]) for line in metrics_text.splitlines()
            if line.startswith("craft_adapter_adapter_events_total{")}


def show(out: dict) -> None:
    """Print the side-by-side table."""
    print(f"\n{'':34}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'RSS MB':>9}")
    rows = [("single adapter", out["single"], out["single"]["rss_mb"]),
            ("1,020 adapters, all loaded", out["all_loaded"]["zipf"], out["all_loaded"]["rss_mb_after"]),
            ("budget 10%", out["budget_10pct"]["zipf"], out["budget_10pct"]["rss_mb"]),
            ("hot reload (100 files replaced)", out["hot_reload"]["zipf"], out["hot_reload"]["rss_mb"])]
    for name, x, rss in rows:
        print(f"{name:34}{x['throughput_rps']:9.1f}{x['p50_ms']:9.2f}{x['p99_ms']:9.2f}{x['errors']:8d}{rss:9.1f}")
    for kind, r in out["cold_first_answer"].items():
        print(f"first answer, {kind}: cold p50 {r['cold']['p50_ms']:.2f} ms (p99 {r['cold']['p99_ms']:.2f}), "
              f"warm p50 {r['warm']['p50_ms']:.2f} ms; one client on the single server p50 "
              f"{out['single']['one_client']['p50_ms']:.2f} ms")
    h = out["hot_reload"]
    print(f"hot reload: {h['replaced_files']} files replaced, outcomes {h['zipf']['outcomes']}, "
          f"violations {len(h['violations'])}, store events {h['store_events']}")


def main() -> None:
    """Parse flags; serve (``--serve``) or run every phase, print and save."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per load phase")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--stub-latency", type=float, default=0.02)
    ap.add_argument("--small", type=int, default=1000, help="10-class adapters")
    ap.add_argument("--large", type=int, default=20, help="1,000-class adapters")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/multi_adapter_load.json"))
    ap.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run a multi-adapter server on this folder
    ap.add_argument("--vendor", help=argparse.SUPPRESS)
    ap.add_argument("--budget-mb", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--poll-s", type=float, default=2.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_main(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = asyncio.run(run(args, Path(tmp)))
    show(out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "adapters": {"10_classes": args.small, "1000_classes": args.large}, "clients": args.clients,
        "duration_s": args.duration, "stub_latency_s": args.stub_latency, "zipf_s": 1.1, "cpus": os.cpu_count(),
        "python": sys.version.split()[0], "platform": platform.platform(), "results": out}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
