"""No reference cycle keeps a refused request's body (the server collects young objects only every 10,000
allocations, :mod:`craft_adapter.serve.server.heap`, so a cycle would hold it long after): the route wrapper cuts
the failure's traceback, which otherwise closes a cycle with the frames that hold the body when the failure came
from a worker thread (anyio keeps it in a future those frames hold), as an image refused by its check does."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import anyio.to_thread
import pytest
from starlette.requests import Request

# isort: split
from craft_adapter.serve.server.http_app import _guarded
from craft_adapter.serve.server.inputs import ApiError
from craft_adapter.serve.server.metrics import ServerMetrics


class Body(bytearray):
    """A request body that can be watched with a weak reference."""


@pytest.fixture(autouse=True)
def no_collections() -> Iterator[None]:
    gc.collect()
    gc.disable()
    yield
    gc.set_debug(0)
    gc.garbage.clear()
    gc.enable()


def bodies_in_cycles() -> list[int]:
    """Sizes of the bodies that only a reference cycle still holds (what the next collection would free)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    return [len(r) for o in gc.garbage for r in gc.get_referents(o) if isinstance(r, Body)]


def refuse(body: Body) -> None:
    raise ApiError(415, "unsupported_image", f"{len(body)} bytes of junk")


async def in_worker_thread(body: Body) -> None:
    await anyio.to_thread.run_sync(refuse, body)


def test_no_cycle_keeps_a_body_refused_in_a_worker_thread() -> None:
    async def handler(request: Request) -> None:
        body = Body(1 << 20)
        await in_worker_thread(body)

    async def go() -> int:
        request = Request({"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""})
        response = await _guarded(handler, ServerMetrics())(request)
        await anyio.to_thread.run_sync(int)  # the worker thread's next job: it lets go of the refused one's future
        return response.status_code

    assert asyncio.run(go()) == 415
    assert bodies_in_cycles() == []
