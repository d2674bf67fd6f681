"""No reference cycle keeps a failed batch's images (the server collects young objects only every 10,000
allocations, :mod:`craft_adapter.serve.server.heap`, so a cycle would hold them long after): on Python 3.11 the
task group's exception group and its ``__aexit__`` frame hold each other, and each failed task holds its failure,
whose traceback holds the frame of :meth:`AdapterService.classify` with the batch's base64 images. A real vendor
client against the stub vendor on loopback; with collections off, whatever is left after the failure is dropped
can only be freed by a collection."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from gc_cycles import held_only_by_cycles, no_collections  # noqa: F401 (an autouse fixture)

from craft_adapter.artifact.synthetic import synthetic_adapter
from craft_adapter.testing.stub_vendor import running_stub

# isort: split
from craft_adapter.serve.server.metrics import ServerMetrics
from craft_adapter.serve.server.service import AdapterService
from craft_adapter.serve.server.settings import ServerConfig
from craft_adapter.serve.server.vendor_pool import VendorFailure, ZeroShotVendorClient
from craft_adapter.serve.shipped import ShippedAdapter

IMAGE_BYTES = 300_000  # big enough that nothing else in the heap is this long


def images_in_cycles() -> list[int]:
    """Sizes of the images (raw or base64) that only a reference cycle still holds."""
    return sorted(len(r) for r in held_only_by_cycles(lambda r: isinstance(r, bytes | str) and len(r) >= IMAGE_BYTES))


def test_no_cycle_keeps_a_batch_whose_vendor_call_failed(tmp_path: Path) -> None:
    adapter = synthetic_adapter(3, seed=1)
    shipped = ShippedAdapter.load(adapter.save(tmp_path / "a.safetensors"), device="cpu")

    async def go(stub_url: str) -> str:
        config = ServerConfig(adapter="unused.safetensors", vendor_url=stub_url, vendor_retries=0)
        client = ZeroShotVendorClient(config, shipped.class_names, shipped.template, ServerMetrics())
        service = AdapterService(shipped, client)
        try:
            await service.classify([os.urandom(IMAGE_BYTES) for _ in range(3)], time.monotonic() + 10)
        except VendorFailure as failure:
            return failure.type
        finally:
            await client.aclose()
        return "answered"

    with running_stub() as stub:
        stub.script = ["500"]  # the batch's first call fails; the other two are answered or cancelled
        assert asyncio.run(go(stub.url)) == "vendor_error"
    assert images_in_cycles() == []
