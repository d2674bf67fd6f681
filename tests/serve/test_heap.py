"""The server's garbage-collector settings (:mod:`craft_adapter.serve.server.heap`), in a fresh process so this
test session's own collector is left as it was."""

from __future__ import annotations

import json
import subprocess
import sys

SETTLE = r"""
import gc, json, time
from craft_adapter.serve.server.heap import YOUNG_THRESHOLD, settle_heap

startup = [{"n": i, "peer": [i]} for i in range(200_000)]  # what startup leaves: libraries, adapters, sessions
def full_collection_ms():
    t = time.perf_counter()
    gc.collect()
    return 1000 * (time.perf_counter() - t)

before = min(full_collection_ms() for _ in range(3))
settle_heap()
after = min(full_collection_ms() for _ in range(3))
print(json.dumps({"before_ms": before, "after_ms": after, "frozen": gc.get_freeze_count(),
                  "young": gc.get_threshold()[0], "want_young": YOUNG_THRESHOLD}))
"""


def test_startup_objects_leave_every_later_collection() -> None:
    done = subprocess.run([sys.executable, "-c", SETTLE], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["frozen"] >= 400_000  # the 200,000 dicts and their lists, and the libraries'
    assert got["young"] == got["want_young"] > 700
    assert got["after_ms"] < got["before_ms"] / 5, got  # a full collection no longer walks them
