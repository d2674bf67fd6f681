"""The server's vendor client (:mod:`craft_adapter.serve.server.vendor_pool`) on its aiohttp session, against real
sockets on loopback: a proxy the environment names is used, a connect that hangs is "unreachable" and not a
timeout, calls cancelled mid-reply leave the pool usable, and the session lives and dies with the event loop."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import random_images

from craft_adapter.testing.stub_vendor import StubVendor, running_stub, stub_probabilities

# isort: split
from craft_adapter.serve.server.metrics import ServerMetrics
from craft_adapter.serve.server.settings import ServerConfig
from craft_adapter.serve.server.vendor_pool import VendorFailure, ZeroShotVendorClient, env_proxy

LABELS = ["ant", "bee", "cat"]


def image_b64(seed: int) -> str:
    buf = io.BytesIO()
    random_images(1, seed=seed)[0].save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def stub() -> Iterator[StubVendor]:
    with running_stub() as s:
        yield s


def config(url: str, **kw: object) -> ServerConfig:
    return ServerConfig(adapter="unused.safetensors", vendor_url=url, backoff_base_s=0.0, **kw)


def test_the_environment_names_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    assert env_proxy("https://vendor.example/zs") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert env_proxy("https://vendor.example/zs") == "http://proxy.internal:3128"
    assert env_proxy("http://vendor.example/zs") is None  # an http URL needs HTTP_PROXY
    monkeypatch.setenv("ALL_PROXY", "http://all.internal:3128")
    assert env_proxy("http://vendor.example/zs") == "http://all.internal:3128"
    monkeypatch.setenv("NO_PROXY", "vendor.example")
    assert env_proxy("https://vendor.example/zs") is None


def test_calls_go_through_the_proxy_the_environment_names(stub: StubVendor, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stub, named as the proxy, answers a vendor whose host does not even resolve."""
    monkeypatch.setenv("HTTP_PROXY", stub.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    image = image_b64(1)

    async def go() -> np.ndarray:
        client = ZeroShotVendorClient(config("http://vendor.invalid/zs"), LABELS, "a {}", ServerMetrics())
        try:
            return await client.scores(image, time.monotonic() + 10)
        finally:
            await client.aclose()

    np.testing.assert_allclose(asyncio.run(go()), stub_probabilities(image, LABELS), rtol=1e-6)


def test_a_connect_that_hangs_is_unreachable_not_a_timeout() -> None:
    """A listener that never accepts, its backlog full: the kernel drops further SYNs, so a connect hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue (its length is backlog + 1 on Linux)
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.2)

        async def go() -> VendorFailure:
            client = ZeroShotVendorClient(config(f"http://127.0.0.1:{port}/", vendor_timeout_s=0.5, vendor_retries=0),
                                          LABELS, "{}", ServerMetrics())
            try:
                with pytest.raises(VendorFailure) as failure:
                    await client.scores(image_b64(2), time.monotonic() + 10)
                return failure.value
            finally:
                await client.aclose()

        started = time.monotonic()
        failure = asyncio.run(go())
        assert failure.type == "vendor_unreachable" and "connect timed out" in failure.message
        assert time.monotonic() - started < 3
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_calls_cancelled_mid_reply_leave_the_pool_usable(stub: StubVendor) -> None:
    """Two connections at most; calls abandoned while the vendor answers (a batch sibling failed, the client left)
    must not strand them, or every later call waits for the request's whole deadline."""
    stub.latency_s = 0.3
    metrics = ServerMetrics()

    async def go() -> list[np.ndarray]:
        client = ZeroShotVendorClient(config(stub.url + "/", max_vendor_in_flight=2), LABELS, "{}", metrics)
        try:
            for round_ in range(3):
                calls = [asyncio.create_task(client.scores(image_b64(round_), time.monotonic() + 10))
                         for _ in range(4)]
                await asyncio.sleep(0.1)
                for c in calls:
                    c.cancel()
                await asyncio.gather(*calls, return_exceptions=True)
            stub.latency_s = 0.0
            async with asyncio.timeout(5):
                return await asyncio.gather(*(client.scores(image_b64(i), time.monotonic() + 5) for i in range(4)))
        finally:
            await client.aclose()

    answers = asyncio.run(go())
    for i, scores in enumerate(answers):
        np.testing.assert_allclose(scores, stub_probabilities(image_b64(i), LABELS), rtol=1e-6)
    assert metrics.vendor_calls.value("cancelled") == 6 and metrics.vendor_calls.value("ok") == 4  # 2 per round
    assert metrics.vendor_in_flight.value == 0


def test_the_session_is_made_in_the_running_loop_and_closed_with_it(stub: StubVendor) -> None:
    client = ZeroShotVendorClient(config(stub.url + "/"), LABELS, "{}", ServerMetrics())  # no loop yet: fine
    image = image_b64(3)
    for _ in range(2):  # a new loop each time (asyncio.run): the client follows it
        async def go() -> np.ndarray:
            try:
                return await client.scores(image, time.monotonic() + 10)
            finally:
                await client.aclose()
        np.testing.assert_allclose(asyncio.run(go()), stub_probabilities(image, LABELS), rtol=1e-6)
