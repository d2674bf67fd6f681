"""Many adapters behind one server: a folder (or a registry file) of adapter files, versioned, loaded on demand.

- **Names.** In a folder, an adapter is every ``NAME.safetensors`` or ``NAME.onnx`` (dot files and other
  suffixes are ignored, so write ``x.safetensors.tmp`` and rename it). A registry is a JSON file
  ``{"adapters": {"NAME": "path", ...}}`` (relative paths are relative to it). Names are ``[A-Za-z0-9._-]``.
- **Versions.** A version is the sha256 of the file's bytes, shown as its first 12 hex digits. ``NAME@PREFIX``
  (4 or more hex digits) pins one; the bare name gets the current one.
- **Hot reload.** :meth:`AdapterStore.refresh` (run every ``poll_s`` by the server) stats every file and reads
  only those whose size or mtime changed. New bytes are checked (header, tensors, metadata, servable in front
  of a zero-shot vendor) and copied into a content-addressed snapshot folder *before* they become current, in
  one assignment. A bad file is refused with an error log line and the old version keeps serving. Snapshots are
  immutable, so a version's bytes never change under it, and the last ``keep_versions`` versions of a name stay
  pinnable after its file moves on.
- **Loading.** :meth:`acquire` resolves a name and returns a loaded adapter, loading its snapshot on a worker
  thread (once, however many requests ask at the same time). Loaded adapters sit in an LRU bounded by
  ``budget_bytes`` of estimated memory. A request keeps the object it acquired, so a swap or an eviction
  never changes the version a request started with: it finishes on it, and the memory goes when it ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anyio import to_thread

from craft_adapter.artifact.adapter_file import Adapter, AdapterError, read_adapter_bytes
from craft_adapter.artifact.onnx_check import check_refiner_onnx
from craft_adapter.serve.server.inputs import ApiError
from craft_adapter.serve.server.logs import SERVER_LOGGER
from craft_adapter.serve.server.service import AdapterService, servable_problem
from craft_adapter.serve.shipped import ShippedAdapter

SUFFIXES = (".safetensors", ".onnx")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VERSION_CHARS = 12
# a loaded adapter's resident memory, measured with RSS over 300 (10 classes) and 30 (1,000 classes) loads
# (onnxruntime 1 thread, CPU): 151 KiB for a 22 KB file and 5.3 MiB for a 2.07 MB one, i.e. a fixed session
# cost plus about 2.6 times the file (nearly all refiner weights: the ONNX model bytes and the session's copy)
SESSION_OVERHEAD_BYTES = 96 << 10
WEIGHT_FACTOR = 2.6
log = logging.getLogger(SERVER_LOGGER)


def estimated_cost(file_bytes: int) -> int:
    """Estimated resident bytes of one loaded adapter whose file has ``file_bytes`` bytes."""
    return SESSION_OVERHEAD_BYTES + int(WEIGHT_FACTOR * file_bytes)


@dataclass(frozen=True)
class Version:
    """One checked version of an adapter file, kept as an immutable snapshot."""

    name: str
    sha256: str
    snapshot: Path
    source: str
    class_names: tuple[str, ...]
    template: str
    cost: int
    seen_at: float

    @property
    def id(self) -> str:
        """The short version id clients see and pin."""
        return self.sha256[:VERSION_CHARS]

    @property
    def ref(self) -> str:
        """``name@id``: the pinned reference to exactly this version."""
        return f"{self.name}@{self.id}"


@dataclass(frozen=True)
class Loaded:
    """A version with its service (refiner session, shared vendor client): what a request holds to the end."""

    version: Version
    service: AdapterService


def check_adapter_bytes(raw: bytes, suffix: str, source: str) -> tuple[list[str], str]:
    """Class names and template of adapter bytes, after every check; :class:`AdapterError` if bad."""
    if suffix == ".onnx":
        fields = check_refiner_onnx(raw, source)
        names, template, mode, kind = list(fields["class_names"]), fields["template"], fields["mode"], \
            fields["logit_kind"]
    else:
        a = Adapter.from_bytes(raw, source)
        names, template, mode, kind = a.class_names, a.template, a.mode, a.logit_kind
    problem = servable_problem(mode, kind, source)
    if problem:
        raise AdapterError(problem)
    return names, template


class AdapterStore:
    """The adapters of one folder or registry file: versions, snapshots, hot reload and a memory-bounded LRU."""

    def __init__(self, root: str | Path, device: str = "cpu", budget_bytes: int = 0, keep_versions: int = 3,
                 snapshot_dir: str | Path | None = None) -> None:
        self.root, self.device, self.budget_bytes = Path(root), device, budget_bytes
        self.keep_versions = max(1, keep_versions)
        if not self.root.exists():
            raise AdapterError(f"{self.root} does not exist; --adapters takes a folder of adapter files or a "
                               "registry JSON file")
        self._own_snapshots = snapshot_dir is None
        self.snapshots = Path(snapshot_dir or tempfile.mkdtemp(prefix="craft-adapter-versions-"))
        self.snapshots.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards the version tables (refresh runs on a worker thread)
        self._stats: dict[str, tuple[int, int]] = {}  # path -> (mtime_ns, size) last read
        self._hash_of: dict[str, str] = {}  # path -> sha256 last read (good or bad)
        self._current: dict[str, Version] = {}
        self._history: dict[str, list[Version]] = {}  # name -> retained versions, oldest first
        self._lru: OrderedDict[str, Loaded] = OrderedDict()  # sha256 -> loaded (event loop only)
        self._loading: dict[str, asyncio.Future[Loaded]] = {}
        self.loaded_bytes = 0
        self.on_event: Callable[[str, str], None] = lambda kind, outcome: None  # metrics hook
        self.make_service: Callable[[ShippedAdapter], AdapterService] | None = None  # set once the vendor client is

    # -- scanning (worker thread) ---------------------------------------------------------------------------

    def files(self) -> dict[str, Path]:
        """Adapter name -> file, from the folder or the registry; names that collide are refused and logged."""
        if self.root.is_file():
            try:
                listed = json.loads(self.root.read_text())["adapters"]
                pairs = [(str(n), self.root.parent / str(p)) for n, p in listed.items()]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise AdapterError(f"{self.root}: a registry is JSON {{\"adapters\": {{name: path}}}} ({e})") from None
        else:
            pairs = [(e.name.rsplit(".", 1)[0], Path(e.path)) for e in os.scandir(self.root)
                     if e.is_file() and not e.name.startswith(".") and e.name.endswith(SUFFIXES)]
        out: dict[str, Path] = {}
        for name, path in sorted(pairs):
            if not NAME.fullmatch(name):
                log.error("adapter %s refused: a name is [A-Za-z0-9._-], up to 128 characters", path)
            elif name in out:
                log.error("adapter name %s refused for %s: %s has it already", name, path, out[name])
            else:
                out[name] = path
        return out

    def refresh(self) -> list[str]:
        """Pick up new, changed and removed files; the names whose current version changed."""
        changed = []
        files = self.files()
        for name, path in files.items():
            if self._refresh_one(name, path):
                changed.append(name)
        with self._lock:
            gone = [n for n in self._current if n not in files]
            for name in gone:
                source = self._current.pop(name).source  # no new requests; pinned versions stay while retained
                self._stats.pop(source, None)  # the same bytes coming back are a new arrival
                self._hash_of.pop(source, None)
                log.info("adapter %s removed", name, extra={"fields": {"event": "adapter_removed", "adapter": name}})
        return changed + gone

    def _refresh_one(self, name: str, path: Path) -> bool:
        key = str(path)
        try:
            st = path.stat()
        except OSError:
            return False
        stamp = (st.st_mtime_ns, st.st_size)
        if self._stats.get(key) == stamp:
            return False
        self._stats[key] = stamp  # a file that fails is read again only once it changes
        try:
            raw = read_adapter_bytes(path)
        except AdapterError as e:
            log.error("adapter %s refused: %s", name, e, extra={"fields": {"event": "adapter_refused"}})
            return False
        sha = hashlib.sha256(raw).hexdigest()
        if self._hash_of.get(key) == sha:
            return False  # touched, same bytes
        self._hash_of[key] = sha
        with self._lock:
            known = next((v for v in self._history.get(name, []) if v.sha256 == sha), None)
        if known is None:
            try:
                names, template = check_adapter_bytes(raw, path.suffix, str(path))
            except AdapterError as e:
                old = self._current.get(name)
                keeps = f"; version {old.id} keeps serving" if old else ""
                log.error("adapter %s refused: %s%s", name, e, keeps,
                          extra={"fields": {"event": "adapter_refused", "adapter": name}})
                self.on_event("reload", "refused")
                return False
            snapshot = self.snapshots / f"{sha}{path.suffix}"
            tmp = snapshot.with_name(snapshot.name + ".tmp")
            tmp.write_bytes(raw)
            tmp.replace(snapshot)
            known = Version(name, sha, snapshot, str(path), tuple(names), template,
                            estimated_cost(len(raw)), time.time())
        with self._lock:
            old = self._current.get(name)
            self._current[name] = known  # the swap: one assignment, under the lock readers take
            history = [v for v in self._history.get(name, []) if v.sha256 != sha] + [known]
            dropped, self._history[name] = history[:-self.keep_versions], history[-self.keep_versions:]
        for v in dropped:
            v.snapshot.unlink(missing_ok=True)
        log.info("adapter %s now at version %s%s", name, known.id, f" (was {old.id})" if old else "",
                 extra={"fields": {"event": "adapter_version", "adapter": name, "version": known.id}})
        if old is not None:
            self.on_event("reload", "ok")
        return True

    # -- resolving and loading (event loop) -----------------------------------------------------------------

    def resolve(self, ref: str) -> Version:
        """The version ``name`` or ``name@prefix`` refers to now; :class:`ApiError` 404/400 if none."""
        name, _, pin = ref.partition("@")
        with self._lock:
            current, history = self._current.get(name), list(self._history.get(name, []))
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
        except (AdapterError, OSError) as e:
            self.on_event("load", "failed")
            log.error("adapter %s version %s failed to load: %s", version.name, version.id, e,
                      extra={"fields": {"event": "adapter_load_failed", "adapter": version.name}})
            raise ApiError(503, "adapter_unavailable", f"{version.ref} cannot be loaded; see the server log") from None
        loaded = Loaded(version, self.make_service(adapter))
        if not cache:
            return loaded
        self._lru[version.sha256] = loaded
        self.loaded_bytes += version.cost
        while self.budget_bytes and self.loaded_bytes > self.budget_bytes and len(self._lru) > 1:
            _, evicted = self._lru.popitem(last=False)  # requests holding it finish on it
            self.loaded_bytes -= evicted.version.cost
            self.on_event("evict", "ok")
        self.on_event("load", "ok")
        log.debug("loaded %s in %.1f ms", version.ref, 1000 * (time.perf_counter() - started))
        return loaded

    # -- describing -----------------------------------------------------------------------------------------

    def listing(self) -> list[dict[str, object]]:
        """Every adapter: name, current version, retained versions, classes and which versions are loaded."""
        with self._lock:
            current, history = dict(self._current), {n: list(v) for n, v in self._history.items()}
        loaded = {s for s in self._lru}
        rows = []
        for name in sorted(current):
            v = current[name]
            rows.append({"name": name, "version": v.id, "classes": len(v.class_names), "source": Path(v.source).name,
                         "versions": [{"version": h.id, "loaded": h.sha256 in loaded} for h in history[name]],
                         "loaded": v.sha256 in loaded})
        return rows

    def known(self) -> int:
        """Number of adapters with a current version."""
        with self._lock:
            return len(self._current)

    def loaded_count(self) -> int:
        """Number of versions loaded now."""
        return len(self._lru)

    def close(self) -> None:
        """Drop loaded adapters and remove the snapshot folder if this store made it."""
        self._lru.clear()
        self.loaded_bytes = 0
        if self._own_snapshots:
            shutil.rmtree(self.snapshots, ignore_errors=True)
