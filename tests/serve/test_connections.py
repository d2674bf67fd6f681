"""A real uvicorn server on loopback under idle sockets, slow heads and too many requests (connections module)."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time

import pytest

SERVER = """
import asyncio, sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from craft_adapter.serve.server import connections
from craft_adapter.serve.server.connections import InFlightLimit

class Protocol(getattr(connections, sys.argv[1])):
    head_timeout_s = 2.0
    max_connections = 300

async def ok(request):
    return JSONResponse({"ok": True})

async def slow(request):
    await asyncio.sleep(1.0)
    return JSONResponse({"ok": True})

app = Starlette(routes=[Route("/healthz", ok), Route("/work", ok), Route("/slow", slow)])
app.add_middleware(InFlightLimit, limit=2)
sock = __import__("socket").socket(); sock.bind(("127.0.0.1", 0)); sock.listen(4096)
print(sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(app, http=Protocol, log_level="error", backlog=4096)).run(sockets=[sock])
"""


@pytest.fixture(scope="module", params=["GuardedH11Protocol", "GuardedHttpToolsProtocol"])
def port(request: pytest.FixtureRequest):
    """The guard on each of uvicorn's HTTP/1.1 parsers (the server uses httptools' where it is installed)."""
    proc = subprocess.Popen([sys.executable, "-c", SERVER, request.param], stdout=subprocess.PIPE, text=True)
    try:
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, dict, float]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, {**dict(r.getheaders()), "body": r.read().decode()}, time.perf_counter() - t0
    finally:
        conn.close()


def test_idle_sockets_cannot_take_the_server_down(port: int) -> None:
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(1200)]  # 4x the connection cap
    try:
        time.sleep(0.5)  # the server accepts the flood from its listen queue
        times = [get(port, "/healthz")[2] for _ in range(20)]
        status, _, _ = get(port, "/work")
        assert status == 200
        assert sorted(times)[10] < 0.1 and max(times) < 2.0, times  # 20 health checks under 1,200 idle sockets
        closed = 0
        for s in idle:  # the server closed the oldest idle ones to make room
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
        assert closed >= 1200 - 300
    finally:
        for s in idle:
            s.close()


def test_sockets_opened_together_are_not_all_closed_together(port: int) -> None:
    # head deadlines are jittered: a flood's sockets time out over a while, not in one burst that holds the loop
    import select

    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
    closed_at: dict[int, float] = {}
    try:
        deadline = time.monotonic() + 6.0  # the 2 s deadline plus its jitter, with room for a loaded machine
        while len(closed_at) < len(idle) and time.monotonic() < deadline:
            ready, _, _ = select.select([s for s in idle if s.fileno() not in closed_at], [], [], 0.05)
            for s in ready:
                if s.recv(1) == b"":
                    closed_at[s.fileno()] = time.monotonic()
    finally:
        for s in idle:
            s.close()
    assert len(closed_at) == len(idle)
    assert max(closed_at.values()) - min(closed_at.values()) > 0.1  # spread over up to 0.4 s (20% of 2 s)


def test_a_head_sent_one_byte_at_a_time_is_cut_off(port: int) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    t0 = time.perf_counter()
    try:
        for b in b"GET /work HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            s.sendall(bytes([b]))
            time.sleep(0.1)
    except (BrokenPipeError, ConnectionResetError):
        pass
    s.settimeout(2)
    try:
        assert s.recv(1024) == b""  # closed without an answer
    except ConnectionResetError:
        pass
    assert time.perf_counter() - t0 < 5.0  # about the 2 s head deadline, not the 13 s the trickle would take
    s.close()


def test_excess_requests_get_a_json_503_and_health_still_answers(port: int) -> None:
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(6) as pool:
        slow = [pool.submit(get, port, "/slow") for _ in range(5)]
        time.sleep(0.3)
        health = get(port, "/healthz")
        results = [f.result() for f in slow]
    assert health[0] == 200
    assert sorted(r[0] for r in results) == [200, 200, 503, 503, 503]
    refused = next(r for r in results if r[0] == 503)[1]
    assert json.loads(refused["body"])["type"] == "overloaded" and refused["retry-after"] == "1"


def test_the_server_serves_with_the_c_parser_when_it_is_installed() -> None:
    from craft_adapter.serve.server.connections import GuardedHttpToolsProtocol, guarded_protocol

    pytest.importorskip("httptools")  # the server extra installs it
    assert guarded_protocol() is GuardedHttpToolsProtocol
