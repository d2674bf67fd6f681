"""No reference cycle keeps a refused request's body (the server collects young objects only every 10,000
allocations, :mod:`craft_adapter.serve.server.heap`, so a cycle would hold it long after): the route wrapper cuts
the failure's traceback, which otherwise closes a cycle with the frames that hold the body when the failure came
from a worker thread (anyio keeps it in a future those frames hold), as an image refused by its check does."""

from __future__ import annotations

import asyncio

import anyio.to_thread
from gc_cycles import held_only_by_cycles, no_collections  # noqa: F401 (an autouse fixture)
from starlette.requests import Request

# isort: split
from craft_adapter.serve.server.failures import guarded
from craft_adapter.serve.server.inputs import ApiError
from craft_adapter.serve.server.metrics import ServerMetrics


class Body(bytearray):
    """A request body that can be watched with a weak reference."""


def bodies_in_cycles() -> list[int]:
    """Sizes of the bodies that only a reference cycle still holds (what the next collection would free)."""
    return [len(r) for r in held_only_by_cycles(lambda r: isinstance(r, Body))]


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
        response = await guarded(handler, ServerMetrics())(request)
        await anyio.to_thread.run_sync(int)  # the worker thread's next job: it lets go of the refused one's future
        return response.status_code

    assert asyncio.run(go()) == 415
    assert bodies_in_cycles() == []
