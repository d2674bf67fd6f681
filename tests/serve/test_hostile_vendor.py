"""The adapter server (a real ``craft-adapter serve`` process) in front of a hostile vendor on loopback: gzip bombs
and endless replies (its peak RSS stays under 512 MB, /healthz keeps answering), redirects to a listener that
records whether the key reached it, a key echoed in every encoding across the 200-character cut, a key in the
vendor URL's query, and a sigmoid vendor in front of a softmax adapter. No 500 anywhere."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from conftest import random_images
from server_process import ServerProcess

from craft_adapter.artifact.synthetic import synthetic_adapter
from craft_adapter.testing.hostile_replies import echo_form
from craft_adapter.testing.stub_vendor import StubVendor, running_stub, stub_probabilities

# isort: split
from craft_adapter.serve.server.metrics import ServerMetrics
from craft_adapter.serve.server.settings import ServerConfig
from craft_adapter.serve.server.vendor_pool import VendorFailure, ZeroShotVendorClient

NAMES = ["ant", "bee", "cat", "dog"]
KEY = "sk-live-7Qz+w/Xa9_Lm3Np0Rt5Vb8Yc2Hd6Jf4K=="
ARGS = ["--port", "0", "--vendor-timeout", "10", "--request-timeout", "30", "--retries", "2", "--backoff", "0.01"]
RSS_LIMIT_MB = 512


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    random_images(1, seed=seed)[0].save(buf, format="PNG")
    return buf.getvalue()


def proc_mb(pid: int, field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture(scope="module")
def stub() -> Iterator[StubVendor]:
    with running_stub() as s:
        yield s


@pytest.fixture(autouse=True)
def calm(stub: StubVendor) -> Iterator[None]:
    yield
    stub.fault_rate, stub.script, stub.scores = 0.0, [], "softmax"


@pytest.fixture(scope="module")
def adapter_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    a = synthetic_adapter(len(NAMES), seed=5)
    a.class_names = list(NAMES)
    return a.save(tmp_path_factory.mktemp("a") / "a.safetensors")


@pytest.fixture(scope="module")
def server(adapter_path: Path, stub: StubVendor, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess([str(adapter_path), "--vendor", stub.url + "/", *ARGS],
                        tmp_path_factory.mktemp("log") / "server.log", env={"CRAFT_VENDOR_API_KEY": KEY})
    yield srv
    srv.stop()


def classify(server: ServerProcess, seed: int = 0) -> httpx.Response:
    return httpx.post(server.url + "/v1/classify", content=png(seed), headers={"Content-Type": "image/png"},
                      timeout=60)


@pytest.fixture(scope="module")
def hostile_stub_process() -> Iterator[str]:
    """The stub vendor in its own process (its 600 MB writes must not share a GIL with the /healthz poller),
    answering every call with a gzip bomb or an endless reply (``/`` and ``/endless`` via ``--faults``)."""
    procs = []
    urls = []
    for kind in ("gzip_bomb", "endless"):
        proc = subprocess.Popen([sys.executable, "-m", "craft_adapter.testing.stub_vendor", "--fault-rate", "1",
                                 "--faults", kind, "--bomb-mb", "600"], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        urls.append(proc.stdout.readline().split(" at ")[1].strip())
    try:
        yield dict(zip(("gzip_bomb", "endless"), urls, strict=True))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


@pytest.mark.parametrize("kind", ["gzip_bomb", "endless"])
def test_bombs_and_endless_replies_leave_the_server_small_and_healthy(
        adapter_path: Path, hostile_stub_process: dict[str, str], kind: str, tmp_path: Path) -> None:
    srv = ServerProcess([str(adapter_path), "--vendor", hostile_stub_process[kind] + "/", *ARGS],
                        tmp_path / "server.log", env={"CRAFT_VENDOR_API_KEY": KEY})
    try:
        classify(srv)  # the stub builds its bomb once
        base = proc_mb(srv.proc.pid, "VmRSS")
        health: list[float] = []
        statuses: list[int] = []
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                statuses.append(httpx.get(srv.url + "/healthz", timeout=10).status_code)
                health.append(time.perf_counter() - t0)
                time.sleep(0.01)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            with ThreadPoolExecutor(16) as pool:  # 48 requests, 3 vendor calls each: 144 x 600 MB offered
                answers = list(pool.map(lambda i: classify(srv, i), range(48)))
        finally:
            done.set()
            poller.join()
        peak = proc_mb(srv.proc.pid, "VmHWM")
    finally:
        srv.stop()
    p99 = float(np.percentile(health, 99)) * 1000
    print(f"\n{kind}: server RSS {base:.0f} MB before, peak {peak:.0f} MB; /healthz p99 {p99:.0f} ms, "
          f"max {max(health) * 1000:.0f} ms over {len(health)} polls")
    assert {r.status_code for r in answers} == {502}  # a clear error, never a 500
    assert all("limit" in r.json()["error"] for r in answers)
    assert peak < RSS_LIMIT_MB
    assert set(statuses) == {200} and max(health) < 5.0  # on a 2-core machine shared with other jobs
    assert KEY not in json.dumps([r.text for r in answers])


def test_a_redirect_is_refused_and_the_key_stays_home(server: ServerProcess, stub: StubVendor) -> None:
    seen: list[str] = []

    async def listen() -> tuple[asyncio.AbstractServer, int]:
        async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append((await reader.read(65536)).decode("latin-1"))
            writer.close()
        srv = await asyncio.start_server(record, "127.0.0.1", 0)
        return srv, srv.sockets[0].getsockname()[1]

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    listener, port = asyncio.run_coroutine_threadsafe(listen(), loop).result()
    try:
        for status in (301, 302, 303, 307, 308):
            stub.redirect_to, stub.redirect_status, stub.script = f"http://127.0.0.1:{port}/", status, ["redirect"]
            before = sum(stub.calls.values())
            r = classify(server)
            assert r.status_code == 502 and f"HTTP {status}" in r.json()["error"]
            assert "never followed" in r.json()["error"]
            assert sum(stub.calls.values()) - before == 1  # not retried either
        time.sleep(0.2)
        assert seen == []
    finally:
        loop.call_soon_threadsafe(listener.close)
        loop.call_soon_threadsafe(loop.stop)


def windows(text: str, form: str, width: int) -> list[str]:
    return [form[i:i + width] for i in range(len(form) - width + 1) if form[i:i + width] in text]


@pytest.mark.parametrize("encoding", ["raw", "base64", "base64url", "basic", "bearer_base64", "urlencoded", "json"])
def test_an_echoed_key_never_reaches_the_client(server: ServerProcess, stub: StubVendor, encoding: str) -> None:
    stub.echo_encoding = encoding
    form = echo_form(KEY, encoding)
    for pad in range(150, 216, 3):
        stub.echo_pad, stub.script = pad, ["echo"]
        r = classify(server)
        assert r.status_code == 502 and "HTTP 401" in r.json()["error"]
        assert not windows(r.text, KEY, 8) and not windows(r.text, form, 12), r.text
    assert KEY not in server.log() and base64.b64encode(KEY.encode()).decode() not in server.log()


def test_a_key_in_the_vendor_query_is_scrubbed_from_echoes(adapter_path: Path, stub: StubVendor,
                                                           tmp_path: Path) -> None:
    srv = ServerProcess([str(adapter_path), "--vendor", f"{stub.url}/?api_key={quote(KEY, safe='')}", *ARGS],
                        tmp_path / "server.log")
    try:
        stub.echo_encoding = "query"
        for pad in (0, 190, 195, 199, 200):
            stub.echo_pad, stub.script = pad, ["echo"]
            r = classify(srv)
            assert r.status_code == 502 and "HTTP 401" in r.json()["error"]
            assert not windows(r.text, KEY, 8), r.text
        assert not windows(srv.log(), KEY, 8)
    finally:
        srv.stop()


def test_a_sigmoid_vendor_before_a_softmax_adapter_is_one_call_and_a_clear_502(server: ServerProcess,
                                                                             stub: StubVendor) -> None:
    stub.scores = "sigmoid"
    before = sum(stub.calls.values())
    r = classify(server, seed=99)
    assert r.status_code == 502 and "sigmoid" in r.json()["error"]
    assert sum(stub.calls.values()) - before == 1


def test_a_sigmoid_adapter_is_served_in_front_of_a_sigmoid_vendor(stub: StubVendor, tmp_path: Path) -> None:
    a = synthetic_adapter(len(NAMES), logit_kind="independent_probabilities", seed=6)
    a.class_names = list(NAMES)
    path = a.save(tmp_path / "sigmoid.safetensors")
    srv = ServerProcess([str(path), "--vendor", stub.url + "/", *ARGS], tmp_path / "server.log",
                        env={"CRAFT_VENDOR_API_KEY": KEY})
    try:
        stub.scores = "sigmoid"
        r = classify(srv, seed=3)
        assert r.status_code == 200, r.text
        image = png(3)
        raw = stub_probabilities(base64.b64encode(image).decode(), NAMES, "sigmoid")[None]
        want = a.refine(raw)[0]
        assert r.json()["label"] == NAMES[int(want.argmax())]
    finally:
        srv.stop()


def test_the_pool_reads_a_sigmoid_kind_and_checks_softmax_first(stub: StubVendor) -> None:
    stub.scores = "sigmoid"
    image = base64.b64encode(png(3)).decode()

    async def run() -> tuple[np.ndarray, VendorFailure]:
        config = ServerConfig(adapter="unused.safetensors", vendor_url=stub.url + "/", vendor_retries=3,
                              backoff_base_s=0.0)
        client = ZeroShotVendorClient(config, NAMES, "a {}", ServerMetrics())
        try:
            deadline = time.monotonic() + 20
            scores = await client.scores(image, deadline, kind="independent_probabilities")
            with pytest.raises(VendorFailure) as refused:
                await client.scores(image, deadline)  # softmax: the adapter's default kind
            return scores, refused.value
        finally:
            await client.aclose()

    scores, refused = asyncio.run(run())
    np.testing.assert_allclose(scores, stub_probabilities(image, NAMES, "sigmoid"), rtol=1e-6)
    assert refused.type == "vendor_rejected" and "sigmoid" in refused.message
