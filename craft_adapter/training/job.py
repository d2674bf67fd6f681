"""A fit as a job on disk: the manifest written when it starts, and what is written when it ends.

Beside the adapter ``<output>`` sit ``<output>.fitrun.json`` (the manifest :mod:`.resume` reads back, written
before the first vendor call so a killed fit can be resumed) and ``<output>.fitlog.json`` (the fit's record).
No typer and no rich here: the command line draws and prints, this module only writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from craft_adapter.training.resume import FitRun, manifest_path

if TYPE_CHECKING:
    from craft_adapter.training.api import FitOutcome


def fitlog_path(output: Path) -> Path:
    """Where the fit writing ``output`` keeps its record."""
    return output.with_name(output.name + ".fitlog.json")


def start(output: Path, run: FitRun) -> None:
    """Record, beside ``output``, what decides the fit about to start."""
    run.save(manifest_path(output))


def finish(output: Path, outcome: FitOutcome, run: FitRun) -> None:
    """Write the adapter to ``output``, its fit log beside it, and mark the manifest done."""
    outcome.adapter.save(output)
    fitlog_path(output).write_text(json.dumps(outcome.record.as_fitlog(), indent=1) + "\n")
    run.status = "done"
    run.save(manifest_path(output))
