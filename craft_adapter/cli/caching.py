"""``craft-adapter cache stats|prune``: look at and trim the query cache that fits keep their paid answers in."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from craft_adapter.cli.shared import err, fail, out, shown

if TYPE_CHECKING:
    from craft_adapter.blackbox.query_cache import QueryCache

cache_app = typer.Typer(help="The query cache: every paid vendor answer, so no answer is paid for twice.",
                        no_args_is_help=True)
CacheArg = Annotated[Path, typer.Argument(help="The cache file (fit's default: craft-adapter-cache.sqlite beside "
                                          "the adapter).")]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> float:
    """``"90s"``, ``"30m"``, ``"12h"``, ``"7d"``, ``"2w"`` as seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not m:
        raise ValueError(f"an age is a number and a unit s, m, h, d or w (e.g. 30d), got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@contextmanager
def _open(path: Path) -> Iterator[QueryCache]:
    """The cache at ``path``, closed after; a cache that cannot be used, now or midway, is a clean error."""
    from craft_adapter.blackbox.query_cache import CacheError, QueryCache

    if not path.is_file():
        raise fail(f"no cache at {path}")
    try:
        with QueryCache(path) as cache:
            yield cache
    except CacheError as e:
        raise fail(str(e)) from None


def _when(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M")


@cache_app.command("stats")
def stats_cmd(path: CacheArg, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Entries, size and age of the cache, per backend and kind of answer."""
    with _open(path) as cache:
        s = cache.stats()
    if as_json:
        out.print_json(json.dumps(s))
        return
    table = Table(title=f"{shown(path)}: {s['entries']} answers, {s['disk_bytes'] / 1e6:.1f} MB on disk")
    for col in ("backend", "identity", "kind", "answers", "MB", "oldest (UTC)", "newest (UTC)"):
        table.add_column(col, overflow="fold")
    for g in s["groups"]:
        ident = g["identity"] or {}
        who = " ".join(str(v) for k, v in sorted(ident.items()) if k in ("name", "model", "url"))
        table.add_row(shown(g["backend"][:12]), shown(who), shown(g["kind"]), str(g["entries"]),
                      f"{g['value_bytes'] / 1e6:.2f}",
                      _when(g["oldest"]), _when(g["newest"]))
    out.print(table)


@cache_app.command("prune")
def prune_cmd(
    path: CacheArg,
    older_than: Annotated[str | None, typer.Option(help="Drop answers stored longer ago than this: 7d, 12h...")]
    = None,
    backend: Annotated[list[str] | None, typer.Option(help="Drop every answer of this backend (a key, or its "
                                                      "first characters, from `cache stats`). Repeatable.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Only say how many answers would go.")] = False,
) -> None:
    """Delete old answers or a backend's answers, then compact the file."""
    if older_than is None and not backend:
        raise fail("say what to prune: --older-than AGE, --backend KEY, or both")
    try:
        age = None if older_than is None else parse_age(older_than)
    except ValueError as e:
        raise fail(str(e)) from None
    with _open(path) as cache:
        keys = [g["backend"] for g in cache.stats()["groups"]]
        chosen = sorted({k for prefix in backend or [] for k in keys if k.startswith(prefix)})
        unknown = [p for p in backend or [] if not any(k.startswith(p) for k in keys)]
        if unknown:
            raise fail(f"no backend in {path} starts with {unknown}; see `craft-adapter cache stats {path}`")
        if dry_run:
            n = cache.count(age, chosen)
            out.print(f"would delete {n} answers")
            return
        with err.status("pruning and compacting"):
            n = cache.prune(age, chosen)
        out.print(f"deleted {n} answers; {cache.stats()['disk_bytes'] / 1e6:.1f} MB on disk")


def register(app: typer.Typer) -> None:
    """Add the ``cache`` command group to ``app``."""
    app.add_typer(cache_app, name="cache")
