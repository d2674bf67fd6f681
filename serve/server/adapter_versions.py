"""The versions of a folder (or registry file) of adapters: scanned, checked, snapshotted, swapped in atomically.

- **Names.** In a folder, an adapter is every ``NAME.safetensors`` or ``NAME.onnx`` (dot files and other
  suffixes are ignored, so write ``x.safetensors.tmp`` and rename it). A registry is a JSON file
  ``{"adapters": {"NAME": "path", ...}}`` (relative paths are relative to it). Names are ``[A-Za-z0-9._-]``.
- **Versions.** A version is the sha256 of the file's bytes, shown as its first 12 hex digits.
- **Hot reload.** :meth:`VersionTable.refresh` stats every file and reads only those whose size or mtime
  changed. New bytes are checked (header, tensors, metadata, servable in front of the server's vendor) and
  copied into a content-addressed snapshot folder *before* they become current, in one assignment under a
  lock. A bad file is refused with an error log line and the old version stays current. Snapshots are
  immutable, so a version's bytes never change under it, and the last ``keep_versions`` versions of a name
  stay loadable after its file moves on. A removed file removes the name (its retained versions stay pinnable).
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anyio import to_thread

from craft_adapter.artifact.adapter_file import Adapter, AdapterError, read_adapter_bytes
from craft_adapter.artifact.onnx_check import check_refiner_onnx
from craft_adapter.serve.server.logs import SERVER_LOGGER
from craft_adapter.serve.server.service import servable_problem

SUFFIXES = (".safetensors", ".onnx")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VERSION_CHARS = 12
# a loaded adapter's resident memory, measured with RSS over 300 (10 classes) and 20 (1,000 classes) loads, each
# run once (onnxruntime 1 thread, CPU): 211 KiB for a 22 KB file and 6.5-6.7 MiB for a 2.07 MB one, i.e. a fixed
# session cost plus about 3.3 times the file (nearly all refiner weights: the ONNX bytes, the session's copy and
# its first run's buffers)
SESSION_OVERHEAD_BYTES = 140 << 10
WEIGHT_FACTOR = 3.3
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


def check_adapter_bytes(raw: bytes, suffix: str, source: str, vendor: Any = None) -> tuple[list[str], str]:
    """Class names and template of adapter bytes, after every check (servable in front of ``vendor``, None: the
    zero-shot client; see :func:`.service.servable_problem`); :class:`AdapterError` if bad."""
    if suffix == ".onnx":
        fields = check_refiner_onnx(raw, source)
        names, template, mode, kind = list(fields["class_names"]), fields["template"], fields["mode"], \
            fields["logit_kind"]
        head_dim = fields["head_dim"]
    else:
        a = Adapter.from_bytes(raw, source)
        names, template, mode, kind, head_dim = a.class_names, a.template, a.mode, a.logit_kind, a.head_dim
    problem = servable_problem(mode, kind, source, vendor, head_dim)
    if problem:
        raise AdapterError(problem)
    return names, template


async def poll_forever(table: VersionTable, every_s: float) -> None:
    """Hot reload: :meth:`VersionTable.tick` every ``every_s`` seconds on a worker thread, until cancelled."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await to_thread.run_sync(table.tick)
        except Exception:  # e.g. the registry is being rewritten: keep serving what is known, say why
            log.exception("adapter refresh failed; serving the versions known")


class VersionTable:
    """Every adapter name's current and retained versions, refreshed from the folder or registry file."""

    def __init__(self, root: str | Path, keep_versions: int = 3, snapshot_dir: str | Path | None = None) -> None:
        self.root, self.keep_versions = Path(root), max(1, keep_versions)
        if not self.root.exists():
            raise AdapterError(f"{self.root} does not exist; --adapters takes a folder of adapter files or a "
                               "registry JSON file")
        self._own_snapshots = snapshot_dir is None
        self.snapshots = Path(snapshot_dir or tempfile.mkdtemp(prefix="craft-adapter-versions-"))
        self.snapshots.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards the tables (refresh runs on a worker thread)
        self._stats: dict[str, tuple[int, int]] = {}  # path -> (mtime_ns, size) last read
        self._hash_of: dict[str, str] = {}  # path -> sha256 last read (good or bad)
        self._current: dict[str, Version] = {}
        self._history: dict[str, list[Version]] = {}  # name -> retained versions, oldest first
        self.on_event: Callable[[str, str], None] = lambda kind, outcome: None  # metrics hook
        self.vendor: Any = None  # what every version must be servable in front of (None: the zero-shot client)

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
                names, template = check_adapter_bytes(raw, path.suffix, str(path), self.vendor)
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


    def tick(self) -> None:
        """One poll: pick up new, changed and removed files."""
        self.refresh()

    def lookup(self, name: str) -> tuple[Version | None, list[Version]]:
        """The current version of ``name`` (None if it has none) and its retained versions, oldest first."""
        with self._lock:
            return self._current.get(name), list(self._history.get(name, []))

    def snapshot(self) -> tuple[dict[str, Version], dict[str, list[Version]]]:
        """Copies of the current versions and the retained ones, by name."""
        with self._lock:
            return dict(self._current), {n: list(v) for n, v in self._history.items()}

    def known(self) -> int:
        """Number of adapters with a current version."""
        with self._lock:
            return len(self._current)

    def close(self) -> None:
        """Remove the snapshot folder if this table made it."""
        if self._own_snapshots:
            shutil.rmtree(self.snapshots, ignore_errors=True)
