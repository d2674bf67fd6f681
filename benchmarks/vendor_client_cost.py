"""CPU per vendor call of the server's HTTP client (httpx, as vendor_pool.py uses it) beside aiohttp, on loopback.

    .venv/bin/python benchmarks/vendor_client_cost.py [--seconds 20] [--concurrency 64] [--latency 0.02]

The stub vendor runs in its own process; this process POSTs it the zero-shot request the server sends (the
reference labels, a base64 PNG) from ``--concurrency`` closed loops, first through httpx exactly as the server
does (``send_capped_async``: streamed, capped, sharded pools of 8), through the same pools with a plain
``post`` (what the streamed, capped read adds), then through one aiohttp session (capped read), and
reports this process's CPU time per call for each (both are measured with the same driver loop, so the
difference is the client's own cost). It sizes the gain of a leaner vendor client in the server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
from serve_common import sample_images, self_cpu_seconds, start_stub

from craft_adapter.reference.task import CLASS_NAMES
from craft_adapter.vendors.http_limits import send_capped_async, zero_shot_reply_cap
from craft_adapter.vendors.replies import zero_shot_request


async def run(client: str, url: str, body: bytes, args: argparse.Namespace) -> dict:
    """``args.seconds`` of closed-loop calls through ``client``; calls, errors and CPU ms per call."""
    calls = errors = 0
    cap = zero_shot_reply_cap(list(CLASS_NAMES))
    shards = -(-args.concurrency // 8)
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
    pools = [httpx.AsyncClient(limits=limits, headers={"Content-Type": "application/json"}) for _ in range(shards)]
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency))

    async def one(i: int) -> bool:
        if client == "httpx":
            r = await send_capped_async(pools[i % shards], "POST", url, cap=cap, content=body)
            return r.status_code == 200 and len(json.loads(r.content)) == len(CLASS_NAMES)
        if client == "httpx_plain":  # no streamed, capped read: what the reply contract costs on top
            r = await pools[i % shards].post(url, content=body)
            return r.status_code == 200 and len(json.loads(r.content)) == len(CLASS_NAMES)
        async with session.post(url, data=body, headers={"Content-Type": "application/json"},
                                allow_redirects=False) as r:
            data = await r.content.read(cap + 1)
            return r.status == 200 and len(data) <= cap and len(json.loads(data)) == len(CLASS_NAMES)

    async def loop(worker: int, stop_at: float) -> None:
        nonlocal calls, errors
        i = worker
        while time.monotonic() < stop_at:
            ok = await one(i)
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
    return {"client": client, "calls": calls, "errors": errors, "calls_per_s": calls / args.seconds,
            "cpu_ms_per_call": 1000 * cpu / max(calls, 1)}


def main() -> None:
    """Both clients, printed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.02)
    args = ap.parse_args()
    image = base64.b64encode(sample_images(1)[0]).decode()
    body = json.dumps(zero_shot_request(image, list(CLASS_NAMES), "a photo of a {}.")).encode()
    with tempfile.TemporaryDirectory() as tmp:
        stub = start_stub(Path(tmp) / "stub.log", args.latency)
        try:
            for client in ("httpx", "httpx_plain", "aiohttp", "httpx", "httpx_plain", "aiohttp"):
                print(json.dumps(asyncio.run(run(client, stub.url + "/", body, args))), flush=True)
        finally:
            stub.stop()


if __name__ == "__main__":
    main()
