"""Where a server's time goes, from py-spy's raw (collapsed) stacks: ``py-spy record --format raw --threads``.

    .venv/bin/python benchmarks/profile_summary.py PROFILE.txt

Each sample is charged to the innermost frame that belongs to a known part (uvicorn and its HTTP parser, Starlette,
the server's own middleware and handlers, JSON, PIL, aiohttp (the server's vendor client) or httpx to the vendor,
onnxruntime, logging, the asyncio loop and its socket calls); so a ``json.dumps`` called by Starlette counts as
JSON, and Starlette's own lines as Starlette. Shares are of all samples in Python threads (native onnxruntime
threads are not seen).
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

# first match wins, tested on each frame's file path from the leaf outwards
PARTS = (
    ("onnxruntime", ("onnxruntime/",)),
    ("PIL decode/open", ("PIL/",)),
    ("numpy", ("numpy/",)),
    ("JSON encode/decode", ("/json/",)),
    ("logging (access log)", ("/logging/",)),
    ("server: access middleware", ("serve/server/access.py",)),
    ("server: connections (head deadlines, in-flight)", ("serve/server/connections.py",)),
    ("server: metrics", ("serve/server/metrics.py",)),
    ("server: logs (JSON formatter, scrub)", ("serve/server/logs.py",)),
    ("server: inputs (body, decode budget)", ("serve/server/inputs.py",)),
    ("server: handlers (http_app, service)", ("serve/server/http_app.py", "serve/server/service.py",
                                             "serve/server/adapter_routes.py")),
    ("server: vendor client (pool, retries)", ("serve/server/vendor_pool.py", "craft_adapter/vendors/")),
    ("runtime (shipped adapter refine)", ("craft_adapter/serve/", "/work/main/serve/")),
    ("aiohttp/yarl/multidict (vendor calls)", ("aiohttp/", "aiohappyeyeballs/", "yarl/", "multidict/",
                                              "propcache/")),
    ("httpx/httpcore (vendor calls)", ("httpx/", "httpcore/", "h2/")),
    ("uvicorn, httptools/h11 (HTTP server protocol)", ("uvicorn/", "h11/", "httptools/")),
    ("starlette (routing, request, response)", ("starlette/",)),
    ("anyio (threads, streams)", ("anyio/", "sniffio/")),
    ("asyncio loop, sockets, selectors", ("asyncio/", "selectors.py", "socket.py", "ssl.py")),
    ("threads and queues", ("threading.py", "queue.py", "concurrent/")),
    ("stdlib other", ("<frozen", "python3.11/")),
)
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?):\d+\)$")


def _part(frames: list[str]) -> str:
    for frame in reversed(frames):
        m = FRAME.match(frame)
        if not m:
            continue
        for name, needles in PARTS:
            if any(n in m["file"] for n in needles):
                return name
    return "other"


def summarize(path: Path) -> dict:
    """Shares of samples by part and by thread, and the busiest leaf functions."""
    parts: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    main_parts: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        thread = frames[0].split(": ", 1)[-1] if frames[0].startswith("thread") else "?"
        thread = "MainThread (event loop)" if thread == "MainThread" else "worker threads"
        total += n
        part = _part(frames[1:])
        parts[part] += n
        threads[thread] += n
        if thread.startswith("MainThread"):
            main_parts[part] += n
        m = FRAME.match(frames[-1])
        leaves[f"{m['func']} ({m['file'].split('site-packages/')[-1]})" if m else frames[-1]] += n
    share = lambda c: {k: v / max(total, 1) for k, v in c.most_common()}  # noqa: E731
    return {"samples": total, "by_thread": share(threads), "by_category": share(parts),
            "main_thread_by_category": share(main_parts),
            "top_leaf_functions": [[k, v / max(total, 1)] for k, v in leaves.most_common(25)]}


if __name__ == "__main__":
    print(json.dumps(summarize(Path(sys.argv[1])), indent=1))
