"""The query cache: round trips, bad files, concurrent writers, writers killed mid-write, stats and prune."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from craft_adapter.blackbox.query_cache import CacheError, QueryCache, array_key, backend_key, digest, image_key
from craft_adapter.cli import app

WRITER = """
import sys, numpy as np
from craft_adapter.blackbox.query_cache import QueryCache
path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with QueryCache(path) as cache:
    for k in range(n):
        cache.put("b", "soft", {(f"{tag}-{k}", ""): np.full((64, 32), k, np.float32)})
        print(k, flush=True)  # printed only once the answer is committed
"""


def test_round_trip_and_first_answer_wins(tmp_path: Path) -> None:
    with QueryCache(tmp_path / "c.sqlite") as cache:
        a = np.arange(12, dtype=np.float32).reshape(3, 4)
        cache.put("b", "soft", {("p", ""): a})
        cache.put("b", "soft", {("p", ""): a + 1})  # a later answer for the same key does not replace it
        got = cache.get("b", "soft", [("p", ""), ("q", "")])
        assert list(got) == [("p", "")]
        np.testing.assert_array_equal(got[("p", "")], a)
        assert got[("p", "")].dtype == np.float32 and got[("p", "")].flags.writeable
        assert cache.get("other-backend", "soft", [("p", "")]) == {}
        assert cache.get("b", "text", [("p", "")]) == {}
    with QueryCache(tmp_path / "c.sqlite") as again:  # it persists
        np.testing.assert_array_equal(again.get("b", "soft", [("p", "")])[("p", "")], a)


def test_keys_tell_apart_what_matters() -> None:
    assert backend_key({"name": "x", "url": "u"}) == backend_key({"url": "u", "name": "x"})
    assert backend_key({"name": "x"}) != backend_key({"name": "y"})
    assert digest("ab", "c") != digest("a", "bc")
    ctx = np.ones((4, 8), np.float32)
    assert array_key(ctx, "cat", "dog") != array_key(ctx, "dog", "cat")
    assert array_key(ctx) != array_key(ctx + 1e-7)
    im = Image.new("L", (8, 8), 3)
    assert image_key(im) == image_key(im.copy()) != image_key(Image.new("L", (8, 8), 4))


def test_a_corrupt_entry_is_a_miss_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with QueryCache(path) as cache:
        cache.put("b", "score", {("p", "i"): np.ones(5, np.float32)})
    with sqlite3.connect(path) as db:
        db.execute("UPDATE answers SET value = x'0102'")
    with QueryCache(path) as cache:
        assert cache.get("b", "score", [("p", "i")]) == {}
        assert cache.corrupt_entries == 1


@pytest.mark.parametrize("content", [b"this is not a database at all, just text" * 100, b""])
def test_bad_files_are_refused_clearly(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "c.sqlite"
    path.write_bytes(content)
    if not content:  # an empty file is a valid empty database: it becomes a cache
        QueryCache(path).close()
        return
    with pytest.raises(CacheError, match="not a usable craft-adapter cache"):
        QueryCache(path)
    assert path.read_bytes() == content  # and it was left alone
    with pytest.raises(CacheError, match="is a folder"):
        QueryCache(tmp_path)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    QueryCache(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(CacheError, match="newer craft-adapter"):
        QueryCache(path)


def _writer(path: Path, tag: str, n: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, str(n)], stdout=subprocess.PIPE, text=True)


def test_concurrent_writer_processes(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    procs = [_writer(path, f"w{j}", 150) for j in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    with QueryCache(path) as cache:
        assert cache.integrity() == "ok"
        keys = [(f"w{j}-{k}", "") for j in range(4) for k in range(150)]
        got = cache.get("b", "soft", keys)
        assert len(got) == 600
        assert all(float(got[(f"w{j}-{k}", "")][0, 0]) == k for j in range(4) for k in range(150))


def test_writers_killed_mid_write_leave_a_sound_file(tmp_path: Path) -> None:
    """SIGKILL a writer at five random moments: every answer it reported committed is there, whole."""
    path = tmp_path / "c.sqlite"
    rng = np.random.default_rng(0)
    committed: list[tuple[str, str]] = []
    for round_ in range(5):
        proc = _writer(path, f"r{round_}", 100_000)
        assert proc.stdout is not None
        deadline = time.monotonic() + float(rng.uniform(0.3, 1.0))
        last = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line:
                last = int(line)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert last is not None, "the writer never committed anything"
        committed += [(f"r{round_}-{k}", "") for k in range(last + 1)]
    with QueryCache(path) as cache:
        assert cache.integrity() == "ok"
        got = cache.get("b", "soft", committed)
        assert len(got) == len(committed) and cache.corrupt_entries == 0


def test_stats_prune_and_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with QueryCache(path) as cache:
        old, new = cache.register({"name": "old-vendor"}), cache.register({"name": "new-vendor"})
        cache.put(old, "score", {(str(k), "i"): np.zeros(3, np.float32) for k in range(5)})
        cache.put(new, "text", {(str(k), ""): np.zeros(8, np.float32) for k in range(7)})
        s = cache.stats()
        assert s["entries"] == 12 and {g["kind"]: g["entries"] for g in s["groups"]} == {"score": 5, "text": 7}
        assert cache.count(backends=[old]) == 5 and cache.count(older_than_s=3600) == 0
        with pytest.raises(ValueError, match="say what to prune"):
            cache.prune()
    runner = CliRunner()
    r = runner.invoke(app, ["cache", "stats", str(path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["entries"] == 12
    r = runner.invoke(app, ["cache", "prune", str(path), "--backend", old[:8], "--dry-run"])
    assert r.exit_code == 0 and "would delete 5 answers" in r.output
    r = runner.invoke(app, ["cache", "prune", str(path), "--backend", old[:8]])
    assert r.exit_code == 0 and "deleted 5 answers" in r.output, r.output
    r = runner.invoke(app, ["cache", "prune", str(path), "--older-than", "0s"])
    assert r.exit_code == 0 and "deleted 7 answers" in r.output, r.output
    bad_args = ((["--backend", "zzz"], "no backend"), (["--older-than", "soon"], "an age is"), ([], "say what"))
    for bad, message in bad_args:
        r = runner.invoke(app, ["cache", "prune", str(path), *bad])
        assert r.exit_code == 2 and message in r.output, r.output
    r = runner.invoke(app, ["cache", "stats", str(tmp_path / "missing.sqlite")])
    assert r.exit_code == 2 and "no cache at" in r.output


def _damage_pages(path: Path) -> None:
    """Overwrite the middle of an SQLite file (past its header page) with garbage."""
    data = bytearray(path.read_bytes())
    data[4096:len(data) - 4096] = b"\xa5" * (len(data) - 8192)
    path.write_bytes(bytes(data))


def test_a_damaged_cache_is_a_clear_error_in_the_library_and_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with QueryCache(path) as cache:
        cache.put("b", "soft", {(f"p{k}", ""): np.full((64, 32), k, np.float32) for k in range(200)})
        cache.prune(backends=["nothing"])  # checkpoints the WAL into the main file
    _damage_pages(path)
    with pytest.raises(CacheError, match="damaged|malformed|not a database"):
        with QueryCache(path) as cache:
            cache.stats()
    for args in (["cache", "stats", str(path)], ["cache", "prune", str(path), "--older-than", "1s"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "malformed" in result.output and "Traceback" not in result.output


def test_a_full_disk_says_so(tmp_path: Path) -> None:
    with QueryCache(tmp_path / "c.sqlite") as cache:
        cache._db.execute("PRAGMA max_page_count = 40")  # a disk that fills up after about 160 KB
        with pytest.raises(CacheError, match="disk is full"):
            for k in range(100):
                cache.put("b", "soft", {(f"p{k}", ""): np.zeros((64, 64), np.float32)})
        assert cache.get("b", "soft", [("p0", "")])  # what was stored before stays readable


def test_half_kinds_store_float16_apart_from_float32_answers(tmp_path: Path) -> None:
    a = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4) / 3
    with QueryCache(tmp_path / "c.sqlite") as cache:
        cache.put("b", "soft", {("k", ""): a})
        cache.half_kinds = frozenset({"soft"})
        assert cache.get("b", "soft", [("k", "")]) == {}  # a float32 answer is never handed to a float16 reader
        cache.put("b", "soft", {("k", ""): a})
        got = cache.get("b", "soft", [("k", "")])[("k", "")]
        assert got.dtype == np.float32 and np.array_equal(got, a.astype(np.float16).astype(np.float32))
        assert not np.array_equal(got, a)
        sizes = {g["kind"]: g["value_bytes"] for g in cache.stats()["groups"]}
        assert sizes == {"soft": 48, "soft@f16": 24}


def test_cap_evicts_other_backends_first_and_never_what_a_resume_needs(tmp_path: Path) -> None:
    row = np.zeros(256, np.float32)  # 1 KiB
    with QueryCache(tmp_path / "c.sqlite") as cache:
        mine = cache.register({"name": "mine"})
        cache.put("other", "soft", {(f"o{i}", ""): row for i in range(4)})
        cache.put(mine, "image", {("", "img"): row})
        cache.put(mine, "soft", {(f"old{i}", ""): row for i in range(4)})
        cut = time.time()
        time.sleep(0.01)
        cache.limit(7 * 1024, protect_since=cut)  # 9 KiB stored: the two oldest of the other backend go
        assert cache.evicted == 2 and len(cache.get("other", "soft", [(f"o{i}", "") for i in range(4)])) == 2
        cache.put(mine, "soft", {(f"new{i}", ""): row for i in range(4)})  # 11 KiB: 2 others, then 2 old of mine
        assert len(cache.get("other", "soft", [(f"o{i}", "") for i in range(4)])) == 0
        assert len(cache.get(mine, "soft", [(f"old{i}", "") for i in range(4)])) == 2
        cache.put(mine, "soft", {(f"newer{i}", ""): row for i in range(4)})  # only protected answers are left...
        kept = cache.get(mine, "soft", [(f"new{i}", "") for i in range(4)] + [(f"newer{i}", "") for i in range(4)])
        assert len(kept) == 8 and cache.get(mine, "image", [("", "img")])  # ...so the cache grows past the cap
        assert cache.get(mine, "soft", [(f"old{i}", "") for i in range(4)]) == {}
