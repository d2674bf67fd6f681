"""CPU per vendor call of the server's HTTP client, aiohttp as vendor_pool.py uses it now beside httpx as it used it
before, on loopback.

    .venv/bin/python benchmarks/vendor_client_cost.py [--seconds 20] [--concurrency 64] [--latency 0.02]
        [--rounds 2] [--out benchmarks/results/vendor_client_cost.json]

The stub vendor runs in its own process; this process POSTs it the zero-shot request the server sends (the
reference labels, a base64 PNG) from ``--concurrency`` closed loops, through each client in turn, ``--rounds``
times alternated:

- ``httpx``: the server's old path (sharded ``httpx.AsyncClient`` pools of 8, the reply streamed and read under the
  cap and bounded decoding, :func:`_httpx_capped` below, kept here only to be measured);
- ``aiohttp``: the server's path now, :func:`~craft_adapter.vendors.http_limits.send_capped_async` on one session
  of ``--concurrency`` connections that decodes nothing itself;
- ``aiohttp_plain``: the same session with a plain read (what the streamed, capped read costs on top);
- ``vendor_pool``: the whole call as the server makes it, :class:`ZeroShotVendorClient` ``scores()`` (request JSON,
  capped read, score checks, metrics).

It reports this process's CPU time per call for each (the driver loop is the same for all, so differences are the
clients' own cost).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
from serve_common import sample_images, self_cpu_seconds, start_stub

from craft_adapter.reference.task import CLASS_NAMES
from craft_adapter.vendors.http_limits import (
    ACCEPT_ENCODING,
    MAX_ERROR_BYTES,
    READ_CHUNK,
    BodyReader,
    send_capped_async,
    zero_shot_reply_cap,
)
from craft_adapter.vendors.replies import zero_shot_request

# isort: split
from craft_adapter.serve.server.metrics import ServerMetrics
from craft_adapter.serve.server.settings import ServerConfig
from craft_adapter.serve.server.vendor_pool import ZeroShotVendorClient

CLIENTS = ("httpx", "aiohttp", "aiohttp_plain", "vendor_pool")
TEMPLATE = "a photo of a {}."


async def _httpx_capped(client: httpx.AsyncClient, url: str, cap: int, body: bytes) -> tuple[int, bytes]:
    """The server's vendor read before aiohttp (http_limits.send_capped_async on httpx, up to commit d8dc33e)."""
    headers = {"Content-Type": "application/json", "Accept-Encoding": ACCEPT_ENCODING}
    async with client.stream("POST", url, headers=headers, content=body, follow_redirects=False) as r:
        error = r.status_code >= 400
        reader = BodyReader(r.headers.get("Content-Encoding"), MAX_ERROR_BYTES if error else cap, url, error)
        async for chunk in r.aiter_raw(READ_CHUNK):
            reader.feed(chunk)
            if reader.full:
                break
        return r.status_code, reader.finish()


async def run(client: str, url: str, image: str, args: argparse.Namespace) -> dict:
    """``args.seconds`` of closed-loop calls through ``client``; calls, errors and CPU ms per call."""
    calls = errors = 0
    labels = list(CLASS_NAMES)
    cap = zero_shot_reply_cap(labels)
    body = json.dumps(zero_shot_request(image, labels, TEMPLATE)).encode()
    shards = -(-args.concurrency // 8)
    pools = [httpx.AsyncClient(limits=httpx.Limits(max_connections=8, max_keepalive_connections=8))
             for _ in range(shards if client == "httpx" else 0)]
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency), auto_decompress=False,
                                    cookie_jar=aiohttp.DummyCookieJar())
    config = ServerConfig(adapter="unused.safetensors", vendor_url=url, max_vendor_in_flight=args.concurrency)
    pool = ZeroShotVendorClient(config, labels, TEMPLATE, ServerMetrics())
    json_headers = {"Content-Type": "application/json"}

    def valid(status: int, data: bytes) -> bool:
        return status == 200 and len(data) <= cap and len(json.loads(data)) == len(labels)

    async def one(i: int) -> bool:
        if client == "httpx":
            return valid(*await _httpx_capped(pools[i % shards], url, cap, body))
        if client == "aiohttp":
            r = await send_capped_async(session, "POST", url, cap=cap, data=body, headers=json_headers)
            return valid(r.status, r.content)
        if client == "aiohttp_plain":
            async with session.post(url, data=body, headers=json_headers, allow_redirects=False) as r:
                return valid(r.status, await r.content.read(cap + 1))
        return len(await pool.scores(image, time.monotonic() + 30)) == len(labels)

    async def loop(worker: int, stop_at: float) -> None:
        nonlocal calls, errors
        i = worker
        while time.monotonic() < stop_at:
            try:
                ok = await one(i)
            except Exception:  # noqa: BLE001 (a benchmark counts every failure)
                ok = False
            calls += 1
            errors += not ok
            i += args.concurrency

    await asyncio.gather(*(loop(w, time.monotonic() + 2) for w in range(args.concurrency)))  # warm-up
    calls = errors = 0
    cpu0, t0 = self_cpu_seconds(), time.monotonic()
    await asyncio.gather(*(loop(w, t0 + args.seconds) for w in range(args.concurrency)))
    cpu = self_cpu_seconds() - cpu0
    for p in pools:
        await p.aclose()
    await session.close()
    await pool.aclose()
    return {"client": client, "calls": calls, "errors": errors, "calls_per_s": calls / args.seconds,
            "cpu_ms_per_call": 1000 * cpu / max(calls, 1), "load_avg_1min": os.getloadavg()[0]}


def main() -> None:
    """Every client, ``--rounds`` times alternated; printed and saved with the medians."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.02)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/vendor_client_cost.json"))
    args = ap.parse_args()
    image = base64.b64encode(sample_images(1)[0]).decode()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        stub = start_stub(Path(tmp) / "stub.log", args.latency)
        try:
            for _ in range(args.rounds):
                for client in CLIENTS:
                    runs.append(asyncio.run(run(client, stub.url + "/", image, args)))
                    print(json.dumps(runs[-1]), flush=True)
        finally:
            stub.stop()
    medians = {c: statistics.median(r["cpu_ms_per_call"] for r in runs if r["client"] == c) for c in CLIENTS}
    print(json.dumps({"median_cpu_ms_per_call": medians}))
    args.out.write_text(json.dumps({
        "command": f".venv/bin/python benchmarks/vendor_client_cost.py --seconds {args.seconds:g} --rounds "
                   f"{args.rounds}", "concurrency": args.concurrency, "stub_latency_s": args.latency,
        "note": "CPU of the calling process per vendor call (driver loop included, same for all); 2 shared cores",
        "median_cpu_ms_per_call": medians, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
