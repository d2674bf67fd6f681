"""Run the craft-adapter CLI with every in-process vendor call counted outside the fit's own accounting.

    python benchmarks/kill_child.py LEDGER fit -o OUT ...

Before each call of ``OpenClipBackend.embed_images``, ``embed_texts`` or ``embed_soft`` (or of
``HttpZeroShotVendor.score``, one HTTP vendor call) starts, one byte is appended to LEDGER with a single
``os.write`` on an ``O_APPEND`` descriptor, so the ledger's size is the number of calls started, and it stays exact
when the process is killed at any instant (the kill test reads it from outside). ``LEDGER.times`` gets a line per
call, the method's name and its start (``time.monotonic``): the scale benchmark reads a generation's steady time
from it.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

COUNTED_METHODS = ("embed_images", "embed_texts", "embed_soft")


def count_calls(ledger_fd: int, times_fd: int | None = None) -> None:
    """Wrap the counted backend methods so each call appends one byte to ``ledger_fd`` before it starts (and its
    name and start time to ``times_fd``)."""
    from craft_adapter.vendors.http_clients import HttpZeroShotVendor
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    def counted(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            os.write(ledger_fd, b".")
            if times_fd is not None:
                os.write(times_fd, f"{method.__name__} {time.monotonic():.6f}\n".encode())
            return method(*args, **kwargs)

        return wrapper

    for name in COUNTED_METHODS:
        setattr(OpenClipBackend, name, counted(getattr(OpenClipBackend, name)))
    HttpZeroShotVendor.score = counted(HttpZeroShotVendor.score)  # a text-mode fit through an HTTP vendor


def main(argv: list[str]) -> None:
    """Open the ledger, wrap the backend, run the CLI with the remaining arguments (exits with its code)."""
    if len(argv) < 2:
        sys.exit("usage: kill_child.py LEDGER COMMAND [ARGS...]")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    count_calls(os.open(argv[0], flags, 0o644), os.open(argv[0] + ".times", flags, 0o644))
    from craft_adapter.cli import app

    app(args=argv[1:], prog_name="craft-adapter")


if __name__ == "__main__":
    main(sys.argv[1:])
