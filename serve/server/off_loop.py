"""Work that must not stall the event loop runs in worker threads that give the CPU to the loop first.

Decoding images and parsing big bodies run in anyio's worker threads, off the event loop. On a machine with few
cores those threads still compete with the loop for CPU time. At equal priority, a burst of decodes (an
attacker's image bombs, or a client's batch of big photos) delays every other request, ``/healthz`` included,
by whole scheduler time slices: under the attack mix on 2 cores, ``/healthz`` p99 was about 190 ms while the loop
itself was busy a third of the time. So a worker thread lowers its own priority once, by :data:`WORKER_NICE`
(Linux nice is per thread). The scheduler then runs the loop first whenever it is ready, and the workers still
get every cycle the loop leaves. Where the OS has no per-thread priority this changes nothing.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from anyio import to_thread

T = TypeVar("T")
WORKER_NICE = 5  # CFS weight 335 against the loop's 1024: the loop first, the workers not starved
_thread = threading.local()


def lower_this_thread() -> None:
    """Lower the calling thread's CPU priority by :data:`WORKER_NICE`, once per thread (Linux only)."""
    if getattr(_thread, "lowered", False) or not sys.platform.startswith("linux"):
        return
    _thread.lowered = True
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WORKER_NICE))
    except OSError:  # not permitted in some sandboxes: the work still runs, at the loop's priority
        pass


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread that yields the CPU to the event loop."""
    def run() -> T:
        lower_this_thread()
        return fn(*args)

    return await to_thread.run_sync(run)
