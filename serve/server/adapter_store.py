"""Many adapters behind one server: the versions of a folder (or registry file), loaded on demand in an LRU.

Names, versions, snapshots and hot reload are :mod:`.adapter_versions`'. Here: ``NAME`` means the current
version and ``NAME@PREFIX`` (4 or more hex digits of the sha256) pins one, among the retained versions and
the loaded ones. :meth:`AdapterStore.acquire` resolves a reference and returns the loaded version, loading
its snapshot on a worker thread (once, however many requests ask at the same time). Loaded versions sit in
an LRU bounded by ``budget_bytes`` of estimated memory (:func:`.adapter_versions.estimated_cost`). A request
keeps the object it acquired, so a swap or an eviction never changes the version a request started with: it
finishes on it, and the memory goes when it ends (so in-flight requests can briefly hold evicted versions
beyond the budget).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anyio import to_thread

from craft_adapter.artifact.adapter_file import AdapterError
from craft_adapter.serve.server.adapter_versions import Version, VersionTable, poll_forever
from craft_adapter.serve.server.inputs import ApiError
from craft_adapter.serve.server.logs import SERVER_LOGGER
from craft_adapter.serve.server.service import ServedAdapter
from craft_adapter.serve.shipped import ShippedAdapter

__all__ = ["AdapterStore", "Loaded", "Version", "poll_forever"]
log = logging.getLogger(SERVER_LOGGER)
_malloc_trim: Any = None  # None: not looked up yet; False: not glibc


def release_freed_memory() -> None:
    """glibc's ``malloc_trim(0)``: without it, loading and evicting sessions on worker threads left RSS near its
    peak (a churn of 4,000 loads held 520 MB for 30 loaded adapters; trimmed, 123 MB). A no-op elsewhere."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


@dataclass(frozen=True)
class Loaded:
    """A version with its service (refiner session, shared vendor client): what a request holds to the end."""

    version: Version
    service: ServedAdapter


class AdapterStore(VersionTable):
    """The adapters of one folder or registry file, loaded on demand into a memory-bounded LRU."""

    def __init__(self, root: str | Path, device: str = "cpu", budget_bytes: int = 0, keep_versions: int = 3,
                 snapshot_dir: str | Path | None = None, vendor: Any = None) -> None:
        super().__init__(root, keep_versions, snapshot_dir)
        self.device, self.budget_bytes = device, budget_bytes
        self.vendor = vendor  # what the adapters must be servable in front of (None: the zero-shot client)
        self._lru: OrderedDict[str, Loaded] = OrderedDict()  # sha256 -> loaded (event loop only)
        self._loading: dict[str, asyncio.Future[Loaded]] = {}
        self.loaded_bytes = 0
        self._evicted = False  # since the last tick
        self.make_service: Callable[[ShippedAdapter], ServedAdapter] | None = None  # set once the vendor client is

    # -- resolving and loading (event loop) -----------------------------------------------------------------

    def resolve(self, ref: str) -> Version:
        """The version ``name`` or ``name@prefix`` refers to now; :class:`ApiError` 404/400 if none."""
        name, _, pin = ref.partition("@")
        current, history = self.lookup(name)
        if not pin:
            if current is None:
                raise ApiError(404, "unknown_adapter", f"no adapter named {name!r}; GET /v1/adapters lists them")
            return current
        if not re.fullmatch(r"[0-9a-f]{4,64}", pin):
            raise ApiError(400, "bad_version", f"a version is 4 to 64 lowercase hex digits, got {pin!r}")
        found = {v.sha256: v for v in history if v.sha256.startswith(pin)}
        found.update({s: x.version for s, x in self._lru.items() if x.version.name == name and s.startswith(pin)})
        if len(found) > 1:
            raise ApiError(400, "ambiguous_version", f"{ref} matches {len(found)} versions; give more digits")
        if not found:
            raise ApiError(404, "unknown_version", f"{name} has no version {pin} (any more); GET /v1/adapters "
                           "lists the versions kept")
        return next(iter(found.values()))

    async def acquire(self, ref: str) -> Loaded:
        """The loaded adapter for ``ref``, loading it if needed and evicting past the memory budget."""
        version = self.resolve(ref)
        hit = self._lru.get(version.sha256)
        if hit is not None:
            self._lru.move_to_end(version.sha256)
            return hit
        pending = self._loading.get(version.sha256)
        if pending is None:
            pending = asyncio.ensure_future(self._load(version))
            self._loading[version.sha256] = pending
            pending.add_done_callback(lambda _: self._loading.pop(version.sha256, None))
        return await asyncio.shield(pending)  # a client that leaves does not cancel others' load

    async def load(self, version: Version) -> Loaded:
        """``version`` loaded afresh and not cached here (for a caller that keeps its own cache, e.g. Ray)."""
        return await self._load(version, cache=False)

    async def _load(self, version: Version, cache: bool = True) -> Loaded:
        if self.make_service is None:
            raise ApiError(503, "not_ready", "the server is starting or stopping")
        started = time.perf_counter()
        try:
            adapter = await to_thread.run_sync(ShippedAdapter.load, version.snapshot, self.device)
            service = self.make_service(adapter)  # refuses an adapter its vendor cannot serve
        except (AdapterError, OSError) as e:
            self.on_event("load", "failed")
            log.error("adapter %s version %s failed to load: %s", version.name, version.id, e,
                      extra={"fields": {"event": "adapter_load_failed", "adapter": version.name}})
            raise ApiError(503, "adapter_unavailable", f"{version.ref} cannot be loaded; see the server log") from None
        loaded = Loaded(version, service)
        if not cache:
            return loaded
        self._lru[version.sha256] = loaded
        self.loaded_bytes += version.cost
        while self.budget_bytes and self.loaded_bytes > self.budget_bytes and len(self._lru) > 1:
            _, evicted = self._lru.popitem(last=False)  # requests holding it finish on it
            self.loaded_bytes -= evicted.version.cost
            self._evicted = True
            self.on_event("evict", "ok")
        self.on_event("load", "ok")
        log.debug("loaded %s in %.1f ms", version.ref, 1000 * (time.perf_counter() - started))
        return loaded

    # -- describing -----------------------------------------------------------------------------------------

    def listing(self) -> list[dict[str, object]]:
        """Every adapter: name, current version, retained versions, classes and which versions are loaded."""
        current, history = self.snapshot()
        loaded = set(self._lru)
        rows = []
        for name in sorted(current):
            v = current[name]
            rows.append({"name": name, "version": v.id, "classes": len(v.class_names), "source": Path(v.source).name,
                         "versions": [{"version": h.id, "loaded": h.sha256 in loaded} for h in history[name]],
                         "loaded": v.sha256 in loaded})
        return rows

    def tick(self) -> None:
        """One poll: pick up file changes, and hand memory freed by evictions back to the system."""
        super().tick()
        if self._evicted:
            self._evicted = False
            release_freed_memory()

    def loaded_count(self) -> int:
        """Number of versions loaded now."""
        return len(self._lru)

    def close(self) -> None:
        """Drop loaded adapters and remove the snapshot folder if this store made it."""
        self._lru.clear()
        self.loaded_bytes = 0
        super().close()
