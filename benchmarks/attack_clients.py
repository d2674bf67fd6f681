"""Attack clients for ``server_attacks.py``: bounded coroutines against one loopback server, each counting outcomes.

Every attack runs until ``stop_at`` (``time.monotonic()``) and then ends by itself. Outcomes are counted as
``"<kind>:<what happened>"``: ``http_<status>:<error type>`` for an answer, ``closed_by_server`` for a socket the
server closed without answering, ``open_at_end`` for one still held when the attack stopped, and
``exception:<name>`` for a client-side failure.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

BOMB_SIDE = 6320  # 6320 x 6320 = 39.9 M pixels, just under the server's 40 M-pixel limit
DEEP = 100_000


@dataclass
class Tally:
    """What an attack saw: outcome counts and how long the server let held sockets live."""

    outcomes: Counter[str] = field(default_factory=Counter)
    held_s: list[float] = field(default_factory=list)


def make_bombs(folder: Path) -> dict[str, Path]:
    """All-zero WebP and PNG images of 39.9 M pixels (a few KB each), written once into ``folder``."""
    paths = {"webp": folder / "bomb.webp", "png": folder / "bomb.png"}
    if not all(p.exists() for p in paths.values()):
        im = Image.new("RGB", (BOMB_SIDE, BOMB_SIDE))
        im.save(paths["webp"], format="WEBP", lossless=True, quality=0, method=0)
        im.save(paths["png"], format="PNG", compress_level=9)
    return paths


async def _hold_once(host: str, port: int, head: bytes, trickle: bytes | None, stop_at: float, tally: Tally,
                     kind: str) -> None:
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        tally.outcomes[f"{kind}:connect_error:{type(e).__name__}"] += 1
        await asyncio.sleep(0.5)
        return
    read = asyncio.ensure_future(reader.read(512))
    try:
        if head:
            writer.write(head)
        while time.monotonic() < stop_at:
            done, _ = await asyncio.wait({read}, timeout=min(1.0, max(stop_at - time.monotonic(), 0.01)))
            if done:
                data = read.result() if not read.exception() else b""
                status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else None
                tally.outcomes[f"{kind}:http_{status}" if status else f"{kind}:closed_by_server"] += 1
                tally.held_s.append(time.monotonic() - t0)
                return
            if trickle is not None and not writer.is_closing():
                writer.write(trickle)  # one byte a second
        tally.outcomes[f"{kind}:open_at_end"] += 1
    finally:
        read.cancel()
        writer.close()


async def held_sockets(host: str, port: int, n: int, head: bytes, trickle: bytes | None, stop_at: float,
                       tally: Tally, kind: str) -> None:
    """``n`` sockets that send ``head`` then ``trickle`` each second; each reconnects once the server drops it."""
    async def one(i: int) -> None:
        await asyncio.sleep(i * 0.002)  # a connect storm, but not one SYN burst past the backlog
        while time.monotonic() < stop_at:
            await _hold_once(host, port, head, trickle, stop_at, tally, kind)

    await asyncio.gather(*(one(i) for i in range(n)))


def idle(host: str, port: int, stop_at: float, tally: Tally, n: int = 2000) -> list:
    """(a) ``n`` TCP connections that never send a byte."""
    return [held_sockets(host, port, n, b"", None, stop_at, tally, "idle")]


def slowloris(host: str, port: int, stop_at: float, tally: Tally, n: int = 100) -> list:
    """(b) ``n`` connections sending a request head one byte a second."""
    head = b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    return [held_sockets(host, port, n, head, b"a", stop_at, tally, "slowloris")]


def slow_body(host: str, port: int, stop_at: float, tally: Tally, n: int = 100) -> list:
    """(c) ``n`` requests declaring a 1 MB body and sending it one byte a second."""
    head = (b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000000\r\n\r\n")
    return [held_sockets(host, port, n, head, b"\x89", stop_at, tally, "slow_body")]


async def _posting(client: httpx.AsyncClient, url: str, stop_at: float, tally: Tally, kind: str,
                   **request: object) -> None:
    while time.monotonic() < stop_at:
        try:
            body = request.get("content")
            kwargs = {**request, "content": body()} if callable(body) else request
            r = await client.post(url, **kwargs)
            kind_of = ""
            if r.status_code >= 400:
                try:
                    kind_of = ":" + str(r.json().get("type"))
                except ValueError:
                    kind_of = ":not_json"
            tally.outcomes[f"{kind}:http_{r.status_code}{kind_of}"] += 1
        except Exception as e:  # noqa: BLE001 (an attack counts every failure, whatever it is)
            tally.outcomes[f"{kind}:exception:{type(e).__name__}"] += 1
            await asyncio.sleep(0.05)


def _client(n: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))


def bombs(url: str, stop_at: float, tally: Tally, files: dict[str, Path], clients: list) -> list:
    """(d) 16 clients posting 39.9 M-pixel WebP and PNG files of a few KB, and batches of 16 of them."""
    webp, png = files["webp"].read_bytes(), files["png"].read_bytes()
    c = _client(18)
    clients.append(c)
    batch = {k: [("file", (f"{i}.{k}", data, f"image/{k}")) for i in range(16)]
             for k, data in (("webp", webp), ("png", png))}
    return [*(_posting(c, url + "/v1/classify", stop_at, tally, "bomb_webp", content=webp,
                       headers={"Content-Type": "image/webp"}) for _ in range(8)),
            *(_posting(c, url + "/v1/classify", stop_at, tally, "bomb_png", content=png,
                       headers={"Content-Type": "image/png"}) for _ in range(8)),
            *(_posting(c, url + "/v1/classify/batch", stop_at, tally, f"bomb_batch16_{k}", files=batch[k])
              for k in ("webp", "png"))]


def deep_json(url: str, stop_at: float, tally: Tally, clients: list) -> list:
    """(e) JSON nested 100,000 deep, to the classify, batch and Hugging Face endpoints."""
    nested = b"[" * DEEP + b"]" * DEEP
    c = _client(6)
    clients.append(c)
    bodies = {"/v1/classify": b'{"image": ' + nested + b"}", "/v1/classify/batch": b'{"images": ' + nested + b"}",
              "/": b'{"inputs": "x", "parameters": ' + nested + b"}"}
    return [_posting(c, url + path, stop_at, tally, f"deep_json{path}", content=body,
                     headers={"Content-Type": "application/json"})
            for path, body in bodies.items() for _ in range(2)]


async def _chunks(total: int) -> AsyncIterator[bytes]:
    block = b"\0" * (1 << 20)
    for _ in range(total >> 20):
        yield block


def oversized(url: str, stop_at: float, tally: Tally, clients: list, max_body: int = 16 << 20) -> list:
    """(f) bodies over the limit (declared, and chunked without a length), and many just under it that are junk."""
    over = b"\0" * (max_body + (1 << 20))
    junk = b"\1" * (max_body - (64 << 10))
    b64_junk = b'{"image": "' + b"A" * (max_body - (64 << 10)) + b'"}'
    c = _client(24)
    clients.append(c)
    return [*(_posting(c, url + "/v1/classify", stop_at, tally, "over_declared", content=over,
                       headers={"Content-Type": "image/png"}) for _ in range(2)),
            *(_posting(c, url + "/v1/classify", stop_at, tally, "over_chunked",
                       content=lambda: _chunks(max_body + (2 << 20)), headers={"Content-Type": "image/png"})
              for _ in range(2)),
            *(_posting(c, url + "/v1/classify", stop_at, tally, "near_limit_raw", content=junk,
                       headers={"Content-Type": "image/png"}) for _ in range(16)),
            *(_posting(c, url + "/v1/classify", stop_at, tally, "near_limit_json", content=b64_junk,
                       headers={"Content-Type": "application/json"}) for _ in range(4))]
