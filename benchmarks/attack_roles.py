"""The attacker's and the observer's processes of ``server_attacks.py``; each returns its figures as a dict."""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from collections import Counter
from urllib.parse import urlsplit

import attack_clients as ac
import httpx
import numpy as np
from serve_common import sample_images, stub_expected

from craft_adapter.artifact.adapter_file import Adapter

WELL_BEHAVED_CLIENTS = 4
VENDOR_CARRIERS = 16  # extra honest clients whose vendor calls meet the hostile replies
PROBE_EVERY_S = 0.05
PROBE_TIMEOUT_S = 5.0
ATTACKS = {"baseline": (), "idle": ("idle",), "slowloris": ("slowloris",), "slow_body": ("slow_body",),
           "bombs": ("bombs",), "deep_json": ("deep_json",), "oversized": ("oversized",), "vendor": ("vendor",),
           "mix": ("idle", "slowloris", "slow_body", "bombs", "deep_json", "oversized", "vendor")}


async def _wait_until(start_at: float) -> float:
    await asyncio.sleep(max(start_at - time.time(), 0.0))
    return time.monotonic()


def _ms(values: list[float]) -> dict:
    a = np.array(values) * 1000 if values else np.array([np.nan])
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


async def _probe(host: str, port: int) -> float | None:
    """Seconds for GET /healthz on a fresh connection, or None if it failed or took past the timeout."""
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                data = await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
    return time.perf_counter() - t0 if data.startswith(b"HTTP/1.1 200") else None


def verdict(r: httpx.Response, want: str) -> str:
    """``correct``, ``clear_error:<type>`` (a 4xx/5xx with the server's JSON error) or ``wrong:<why>``."""
    if r.status_code != 200:
        try:
            doc = r.json()
            return f"clear_error:{r.status_code}:{doc['type']}" if doc.get("error") else f"wrong:http_{r.status_code}"
        except (ValueError, KeyError, AttributeError):
            return f"wrong:http_{r.status_code}_not_json"
    return "correct" if r.json().get("label") == want else "wrong:answer"


async def _honest(client: httpx.AsyncClient, url: str, images: list[bytes], want: list[str], stop_at: float,
                  worker: int, step: int, tally: Counter, latencies: list[float] | None) -> None:
    i = worker
    while time.monotonic() < stop_at:
        t0 = time.perf_counter()
        try:
            r = await client.post(url + "/v1/classify", content=images[i % len(images)],
                                  headers={"Content-Type": "image/png"})
            outcome = verdict(r, want[i % len(images)])
        except Exception as e:  # noqa: BLE001 (a benchmark counts every failure, whatever it is)
            outcome = f"exception:{type(e).__name__}"
        tally[outcome] += 1
        if latencies is not None and outcome == "correct":
            latencies.append(time.perf_counter() - t0)
        i += step


def _honest_setup(tmp) -> tuple[list[bytes], list[str]]:  # noqa: ANN001
    adapter = Adapter.load(tmp / "adapter.safetensors")  # written by the orchestrator before any phase
    images = sample_images(64, seed=5)
    return images, [adapter.class_names[int(stub_expected(adapter, im).argmax())] for im in images]


async def observe_role(args: argparse.Namespace) -> dict:
    """/healthz every 50 ms on a fresh connection, and four well-behaved clients with checked answers."""
    images, want = _honest_setup(args.tmp)
    parts = urlsplit(args.url)
    probes: list[float | None] = []
    started: list[float] = []  # each probe's start, seconds into the phase
    tally: Counter[str] = Counter()
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=60) as client:
        t0 = await _wait_until(args.start_at)
        stop_at = t0 + args.duration

        async def prober() -> None:
            tick = time.monotonic()
            while time.monotonic() < stop_at:
                started.append(time.monotonic() - t0)
                probes.append(await _probe(parts.hostname, parts.port))
                tick += PROBE_EVERY_S
                await asyncio.sleep(max(tick - time.monotonic(), 0.0))

        await asyncio.gather(prober(), *(_honest(client, args.url, images, want, stop_at, w, WELL_BEHAVED_CLIENTS,
                                                 tally, latencies) for w in range(WELL_BEHAVED_CLIENTS)))
    ok = [p for p in probes if p is not None]
    n = sum(tally.values())
    slowest = sorted(((p or PROBE_TIMEOUT_S, t) for p, t in zip(probes, started, strict=True)), reverse=True)[:10]
    return {"healthz": {"probes": len(probes), "failed": len(probes) - len(ok), **_ms(ok),
                        "slowest": [{"at_s": round(t, 2), "ms": round(p * 1000, 1)} for p, t in slowest]},
            "well_behaved": {"clients": WELL_BEHAVED_CLIENTS, "requests": n, "correct": tally["correct"],
                             "success_rate": tally["correct"] / max(n, 1), **_ms(latencies),
                             "outcomes": dict(tally)}}


async def attack_role(args: argparse.Namespace) -> dict:
    """The phase's attacks, until the phase ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 2,000+ sockets
    parts = urlsplit(args.url)
    host, port = parts.hostname, parts.port
    files = ac.make_bombs(args.tmp)
    tally = ac.Tally()
    clients: list[httpx.AsyncClient] = []
    carrier_tally: Counter[str] = Counter()
    t0 = await _wait_until(args.start_at)
    stop_at = t0 + args.duration
    jobs = []
    for name in ATTACKS[args.phase]:
        if name in ("idle", "slowloris", "slow_body"):
            jobs += getattr(ac, name)(host, port, stop_at, tally)
        elif name == "bombs":
            jobs += ac.bombs(args.url, stop_at, tally, files, clients)
        elif name in ("deep_json", "oversized"):
            jobs += getattr(ac, name)(args.url, stop_at, tally, clients)
        else:  # vendor: honest requests whose vendor calls meet the stub's hostile replies
            images, want = _honest_setup(args.tmp)
            c = httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=VENDOR_CARRIERS))
            clients.append(c)
            jobs += [_honest(c, args.url, images, want, stop_at, w, VENDOR_CARRIERS, carrier_tally, None)
                     for w in range(VENDOR_CARRIERS)]
    try:
        await asyncio.gather(*jobs)
    finally:
        for c in clients:
            await c.aclose()
    tally.outcomes.update({f"vendor_carrier:{k}": v for k, v in carrier_tally.items()})
    return {"outcomes": dict(tally.outcomes), "held_s": _ms(tally.held_s) if tally.held_s else None,
            "sockets_dropped_by_server": len(tally.held_s)}
