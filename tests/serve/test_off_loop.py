"""Work moved off the event loop runs in threads that give the CPU to the loop first (off_loop module)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from craft_adapter.serve.server.off_loop import WORKER_NICE, off_loop


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is a Linux feature")
def test_off_loop_work_runs_below_the_loop_and_returns_its_answer() -> None:
    async def main() -> tuple[int, list[tuple[int, int]]]:
        seen = [await off_loop(lambda x: (threading.get_native_id(), _nice() + x), 0) for _ in range(5)]
        return _nice(), seen

    loop_nice, seen = asyncio.run(main())
    assert all(n == min(19, loop_nice + WORKER_NICE) for _, n in seen)  # lowered once, not once per call
    assert threading.get_native_id() not in {tid for tid, _ in seen}  # and never on the loop's own thread


def test_off_loop_passes_errors_through() -> None:
    def fails() -> None:
        raise ValueError("bad image")

    with pytest.raises(ValueError, match="bad image"):
        asyncio.run(off_loop(fails))
