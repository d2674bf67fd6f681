"""A fit as a job on disk: the manifest written when it starts, and what is written when it ends.

Beside the adapter ``<output>`` sit ``<output>.fitrun.json`` (the manifest :mod:`.resume` reads back, written
before the first vendor call so a killed fit can be resumed) and ``<output>.fitlog.json`` (the fit's record).
A soft-mode fit, and a text-mode fit with a query cache, also keep ``<output>.ckpt.safetensors`` (:mod:`.checkpoint`,
:mod:`.text_checkpoint`) while they run; it is removed once the adapter is written. No typer and no rich here: the
command line draws and prints, this module only writes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from craft_adapter.training.resume import FitRun, manifest_path

if TYPE_CHECKING:
    from craft_adapter.artifact.adapter_file import Adapter
    from craft_adapter.blackbox.query_cache import QueryCache
    from craft_adapter.training.api import FitOutcome
    from craft_adapter.training.checkpoint import Checkpoints
    from craft_adapter.training.config import FitConfig


def fitlog_path(output: Path) -> Path:
    """Where the fit writing ``output`` keeps its record."""
    return output.with_name(output.name + ".fitlog.json")


def start(output: Path, run: FitRun) -> None:
    """Record, beside ``output``, what decides the fit about to start."""
    run.save(manifest_path(output))


def prepare(output: Path | None, run: FitRun, cfg: FitConfig, cache: QueryCache | None,
            resume: bool) -> Checkpoints | None:
    """Set the cache's precision and cap for this fit; the fit's checkpoints when it writes ``output``."""
    if cache is not None:
        cache.half_kinds = frozenset({"soft"}) if cfg.cache_precision == "float16" else frozenset()
        # resuming without a checkpoint replays from the start: every answer of this backend may be needed
        cache.limit(None if cfg.cache_max_mb is None else int(cfg.cache_max_mb * 2**20),
                    float("-inf") if resume else time.time())
    text = cfg.prompt == "text"
    if output is None or not cfg.checkpoint_every or (text and cache is None):
        return None  # a text checkpoint names the answers paid; without a query cache nothing could restore it
    from craft_adapter.training.checkpoint import Checkpoints, checkpoint_path
    from craft_adapter.training.text_checkpoint import TextCheckpoints

    identity = {"config": run.config, "backend": run.backend, "train": run.train,
                "precision": cfg.cache_precision}

    def saved(t: float) -> None:  # soft mode: a resume reads no answer older than its checkpoint
        if cache is not None:
            cache.protect_since = t

    kind, on_saved = (TextCheckpoints, None) if text else (Checkpoints, saved)  # text: every answer is read back
    return kind(checkpoint_path(output), identity, cfg.checkpoint_every, resume, on_saved, cfg.checkpoint_seconds)


def finish(output: Path, outcome: FitOutcome, run: FitRun) -> None:
    """Write the adapter to ``output``, its fit log beside it, mark the manifest done, drop the checkpoint."""
    from craft_adapter.training.checkpoint import checkpoint_path

    outcome.adapter.save(output)
    fitlog_path(output).write_text(json.dumps(outcome.record.as_fitlog(), indent=1) + "\n")
    run.status = "done"
    run.save(manifest_path(output))
    checkpoint_path(output).unlink(missing_ok=True)


def rescue(adapter: Adapter, output: Path) -> Path | None:
    """Write ``adapter`` to the temporary folder when ``output`` cannot take it; where it went, or None."""
    target = Path(tempfile.gettempdir()) / f"{output.stem}.rescued-{os.getpid()}{output.suffix or '.safetensors'}"
    try:
        return adapter.save(target)
    except OSError:
        return None
