"""The query cache: every paid vendor answer, kept in SQLite, so no answer is ever paid for twice.

An answer is keyed by the backend's identity, what was asked (a template and class list, a text, or a
context-vector hash) and the image's content hash. Values are float32 arrays stored as raw bytes with their
shape: data, never pickle. Kinds named in ``half_kinds`` are kept as float16 (half the bytes) under their own kind
name, so a float32 reader never gets a rounded answer; the fit rounds fresh answers the same way before using
them, so a replayed fit sees what the first one saw. With a cap (:meth:`QueryCache.limit`), the oldest answers
are evicted once the stored answers pass it: first those of backends no fit in this process uses, then those of
this process's backends older than ``protect_since`` (a soft-mode fit moves it to each checkpoint it writes: a
resume never reads the answers before its checkpoint); never image embeddings of those backends, never anything
newer. If what is protected alone passes the cap, the cache grows past it rather than evict what a resume needs.
The database runs in WAL mode and every write is one transaction, so concurrent
writers (threads or processes) are safe and a process killed mid-write leaves the file consistent: the answer
is either stored whole or not at all. ``fit --resume`` replays a killed fit from here.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SCHEMA_VERSION = 1
Key = tuple[str, str]  # (prompt key, image key); either may be "" when the answer does not depend on it

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS backends (id TEXT PRIMARY KEY, identity TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY, backend TEXT NOT NULL, kind TEXT NOT NULL, prompt TEXT NOT NULL, image TEXT NOT NULL,
    shape TEXT NOT NULL, value BLOB NOT NULL, created REAL NOT NULL,
    UNIQUE (backend, kind, prompt, image)
);
"""


_INSERT = ("INSERT OR IGNORE INTO answers (backend, kind, prompt, image, shape, value, created) "
           "VALUES (?, ?, ?, ?, ?, ?, ?)")


class CacheError(RuntimeError):
    """The cache file cannot be used (not a craft-adapter cache, newer schema, unreadable)."""


def digest(*parts: str | bytes) -> str:
    """A short stable hash of ``parts`` (length-prefixed, so different splits never collide)."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()[:32]


def _identity_json(identity: Mapping[str, Any]) -> str:
    return json.dumps(dict(identity), sort_keys=True, default=str)


def backend_key(identity: Mapping[str, Any]) -> str:
    """The cache key of a backend: a hash of its identity (model, weights hash, redacted URL...)."""
    return digest(_identity_json(identity))


def image_key(image: Image.Image) -> str:
    """The content hash of an image: its mode, size and pixels (not the file it came from)."""
    return digest(image.mode, f"{image.size[0]}x{image.size[1]}", image.tobytes())


def array_key(arr: np.ndarray, *context: str) -> str:
    """The hash of a float32 array (a context vector) and any ``context`` strings such as class names."""
    a = np.ascontiguousarray(arr, dtype=np.float32)
    return digest(str(a.shape), a.tobytes(), *context)


class QueryCache:
    """A persistent map from (backend, kind, prompt, image) to a float32 answer; safe across threads and processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise CacheError(f"cache path {self.path} is a folder; give a file path, e.g. {self.path}/cache.sqlite")
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process never loses a commit
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise CacheError(f"{self.path} was written by a newer craft-adapter (cache schema {row[0]}); "
                                 "upgrade, or pass --cache with another path")
        except sqlite3.DatabaseError as e:
            raise CacheError(f"{self.path} is not a usable craft-adapter cache ({e}); move it away or pass "
                             "--cache with another path") from None
        self.corrupt_entries = 0
        self.half_kinds: frozenset[str] = frozenset()
        self.max_bytes: int | None = None
        self.protect_since = float("-inf")
        self.evicted = 0
        self._active: set[str] = set()
        self._total = 0

    @contextmanager
    def _locked(self, action: str) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock; any SQLite failure becomes a :class:`CacheError` that names ``action``."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as e:
                raise CacheError(_explain(self.path, action, e)) from None

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> QueryCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register(self, identity: Mapping[str, Any]) -> str:
        """Record a backend's identity (for ``cache stats``) and return its key."""
        key = backend_key(identity)
        self._active.add(key)
        with self._locked("write to") as db:
            db.execute("INSERT OR IGNORE INTO backends VALUES (?, ?)", (key, _identity_json(identity)))
        return key

    def get(self, backend: str, kind: str, keys: Sequence[Key]) -> dict[Key, np.ndarray]:
        """The stored answers among ``keys``; an entry that does not decode is treated as missing."""
        found: dict[Key, np.ndarray] = {}
        kind = self._stored_kind(kind)
        sql = "SELECT shape, value FROM answers WHERE backend=? AND kind=? AND prompt=? AND image=?"
        with self._locked("read") as db:
            for key in dict.fromkeys(keys):
                row = db.execute(sql, (backend, kind, *key)).fetchone()
                if row is not None:
                    arr = _decode(*row)
                    if arr is None:
                        self.corrupt_entries += 1
                    else:
                        found[key] = arr
        return found

    def put(self, backend: str, kind: str, answers: Mapping[Key, np.ndarray]) -> None:
        """Store ``answers`` in one transaction; the first answer stored for a key stays the answer."""
        now = time.time()
        half = kind in self.half_kinds
        shape = (lambda a: json.dumps({"dtype": "<f2", "shape": list(a.shape)})) if half else (
            lambda a: json.dumps(list(a.shape)))
        rows = [(backend, self._stored_kind(kind), p, i, shape(a), np.ascontiguousarray(a, "<f2" if half else "<f4")
                 .tobytes(), now) for (p, i), a in answers.items()]
        with self._locked("write to") as db:  # disk full, read-only file, locked for longer than the timeout
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(_INSERT, rows)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back already (a full disk does): keep its error
                    db.execute("ROLLBACK")
                raise
        self._total += sum(len(r[5]) for r in rows)
        if self.max_bytes is not None and self._total > self.max_bytes:
            self._evict()

    def _stored_kind(self, kind: str) -> str:
        return kind + "@f16" if kind in self.half_kinds else kind

    def limit(self, max_bytes: int | None, protect_since: float = float("-inf")) -> None:
        """Cap the stored answers at ``max_bytes`` (``None``: no cap); answers of this process's backends created at
        or after ``protect_since`` are never evicted."""
        self.max_bytes, self.protect_since = max_bytes, protect_since
        with self._locked("read") as db:
            self._total = int(db.execute("SELECT COALESCE(SUM(LENGTH(value)), 0) FROM answers").fetchone()[0])
        if max_bytes is not None and self._total > max_bytes:
            self._evict()

    def _evict(self) -> None:
        """Delete the oldest evictable answers until the stored answers fit the cap (see the module docstring)."""
        active = sorted(self._active)
        mine = f"backend IN ({','.join('?' * len(active))})" if active else "0"
        sql = (f"SELECT id, LENGTH(value) FROM answers WHERE NOT ({mine} AND (kind = 'image' OR created >= ?)) "
               f"ORDER BY {mine}, created, id")
        with self._locked("prune") as db:
            self._total = int(db.execute("SELECT COALESCE(SUM(LENGTH(value)), 0) FROM answers").fetchone()[0])
            doomed: list[int] = []
            for row_id, size in db.execute(sql, [*active, self.protect_since, *active]):
                if self._total <= self.max_bytes:
                    break
                doomed.append(row_id)
                self._total -= size
            for i in range(0, len(doomed), 500):
                db.execute(f"DELETE FROM answers WHERE id IN ({','.join('?' * len(doomed[i:i + 500]))})",
                           doomed[i:i + 500])
        self.evicted += len(doomed)

    def stats(self) -> dict[str, Any]:
        """Entries, bytes and age per backend and kind, and the file size on disk."""
        with self._locked("read") as db:
            rows = db.execute(
                "SELECT a.backend, b.identity, a.kind, COUNT(*), SUM(LENGTH(a.value)), MIN(a.created), "
                "MAX(a.created) FROM answers a LEFT JOIN backends b ON a.backend = b.id "
                "GROUP BY a.backend, a.kind ORDER BY a.backend, a.kind").fetchall()
        groups = [{"backend": b, "identity": json.loads(ident) if ident else None, "kind": kind, "entries": n,
                   "value_bytes": size, "oldest": lo, "newest": hi} for b, ident, kind, n, size, lo, hi in rows]
        files = [self.path, self.path.with_name(self.path.name + "-wal")]
        return {"path": str(self.path), "schema_version": SCHEMA_VERSION,
                "entries": sum(g["entries"] for g in groups), "disk_bytes": sum(f.stat().st_size for f in files
                                                                                 if f.exists()),
                "groups": groups}

    def count(self, older_than_s: float | None = None, backends: Iterable[str] = ()) -> int:
        """How many answers :meth:`prune` with the same arguments would delete."""
        where, args = _where(older_than_s, backends)
        with self._locked("read") as db:
            return int(db.execute(f"SELECT COUNT(*) FROM answers WHERE {where}", args).fetchone()[0])

    def prune(self, older_than_s: float | None = None, backends: Iterable[str] = ()) -> int:
        """Delete answers older than ``older_than_s`` seconds and/or of the given backend keys; return how many."""
        where, args = _where(older_than_s, backends)
        with self._locked("prune") as db:
            n = db.execute(f"DELETE FROM answers WHERE {where}", args).rowcount
            db.execute("DELETE FROM backends WHERE id NOT IN (SELECT DISTINCT backend FROM answers)")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.execute("VACUUM")
        return n

    def integrity(self) -> str:
        """SQLite's own integrity check: ``"ok"`` or the first problem found."""
        with self._locked("check") as db:
            return str(db.execute("PRAGMA integrity_check").fetchone()[0])


def _explain(path: Path, action: str, error: sqlite3.Error) -> str:
    """A message for a failed cache operation that says what went wrong in words a user can act on."""
    text = str(error)
    if "full" in text:
        cause = "the disk is full: free some space"
    elif "readonly" in text or "read-only" in text:
        cause = "the file or its folder is read-only: fix the permissions"
    elif isinstance(error, sqlite3.DatabaseError) and ("malformed" in text or "not a database" in text):
        cause = "the file is damaged: move it away (a new cache is started) or restore a copy"
    else:
        cause = "retry, or pass --cache with another path"
    return f"cannot {action} the query cache {path} ({text}); {cause}"


def _where(older_than_s: float | None, backends: Iterable[str]) -> tuple[str, list[Any]]:
    """The WHERE clause selecting answers by age and/or backend key."""
    where: list[str] = []
    args: list[Any] = []
    if older_than_s is not None:
        where.append("created < ?")
        args.append(time.time() - older_than_s)
    backends = list(backends)
    if backends:
        where.append(f"backend IN ({','.join('?' * len(backends))})")
        args += backends
    if not where:
        raise ValueError("say what to prune: an age, a backend, or both")
    return " AND ".join(where), args


def _decode(shape_json: str, blob: bytes) -> np.ndarray | None:
    try:
        spec = json.loads(shape_json)  # [shape...] (float32), or {"dtype": "<f2", "shape": [...]}
        dtype = "<f4" if isinstance(spec, list) else {"<f2": "<f2"}[spec["dtype"]]
        shape = tuple(int(n) for n in (spec if isinstance(spec, list) else spec["shape"]))
    except (ValueError, TypeError, KeyError):
        return None
    size = np.dtype(dtype).itemsize
    if any(n < 0 for n in shape) or int(np.prod(shape, dtype=np.int64)) * size != len(blob):
        return None
    return np.frombuffer(blob, dtype=dtype).reshape(shape).astype(np.float32)


class BackendCache:
    """A :class:`QueryCache` as one backend sees it; with no cache, nothing is found and nothing kept."""

    def __init__(self, cache: QueryCache | None, identity: Mapping[str, Any]) -> None:
        self.cache = cache
        self.backend = cache.register(identity) if cache is not None else backend_key(identity)

    def get(self, kind: str, keys: Sequence[Key]) -> dict[Key, np.ndarray]:
        """The stored answers among ``keys``."""
        return {} if self.cache is None else self.cache.get(self.backend, kind, keys)

    def put(self, kind: str, answers: Mapping[Key, np.ndarray]) -> None:
        """Store ``answers`` (one transaction)."""
        if self.cache is not None and answers:
            self.cache.put(self.backend, kind, answers)
