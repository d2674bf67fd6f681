"""The cyclic garbage collector, set for a server: the heap it starts with frozen, young collections less often.

Each request allocates a few thousand container objects (ASGI scopes and messages, h11 events, aiohttp's request
and response, JSON documents), almost none of them in a reference cycle, so reference counting frees them. Yet
CPython runs a young collection every 700 allocations, and every so often a full one that walks every object
the process holds, most of them loaded at startup (the libraries, the adapter, the onnxruntime session). Under
64 clients (``benchmarks/server_soak.py``) collections took about a fifth of the server's CPU and found almost
nothing to free. Here:

- :func:`settle_heap` runs after startup: one full collection, then ``gc.freeze()`` moves what survives into a
  permanent generation that no later collection walks;
- the young generation's threshold is raised (:data:`YOUNG_THRESHOLD`), so collections come less often, each over
  more objects. Cyclic garbage then waits a little longer to be freed: it is a few objects per thousand requests.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000  # CPython's default is 700


def settle_heap() -> None:
    """Collect once, freeze the survivors out of every later collection, and collect young objects less often."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
