"""``craft-adapter fit`` and ``craft-adapter demo``."""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .cli_common import (
    DEFAULT_MODEL,
    DataOpt,
    DeviceOpt,
    ModelOpt,
    WeightsOpt,
    err,
    fail,
    load_backend,
    load_test_set,
    load_train_set,
    out,
)
from .config import FitConfig

if TYPE_CHECKING:
    from .boundary import EmbeddingBackend, ScoringBackend
    from .fit import FitResult
    from .serve import HttpZeroShotVendor

HP = "Hyperparameters"


def load_vendor(url: str) -> HttpZeroShotVendor:
    """A remote Hugging Face zero-shot endpoint as a (string-only) fit backend."""
    from .serve import HttpZeroShotVendor

    if not url.startswith(("http://", "https://")):
        raise fail(f"--vendor must be an http(s) URL, got {url!r}")
    return HttpZeroShotVendor(url)


def run_fit(cfg: FitConfig, backend: EmbeddingBackend | ScoringBackend, data: Path | None, output: Path,
            price_per_1k: float | None = None) -> FitResult:
    """Sample the few-shot set, fit with a live progress bar, save the adapter and its fit log."""
    from .boundary import BlackBox, BudgetExhausted, QueryMeter
    from .data import split_holdout
    from .fit import fit

    train = load_train_set(data, cfg.shots, cfg.seed)
    tr, ho = split_holdout(train.labels, cfg.n_holdout, cfg.seed)
    meter = QueryMeter(cfg.query_budget, cfg.budget_unit)
    kw = {"concurrency": cfg.concurrency, "rate_limit": cfg.rate_limit}
    box = BlackBox(backend, [train.images[i] for i in tr], train.class_names, meter, **kw)
    hold = BlackBox(backend, [train.images[i] for i in ho], train.class_names, meter, **kw) if len(ho) else None
    unit = "queries" if cfg.budget_unit == "queries" else "vendor calls"
    columns = [TextColumn("[bold]fit"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task("fit", total=cfg.query_budget, info="")

        def show(s) -> None:
            held = "" if s.holdout_acc is None else f" held-out {100 * s.holdout_acc:.1f}%"
            price = "" if price_per_1k is None else f" ~${s.vendor_calls / 1000 * price_per_1k:.2f}"
            progress.update(task, completed=meter.used, info=f"fitness {s.best_fitness:.3f} train acc "
                            f"{100 * s.train_acc:.1f}%{held} {s.vendor_calls} calls{price}")

        try:
            result = fit(box, hold, train.labels[tr], train.labels[ho] if hold else None, cfg, on_generation=show)
        except (BudgetExhausted, ValueError, NotImplementedError, TypeError) as e:
            raise fail(str(e)) from None
    if price_per_1k is not None:
        result.adapter.fit["estimated_price"] = round(meter.vendor_calls / 1000 * price_per_1k, 4)
        result.adapter.fit["price_per_1k_calls"] = price_per_1k
    result.adapter.save(output)
    log = {"wall_time_s": round(result.wall_time_s, 3), "vendor_time_s": round(result.vendor_time_s, 3),
           "meter": meter.summary(), "history": result.history}
    output.with_name(output.name + ".fitlog.json").write_text(json.dumps(log, indent=1) + "\n")
    return result


def _config_from(ctx: click.Context, config: Path | None, values: dict) -> FitConfig:
    """Defaults, then the config file, then options given on the command line."""
    names = {f.name for f in fields(FitConfig)}
    if values.get("prompt") not in ("soft", "text"):
        raise fail(f"--prompt must be auto, soft or text, got {values.get('prompt')!r}")
    given = {k: v for k, v in values.items()
             if k in names and ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    try:
        if config is not None:
            return FitConfig.from_file(config, **given)
        return FitConfig(**{k: v for k, v in values.items() if k in names})
    except (ValueError, OSError, TypeError) as e:
        raise fail(f"bad fit settings: {e}") from None


def register(app: typer.Typer) -> None:
    """Add ``fit`` and ``demo`` to the app."""

    @app.command("fit")
    def fit_cmd(
        ctx: typer.Context,
        output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the adapter.")] = Path(
            "adapter.safetensors"),
        data: DataOpt = None,
        model: ModelOpt = DEFAULT_MODEL,
        weights: WeightsOpt = None,
        device: DeviceOpt = "auto",
        vendor: Annotated[str | None, typer.Option(
            help="URL of a Hugging Face zero-shot-image-classification endpoint to fit against, instead of an "
            "in-process model (string-only: text mode).")] = None,
        price_per_1k: Annotated[float | None, typer.Option(help="Price per 1,000 vendor calls, for the estimate.")]
        = None,
        config: Annotated[Path | None, typer.Option(help="JSON or TOML file of hyperparameters; "
                                                    "options given here override it.")] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
        shots: Annotated[int, typer.Option(help="Images per class.", rich_help_panel=HP)] = 16,
        seed: Annotated[int, typer.Option(help="Seed for sampling, projection, CMA-ES, refiner.",
                                          rich_help_panel=HP)] = 1,
        budget: Annotated[int | None, typer.Option(
            help="Query budget; default by shots: 8000 (8/16), 4000 (2/4), 2000 (1).", rich_help_panel=HP)] = None,
        prompt: Annotated[str, typer.Option(help="soft (context vectors), text (template string), or auto: soft "
                                            "when the backend accepts context vectors.", rich_help_panel=HP)] = "auto",
        init_prompt: Annotated[str, typer.Option(help="p0: the words the context starts from.",
                                                 rich_help_panel=HP)] = "a photo of a",
        intrinsic_dim: Annotated[int, typer.Option(help="CMA-ES search dimension.", rich_help_panel=HP)] = 512,
        popsize: Annotated[int, typer.Option(help="CMA-ES population (queries per generation).",
                                             rich_help_panel=HP)] = 40,
        sigma: Annotated[float, typer.Option(help="CMA-ES initial step size.", rich_help_panel=HP)] = 1.0,
        bound: Annotated[float, typer.Option(help="CMA-ES box bound on z.", rich_help_panel=HP)] = 5.0,
        proj_std: Annotated[float, typer.Option(help="Projection std (in units of std(p0) when relative).",
                                                rich_help_panel=HP)] = 0.2,
        step_scale: Annotated[str, typer.Option(help="relative (to std(p0)) or absolute.",
                                                rich_help_panel=HP)] = "relative",
        hidden: Annotated[int, typer.Option(help="Refiner hidden width.", rich_help_panel=HP)] = 256,
        lr: Annotated[float, typer.Option(help="Refiner Adam learning rate.", rich_help_panel=HP)] = 1e-3,
        refiner_batch: Annotated[int, typer.Option(help="Refiner batch size.", rich_help_panel=HP)] = 32,
        kl_weight: Annotated[float, typer.Option(help="Weight of the prediction-consistent KL terms.",
                                                 rich_help_panel=HP)] = 1.0,
        kl_decay_n: Annotated[int, typer.Option(help="Refiner KL drops to 0 after budget // n queries.",
                                                rich_help_panel=HP)] = 2,
        train_prompt: Annotated[bool, typer.Option(help="Search the prompt (off: refiner only).",
                                                   rich_help_panel=HP)] = True,
        train_refiner: Annotated[bool, typer.Option(help="Train the refiner (off: prompt only).",
                                                    rich_help_panel=HP)] = True,
        holdout_shots: Annotated[int | None, typer.Option(
            help="Shots per class held out to choose the prompt and refiner; default shots // 4.",
            rich_help_panel=HP)] = None,
        eval_every: Annotated[int, typer.Option(help="Generations between hold-out checks (1 query each).",
                                                rich_help_panel=HP)] = 10,
        vocab_size: Annotated[int, typer.Option(help="Text mode: words to edit with (most frequent first).",
                                                rich_help_panel=HP)] = 4000,
        text_children: Annotated[int, typer.Option(help="Text mode: new templates per generation.",
                                                   rich_help_panel=HP)] = 16,
        text_elites: Annotated[int, typer.Option(help="Text mode: templates kept per generation.",
                                                 rich_help_panel=HP)] = 4,
        minibatch_start: Annotated[int, typer.Option(help="Text mode: images per class per generation, at first.",
                                                     rich_help_panel=HP)] = 3,
        minibatch_end: Annotated[int, typer.Option(help="Text mode: ... growing linearly to this.",
                                                   rich_help_panel=HP)] = 3,
        concurrency: Annotated[int, typer.Option(help="Scoring vendors: calls in flight (results do not depend "
                                                 "on it).", rich_help_panel=HP)] = 8,
        rate_limit: Annotated[float | None, typer.Option(help="Scoring vendors: at most this many calls per second.",
                                                         rich_help_panel=HP)] = None,
    ) -> None:
        """Learn an adapter (prompt + refiner) for a few-shot image folder against a black-box backend."""
        if output.exists() and not overwrite:
            raise fail(f"{output} exists; pass --overwrite to replace it or -o to write elsewhere")
        if not output.parent.is_dir():
            raise fail(f"output folder {output.parent} does not exist")
        _config_from(ctx, config, {**ctx.params, "prompt": "soft" if prompt == "auto" else prompt})  # fail early
        backend = load_vendor(vendor) if vendor else load_backend(model, weights, device)
        if prompt == "auto":
            prompt = "soft" if backend.capabilities.soft_prompts else "text"
        cfg = _config_from(ctx, config, {**ctx.params, "prompt": prompt})
        result = run_fit(cfg, backend, data, output, price_per_1k)
        f = result.adapter.fit
        held = "n/a" if f["holdout_acc"] is None else f"{100 * f['holdout_acc']:.1f}%"
        price = f", about ${f['estimated_price']:.2f}" if "estimated_price" in f else ""
        out.print(f"wrote [bold]{output}[/] ({output.stat().st_size} bytes): {f['queries']} queries, "
                  f"{f['vendor_calls']} vendor calls{price} (budget {f['budget']} {cfg.budget_unit}), held-out "
                  f"accuracy {held}, {result.wall_time_s:.1f}s; prompt {result.adapter.template!r}")

    @app.command("demo")
    def demo_cmd(
        output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the demo adapter.")] = Path(
            "runs/demo/adapter.safetensors"),
        device: DeviceOpt = "auto",
        seed: Annotated[int, typer.Option(help="Seed.")] = 1,
        budget: Annotated[int | None, typer.Option(help="Query budget (default 8000).")] = None,
    ) -> None:
        """The reference job end to end: zero-shot, a 16-shot CraFT fit, and the adapted accuracy."""
        from .boundary import BlackBox, QueryMeter
        from .evaluate import evaluate_adapter

        t0 = time.perf_counter()
        output.parent.mkdir(parents=True, exist_ok=True)
        backend = load_backend(DEFAULT_MODEL, None, device)
        cfg = FitConfig(shots=16, seed=seed, budget=budget)
        result = run_fit(cfg, backend, None, output)
        test = load_test_set(None)
        box = BlackBox(backend, test.images, test.class_names, QueryMeter())
        with err.status(f"evaluating on {len(test)} shifted test images"):
            r = evaluate_adapter(box, test.labels, result.adapter, cfg.template)
        out.print(f"reference task (Fashion-MNIST, catalogue shift), 16 shots, seed {seed}, "
                  f"{result.adapter.fit['queries']} queries:")
        out.print(f"  zero-shot {100 * r['zero_shot_accuracy']:.2f}%  ->  CraFT [bold green]"
                  f"{100 * r['adapted_accuracy']:.2f}%[/] (prompt only {100 * r['prompt_only_accuracy']:.2f}%)")
        out.print(f"  adapter: {output}; total {time.perf_counter() - t0:.0f}s")
