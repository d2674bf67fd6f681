"""A fit as a job on disk: the few-shot set, the metered boxes, the query cache, the resume manifest, the
progress bar, and what is written at the end (the adapter and ``<adapter>.fitlog.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from craft_adapter.cli.shared import err, fail, load_train_set
from craft_adapter.training.config import FitConfig

if TYPE_CHECKING:
    from craft_adapter.blackbox.query_cache import QueryCache
    from craft_adapter.training.loop import FitResult
    from craft_adapter.training.resume import FitRun
    from craft_adapter.vendors.protocols import EmbeddingBackend, ScoringBackend

EXIT_VENDOR = 3  # the vendor failed persistently: everything paid is kept; --resume later
EXIT_INTERRUPTED = 130


def run_fit(cfg: FitConfig, backend: EmbeddingBackend | ScoringBackend, data: Path | None, output: Path,
            price_per_1k: float | None = None, cache: QueryCache | None = None, resume: FitRun | None = None,
            invocation: dict[str, Any] | None = None) -> FitResult:
    """Sample the few-shot set, fit with a live progress bar, save the adapter and its fit log.

    With ``cache``, answers are looked up there and every paid one is stored first. A manifest beside the
    output records what decides the result; with ``resume`` (a manifest read back) the fit must match it.
    """
    from craft_adapter.blackbox.box import BlackBox
    from craft_adapter.blackbox.meter import BudgetExhausted, QueryMeter
    from craft_adapter.blackbox.query_cache import CacheError
    from craft_adapter.blackbox.retried_calls import RetryPolicy, VendorUnavailable
    from craft_adapter.training.image_sets import split_holdout
    from craft_adapter.training.loop import fit
    from craft_adapter.training.resume import FitRun, manifest_path, train_digest

    train = load_train_set(data, cfg.shots, cfg.seed)
    tr, ho = split_holdout(train.labels, cfg.n_holdout, cfg.seed)
    meter = QueryMeter(cfg.query_budget, cfg.budget_unit)
    policy = RetryPolicy(cfg.retries, cfg.retry_backoff, max_failed_calls=cfg.failure_cap)
    kw: dict[str, Any] = {"concurrency": cfg.concurrency, "rate_limit": cfg.rate_limit, "cache": cache,
                          "retry": policy}
    box = BlackBox(backend, [train.images[i] for i in tr], train.class_names, meter, **kw)
    hold = BlackBox(backend, [train.images[i] for i in ho], train.class_names, meter, **kw) if len(ho) else None
    run = FitRun(cfg.to_dict(), box.identity, train_digest(train.images, train.labels, train.class_names),
                 invocation or {})
    if resume is not None:
        problems = resume.conflicts(run.config, run.backend, run.train)
        if problems:
            raise fail("cannot resume: " + "; ".join(problems) + ". Resume with the settings the fit was started "
                       "with, or start a new fit without --resume")
    run.save(manifest_path(output))
    where = f" Everything paid so far is in the query cache {cache.path}; run the same command with --resume to " \
            "continue without paying for it again." if cache is not None else ""
    with _ProgressBar(cfg, meter, price_per_1k) as show:
        try:
            result = fit(box, hold, train.labels[tr], train.labels[ho] if hold else None, cfg, on_generation=show)
        except VendorUnavailable as e:
            raise fail(f"the vendor failed: {e}.{where}", EXIT_VENDOR) from None
        except CacheError as e:  # an answer that cannot be kept is not used: stop before paying for more
            raise fail(f"{e}; the fit stopped rather than use an answer it could not keep. The answers stored "
                       "before are kept: fix the cause (disk space, permissions), then run the same command with "
                       "--resume.") from None
        except KeyboardInterrupt:
            raise fail(f"interrupted.{where}", EXIT_INTERRUPTED) from None
        except (BudgetExhausted, ValueError, NotImplementedError, TypeError) as e:
            raise fail(str(e)) from None
    if price_per_1k is not None:
        result.adapter.fit["estimated_price"] = round(meter.vendor_calls / 1000 * price_per_1k, 4)
        result.adapter.fit["price_per_1k_calls"] = price_per_1k
    result.adapter.save(output)
    log = {"wall_time_s": round(result.wall_time_s, 3), "vendor_time_s": round(result.vendor_time_s, 3),
           "meter": meter.summary(), "resumed": resume is not None,
           "cache": None if cache is None else str(cache.path), "history": result.history}
    output.with_name(output.name + ".fitlog.json").write_text(json.dumps(log, indent=1) + "\n")
    run.status = "done"
    run.save(manifest_path(output))
    return result


class _ProgressBar:
    """The fit's progress bar; ``with`` gives the per-generation callback."""

    def __init__(self, cfg: FitConfig, meter: Any, price_per_1k: float | None) -> None:
        unit = "queries" if cfg.budget_unit == "queries" else "vendor calls"
        columns = [TextColumn("[bold]fit"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
        self.bar = Progress(*columns, console=err, transient=False)
        self.cfg, self.meter, self.price = cfg, meter, price_per_1k

    def __enter__(self) -> Any:
        self.bar.__enter__()
        task = self.bar.add_task("fit", total=self.cfg.query_budget, info="")
        m = self.meter

        def show(s: Any) -> None:
            held = "" if s.holdout_acc is None else f" held-out {100 * s.holdout_acc:.1f}%"
            price = "" if self.price is None else f" ~${s.vendor_calls / 1000 * self.price:.2f}"
            paid = f" ({m.paid_calls} paid, {m.cached_calls} cached)" if m.cached_calls else ""
            failed = f" {m.failed_calls} failed" if m.failed_calls else ""
            self.bar.update(task, completed=m.used, info=f"fitness {s.best_fitness:.3f} train acc "
                            f"{100 * s.train_acc:.1f}%{held} {s.vendor_calls} calls{paid}{failed}{price}")
        return show

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)
