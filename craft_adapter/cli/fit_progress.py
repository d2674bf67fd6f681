"""The fit's progress bar, drawn from :func:`~craft_adapter.training.api.fit_adapter`'s ``on_progress`` callback.

It appears with the first generation, so a fit that stops before it starts (bad data, a resume conflict) prints
its error without an empty bar above it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from craft_adapter.cli.shared import err

if TYPE_CHECKING:
    from craft_adapter.training.config import FitConfig
    from craft_adapter.training.loop import FitState


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
