"""A fit run from the command line: :func:`~craft_adapter.training.api.fit_adapter` with a progress bar drawn
from its ``on_progress`` callback, its typed errors turned into messages and exit codes (2 bad input, 3 the
vendor failed, 130 interrupted), and the summary printed at the end.

The bar appears with the first generation, so a fit that stops before it starts (bad data, a resume conflict)
prints its error without an empty bar above it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from craft_adapter.cli.shared import EXIT_INTERRUPTED, EXIT_VENDOR, err, fail, out, shown, train_data

if TYPE_CHECKING:
    from craft_adapter.blackbox.query_cache import QueryCache
    from craft_adapter.training.api import FitOutcome
    from craft_adapter.training.config import FitConfig
    from craft_adapter.training.loop import FitState
    from craft_adapter.training.resume import FitRun

RUN = "Vendor calls, cache and resume (never change the adapter)"  # the fit command's panel for them


class FitProgress:
    """``with FitProgress(cfg, price) as show:`` gives the callback; leaving the block closes the bar."""

    def __init__(self, cfg: FitConfig, price_per_1k: float | None = None) -> None:
        unit = "queries" if cfg.budget_unit == "queries" else "vendor calls"
        columns = [TextColumn("[bold]fit"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
        self.bar = Progress(*columns, console=err, transient=False)
        self.cfg, self.price = cfg, price_per_1k
        self.task: Any = None  # the bar's task, once the first generation is in

    def show(self, s: FitState) -> None:
        """Draw one generation."""
        if self.task is None:
            if s.generation > 1:  # the fit came back from its resume checkpoint
                err.print(f"continuing from the resume checkpoint after generation {s.generation - 1}")
            self.bar.start()
            self.task = self.bar.add_task("fit", total=self.cfg.resolved_budget, info="")
        m = s.meter
        used = m["queries"] if m["unit"] == "queries" else m["vendor_calls"]
        held = "" if s.holdout_acc is None else f" held-out {100 * s.holdout_acc:.1f}%"
        price = "" if self.price is None else f" ~${s.vendor_calls / 1000 * self.price:.2f}"
        paid = f" ({m['paid_calls']} paid, {m['cached_calls']} cached)" if m["cached_calls"] else ""
        failed = f" {m['failed_calls']} failed" if m["failed_calls"] else ""
        self.bar.update(self.task, completed=used, info=f"fitness {s.best_fitness:.3f} train acc "
                        f"{100 * s.train_acc:.1f}%{held} {s.vendor_calls} calls{paid}{failed}{price}")

    def __enter__(self) -> Any:
        return self.show

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.bar.stop()


def run_fit(cfg: FitConfig, backend: Any, data: Path | None, output: Path, cache: QueryCache | None = None,
            resume: FitRun | None = None, price_per_1k: float | None = None,
            invocation: dict | None = None) -> FitOutcome:
    """:func:`fit_adapter` with a progress bar, writing to ``output``; its typed errors become clean exits."""
    from craft_adapter.training.api import CacheFailed, FitError, ResumeConflict, VendorStopped, fit_adapter

    where = f" Everything paid so far is in the query cache {cache.path}; run the same command with --resume to " \
            "continue without paying for it again." if cache is not None else ""
    try:
        with FitProgress(cfg, price_per_1k) as show:
            return fit_adapter(train_data(data, cfg.shots, cfg.seed), backend, cfg, cache=cache, resume=resume,
                               output=output, on_progress=show, price_per_1k=price_per_1k, invocation=invocation)
    except ResumeConflict as e:
        raise fail(f"{e}. Resume with the settings the fit was started with, or start a new fit without "
                   "--resume") from None
    except VendorStopped as e:
        raise fail(f"the vendor failed: {e}.{where}", EXIT_VENDOR) from None
    except CacheFailed as e:  # an answer that cannot be kept is not used: stop before paying for more
        raise fail(f"{e}; the fit stopped rather than use an answer it could not keep. The answers stored "
                   "before are kept: fix the cause (disk space, permissions), then run the same command with "
                   "--resume.") from None
    except KeyboardInterrupt:
        raise fail(f"interrupted.{where}", EXIT_INTERRUPTED) from None
    except FitError as e:
        raise fail(str(e)) from None


def summary(output: Path, outcome: FitOutcome) -> None:
    """Print what was written and what it cost."""
    f, m = outcome.adapter.fit, outcome.record.meter
    held = "n/a" if f["holdout_acc"] is None else f"{100 * f['holdout_acc']:.1f}%"
    price = f", about ${f['estimated_price']:.2f}" if "estimated_price" in f else ""
    out.print(f"wrote [bold]{shown(output)}[/] ({output.stat().st_size} bytes): {f['queries']} queries, "
              f"{f['vendor_calls']} vendor calls{price} (budget {f['budget']} {outcome.config.budget_unit}), "
              f"held-out accuracy {held}, {outcome.record.wall_time_s:.1f}s; prompt "
              f"{shown(repr(outcome.adapter.template))}")
    out.print(f"vendor calls this run: {m['paid_calls']} paid, {m['cached_calls']} answered by the query cache, "
              f"{m['failed_calls']} failed (retried)")
