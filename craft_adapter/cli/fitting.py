"""``craft-adapter fit`` and ``craft-adapter demo``."""

from __future__ import annotations

import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from craft_adapter.cli.shared import (
    DEFAULT_MODEL,
    DataOpt,
    DeviceOpt,
    ModelOpt,
    WeightsOpt,
    err,
    fail,
    load_backend,
    load_test_set,
    out,
)
from craft_adapter.training.config import FitConfig
from craft_adapter.training.job import run_fit

if TYPE_CHECKING:
    from craft_adapter.serve import HttpZeroShotVendor
    from craft_adapter.training.loop import FitResult
    from craft_adapter.vendors.credentials import Secret

HP = "Hyperparameters"
RUN = "Cache, resume and vendor faults"


def _summary(output: Path, result: FitResult, cfg: FitConfig) -> None:
    f, m = result.adapter.fit, result.meter
    held = "n/a" if f["holdout_acc"] is None else f"{100 * f['holdout_acc']:.1f}%"
    price = f", about ${f['estimated_price']:.2f}" if "estimated_price" in f else ""
    out.print(f"wrote [bold]{output}[/] ({output.stat().st_size} bytes): {f['queries']} queries, "
              f"{f['vendor_calls']} vendor calls{price} (budget {f['budget']} {cfg.budget_unit}), held-out "
              f"accuracy {held}, {result.wall_time_s:.1f}s; prompt {result.adapter.template!r}")
    out.print(f"vendor calls this run: {m['paid_calls']} paid, {m['cached_calls']} answered by the query cache, "
              f"{m['failed_calls']} failed (retried)")


def load_vendor(url: str, key: Secret | None = None, header: str = "Authorization", scheme: str = "Bearer",
                timeout: float = 60.0) -> HttpZeroShotVendor:
    """A remote Hugging Face zero-shot endpoint as a (string-only) fit backend; the key goes in a header only."""
    from urllib.parse import urlsplit

    from craft_adapter.serve import HttpZeroShotVendor
    from craft_adapter.vendors.credentials import auth_headers, redact_url

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise fail(f"--vendor must be an http(s) URL, got {redact_url(url)!r}")
    if parts.username or parts.password:
        raise fail("put the vendor key in an environment variable (--key-env) or a file (--key-file), not in the "
                   "--vendor URL")
    return HttpZeroShotVendor(url, headers=auth_headers(key, header, scheme), timeout=timeout)


def _config_from(ctx: typer.Context, config: Path | None, values: dict, saved: dict | None = None) -> FitConfig:
    """Defaults (or, resuming, the settings the fit was started with), then the config file, then options given
    on the command line."""
    names = {f.name for f in fields(FitConfig)}
    if values.get("prompt") not in ("soft", "text"):
        raise fail(f"--prompt must be auto, soft or text, got {values.get('prompt')!r}")
    given = {k: v for k, v in values.items() if k in names and _given(ctx, k)}
    try:
        if config is None and saved is None:
            return FitConfig(**{k: v for k, v in values.items() if k in names})
        base = dict(saved) if saved is not None else {"prompt": values["prompt"]}  # auto, resolved: a default
        return FitConfig(**{**base, **(FitConfig.read_file(config) if config else {}), **given})
    except (ValueError, OSError, TypeError) as e:
        raise fail(f"bad fit settings: {e}") from None


def _vendor_key(opts: dict) -> Secret | None:
    from craft_adapter.vendors.credentials import DEFAULT_KEY_ENV, read_key

    return read_key(opts["key_env"] or DEFAULT_KEY_ENV, str(opts["key_file"] or ""))


def _given(ctx: typer.Context, name: str) -> bool:
    # by name: typer >= 0.20 carries its own copy of click, whose ParameterSource is not click's
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


# How a fit was invoked, kept in its manifest so that ``fit -o ADAPTER --resume`` needs nothing else.
INVOCATION = ("data", "model", "weights", "vendor", "cache", "key_env", "key_file", "auth_header", "auth_scheme",
              "price_per_1k")


def _invocation(opts: dict) -> dict:
    from craft_adapter.vendors.credentials import redact_url

    inv = {k: (str(opts[k].resolve()) if isinstance(opts[k], Path) else opts[k]) for k in INVOCATION}
    if opts["vendor"]:
        inv["vendor"] = redact_url(opts["vendor"])  # a query string may carry a key: never written
        inv["vendor_had_query"] = redact_url(opts["vendor"]) != opts["vendor"]
    return inv


def _resumed_options(ctx: typer.Context, opts: dict, inv: dict) -> dict:
    """``opts`` with every invocation option not given on the command line taken from the manifest."""
    if inv.get("vendor_had_query") and not _given(ctx, "vendor"):
        raise fail("pass --vendor URL again to resume: its query string was not recorded")
    out = dict(opts)
    for k in INVOCATION:
        if k in inv and not _given(ctx, k):
            out[k] = Path(inv[k]) if k in ("data", "weights", "cache", "key_file") and inv[k] else inv[k]
    return out


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
        cache: Annotated[Path | None, typer.Option(
            help="SQLite query cache: paid answers are kept here and never paid for twice. Default: "
            "craft-adapter-cache.sqlite beside the output.", show_default=False, rich_help_panel=RUN)] = None,
        no_cache: Annotated[bool, typer.Option("--no-cache", help="Keep no answers on disk (no --resume).",
                                               rich_help_panel=RUN)] = False,
        resume: Annotated[bool, typer.Option(
            help="Continue the interrupted fit to --output: same settings (omitted options come from its "
            "<output>.fitrun.json), answers paid before come from the cache.", rich_help_panel=RUN)] = False,
        retries: Annotated[int, typer.Option(help="Retries per vendor call on transient faults (timeouts, 429, "
                                             "5xx, garbled replies).", rich_help_panel=RUN)] = 5,
        retry_backoff: Annotated[float, typer.Option(help="Seconds before the first retry, doubling (jittered); "
                                                     "a Retry-After hint wins.", rich_help_panel=RUN)] = 0.5,
        max_failed_calls: Annotated[int | None, typer.Option(
            help="Stop after this many failed vendor calls in all; default half the budget.", show_default=False,
            rich_help_panel=RUN)] = None,
        timeout: Annotated[float, typer.Option(help="Seconds per --vendor call.", rich_help_panel=RUN)] = 60.0,
        key_env: Annotated[str | None, typer.Option(
            help="Environment variable holding the --vendor API key [default: CRAFT_VENDOR_API_KEY].",
            show_default=False, rich_help_panel=RUN)] = None,
        key_file: Annotated[Path | None, typer.Option(help="File holding the --vendor API key (wins over --key-env).",
                                                      rich_help_panel=RUN)] = None,
        auth_header: Annotated[str, typer.Option(help="Header that carries the key.", rich_help_panel=RUN)]
        = "Authorization",
        auth_scheme: Annotated[str, typer.Option(help="Scheme before the key; empty sends it bare.",
                                                 rich_help_panel=RUN)] = "Bearer",
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
        from craft_adapter.blackbox.query_cache import CacheError, QueryCache
        from craft_adapter.training.resume import FitRun, ResumeError, manifest_path

        opts, saved = dict(ctx.params), None
        if resume:
            if no_cache:
                raise fail("--resume replays the fit from its query cache; it cannot run with --no-cache")
            if output.exists():
                raise fail(f"{output} is complete: nothing to resume (--overwrite without --resume fits again)")
            try:
                saved = FitRun.load(manifest_path(output))
            except ResumeError as e:
                raise fail(str(e)) from None
            opts = _resumed_options(ctx, opts, saved.invocation)
        elif output.exists() and not overwrite:
            raise fail(f"{output} exists; pass --overwrite to replace it or -o to write elsewhere")
        if not output.parent.is_dir():
            raise fail(f"output folder {output.parent} does not exist")
        base = None if saved is None else saved.config
        if prompt == "auto" and saved is not None:
            prompt = saved.config["prompt"]
        early = _config_from(ctx, config, {**opts, "prompt": "soft" if prompt == "auto" else prompt}, base)
        try:
            key = _vendor_key(opts) if opts["vendor"] else None
        except ValueError as e:
            raise fail(str(e)) from None
        backend = (load_vendor(opts["vendor"], key, opts["auth_header"], opts["auth_scheme"], early.timeout)
                   if opts["vendor"] else load_backend(opts["model"], opts["weights"], device))
        if prompt == "auto":
            prompt = "soft" if backend.capabilities.soft_prompts else "text"
        cfg = _config_from(ctx, config, {**opts, "prompt": prompt}, base)
        cache_path = opts["cache"] or output.parent / "craft-adapter-cache.sqlite"
        try:
            store = None if no_cache else QueryCache(cache_path)
        except CacheError as e:
            raise fail(str(e)) from None
        try:
            result = run_fit(cfg, backend, opts["data"], output, opts["price_per_1k"], store, saved,
                             _invocation({**opts, "cache": None if no_cache else cache_path}))
        finally:
            if store is not None:
                store.close()
        _summary(output, result, cfg)

    @app.command("demo")
    def demo_cmd(
        output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the demo adapter.")] = Path(
            "runs/demo/adapter.safetensors"),
        device: DeviceOpt = "auto",
        seed: Annotated[int, typer.Option(help="Seed.")] = 1,
        budget: Annotated[int | None, typer.Option(help="Query budget (default 8000).")] = None,
    ) -> None:
        """The reference job end to end: zero-shot, a 16-shot CraFT fit, and the adapted accuracy."""
        from craft_adapter.blackbox.box import BlackBox
        from craft_adapter.blackbox.meter import QueryMeter
        from craft_adapter.blackbox.query_cache import QueryCache
        from craft_adapter.training.evaluate import evaluate_adapter

        t0 = time.perf_counter()
        output.parent.mkdir(parents=True, exist_ok=True)
        backend = load_backend(DEFAULT_MODEL, None, device)
        cfg = FitConfig(shots=16, seed=seed, budget=budget)
        with QueryCache(output.parent / "craft-adapter-cache.sqlite") as cache:  # a second demo replays for free
            result = run_fit(cfg, backend, None, output, cache=cache)
        test = load_test_set(None)
        box = BlackBox(backend, test.images, test.class_names, QueryMeter())
        with err.status(f"evaluating on {len(test)} shifted test images"):
            r = evaluate_adapter(box, test.labels, result.adapter, cfg.template)
        out.print(f"reference task (Fashion-MNIST, catalogue shift), 16 shots, seed {seed}, "
                  f"{result.adapter.fit['queries']} queries:")
        out.print(f"  zero-shot {100 * r['zero_shot_accuracy']:.2f}%  ->  CraFT [bold green]"
                  f"{100 * r['adapted_accuracy']:.2f}%[/] (prompt only {100 * r['prompt_only_accuracy']:.2f}%)")
        out.print(f"  adapter: {output}; total {time.perf_counter() - t0:.0f}s")
