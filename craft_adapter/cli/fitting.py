"""``craft-adapter fit`` and ``craft-adapter demo``: options in, the settings built once, the backend loaded, and
:func:`~craft_adapter.cli.fit_runs.run_fit` (``fit_adapter`` with a progress bar and clean exits) called once.

The hyperparameter options are generated from :class:`FitConfig`'s fields (name, type, default, help, and the
help panel by group), so there is one copy of each setting; only the options that are not settings (where the
data, the model, the cache and the output are) are written here.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from craft_adapter.cli.fit_runs import RUN, run_fit, summary
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
    options_from,
    out,
    with_options,
)
from craft_adapter.training.config import NEW_SETTING_DEFAULTS, FitConfig

if TYPE_CHECKING:
    from craft_adapter.vendors.credentials import Secret

HP = "Hyperparameters (decide the adapter)"
PROMPT_HELP = "soft (context vectors), text (template string), or auto: soft when the backend accepts context vectors."


def setting_options() -> list[inspect.Parameter]:
    """One option per :class:`FitConfig` field; ``--prompt`` also takes ``auto`` (resolved from the backend)."""
    params = options_from(FitConfig, panels={"decisive": HP, "operational": RUN})
    params["prompt"] = inspect.Parameter("prompt", inspect.Parameter.KEYWORD_ONLY, default="auto", annotation=Annotated[
        str, typer.Option(help=PROMPT_HELP, rich_help_panel=HP)])
    return list(params.values())


def load_vendor(opts: dict, key: Secret | None, timeout: float) -> Any:
    """The fit's vendor, made by the registry from ``--vendor``, ``--protocol`` and ``--vendor-model`` (the URL is
    checked there); ``--auth-header``/``--auth-scheme``/``--vendor-scores`` go to ``hf-zero-shot``, the one protocol
    that takes them."""
    from craft_adapter.vendors.registry import BUILTIN, hf_only_settings, make_vendor

    protocol = opts["protocol"]
    try:
        options: dict[str, Any] = hf_only_settings(protocol, auth_header=opts["auth_header"],
                                                   auth_scheme=opts["auth_scheme"], scores=opts["vendor_scores"])
    except ValueError as e:
        raise fail(str(e)) from None
    if protocol in BUILTIN:  # a plug-in's factory may take no timeout
        options["timeout"] = timeout
    try:
        return make_vendor(protocol, opts["vendor"], key=key, model=opts["vendor_model"], **options)
    except ValueError as e:  # a bad URL, an unknown protocol, settings it does not take
        raise fail(f"--vendor: {e}") from None


def _given(ctx: typer.Context, name: str) -> bool:
    # by name: typer >= 0.20 carries its own copy of click, whose ParameterSource is not click's
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _settings(ctx: typer.Context, config: Path | None, opts: dict, saved: dict | None) -> tuple[FitConfig, bool]:
    """The fit's settings, built once: defaults (or, resuming, the settings the fit was started with), then the
    config file, then options given on the command line. Also whether ``prompt`` is still to be resolved from the
    backend (``auto``; the config says ``soft`` until then, which no check depends on)."""
    if opts["prompt"] not in ("auto", "soft", "text"):
        raise fail(f"--prompt must be auto, soft or text, got {opts['prompt']!r}")
    given = {f.name: opts[f.name] for f in fields(FitConfig) if _given(ctx, f.name)}
    if given.get("prompt") == "auto":
        del given["prompt"]
    try:
        # a manifest leaves out newer settings at their "as before" value (FitConfig.to_dict): read them back so
        started = {} if saved is None else {**NEW_SETTING_DEFAULTS, **saved}
        chosen = {**started, **(FitConfig.read_file(config) if config else {}), **given}
        auto = "prompt" not in chosen
        return FitConfig(**{"prompt": "soft", **chosen}), auto
    except (ValueError, OSError, TypeError) as e:
        raise fail(f"bad fit settings: {e}") from None


def _vendor_key(opts: dict) -> Secret | None:
    from craft_adapter.vendors.credentials import DEFAULT_KEY_ENV, read_key

    return read_key(opts["key_env"] or DEFAULT_KEY_ENV, str(opts["key_file"] or ""))


# How a fit was invoked, kept in its manifest so that ``fit -o ADAPTER --resume`` needs nothing else.
INVOCATION = ("data", "model", "weights", "vendor", "protocol", "vendor_model", "cache", "key_env", "key_file",
              "auth_header", "auth_scheme", "vendor_scores", "price_per_1k")


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


def fit_cmd(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the adapter.")] = Path(
        "adapter.safetensors"),
    data: DataOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    vendor: Annotated[str | None, typer.Option(
        help="URL of a vendor API to fit against (see --protocol), instead of an in-process model (string-only: "
        "text mode).")] = None,
    protocol: Annotated[str, typer.Option(
        help="The --vendor's protocol: hf-zero-shot, openai-embeddings (Infinity), cohere, voyage, embedding-api, "
        "or a plug-in's name.")] = "hf-zero-shot",
    vendor_model: Annotated[str | None, typer.Option(help="Model name the --vendor API is asked for.")] = None,
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
    key_env: Annotated[str | None, typer.Option(
        help="Environment variable holding the --vendor API key (default: CRAFT_VENDOR_API_KEY).",
        show_default=False, rich_help_panel=RUN)] = None,
    key_file: Annotated[Path | None, typer.Option(help="File holding the --vendor API key (wins over --key-env).",
                                                  rich_help_panel=RUN)] = None,
    auth_header: Annotated[str, typer.Option(help="Header that carries the key.", rich_help_panel=RUN)]
    = "Authorization",
    auth_scheme: Annotated[str, typer.Option(help="Scheme before the key; empty sends it bare.",
                                             rich_help_panel=RUN)] = "Bearer",
    vendor_scores: Annotated[str, typer.Option(
        help="hf-zero-shot: softmax (scores sum to 1) or sigmoid (independent scores, e.g. SigLIP). A softmax "
        "vendor whose first reply does not sum to 1 stops the fit at once.", rich_help_panel=RUN)] = "softmax",
    **settings: Any,  # one option per FitConfig field: see setting_options()
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
    cfg, auto = _settings(ctx, config, opts, None if saved is None else saved.config)
    try:
        key = _vendor_key(opts) if opts["vendor"] else None
    except ValueError as e:
        raise fail(str(e)) from None
    backend = load_vendor(opts, key, cfg.timeout) if opts["vendor"] else load_backend(
        opts["model"], opts["weights"], device, cfg.memory_budget_mb)
    if auto and not backend.capabilities.soft_prompts:
        cfg = replace(cfg, prompt="text")
    cache_path = opts["cache"] or output.parent / "craft-adapter-cache.sqlite"
    try:
        store = None if no_cache else QueryCache(cache_path)
    except CacheError as e:
        raise fail(str(e)) from None
    try:
        outcome = run_fit(cfg, backend, opts["data"], output, store, saved, opts["price_per_1k"],
                          _invocation({**opts, "cache": None if no_cache else cache_path}))
    finally:
        if store is not None:
            store.close()
    summary(output, outcome)


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
        outcome = run_fit(cfg, backend, None, output, cache=cache)
    test = load_test_set(None)
    box = BlackBox(backend, test.images, test.class_names, QueryMeter())
    with err.status(f"evaluating on {len(test)} shifted test images"):
        r = evaluate_adapter(box, test.labels, outcome.adapter, cfg.template)
    out.print(f"reference task (Fashion-MNIST, catalogue shift), 16 shots, seed {seed}, "
              f"{outcome.adapter.fit['queries']} queries:")
    out.print(f"  zero-shot {100 * r['zero_shot_accuracy']:.2f}%  ->  CraFT [bold green]"
              f"{100 * r['adapted_accuracy']:.2f}%[/] (prompt only {100 * r['prompt_only_accuracy']:.2f}%)")
    out.print(f"  adapter: {output}; total {time.perf_counter() - t0:.0f}s")


def register(app: typer.Typer) -> None:
    """Add ``fit`` and ``demo`` to the app."""
    app.command("fit")(with_options(fit_cmd, setting_options()))
    app.command("demo")(demo_cmd)
