"""``craft-adapter eval`` and ``craft-adapter inspect``: what an adapter scores, and what it holds.

``eval`` measures what ships: adapted predictions always come from the runtime (:mod:`craft_adapter.serve`), fed by
the real vendor (``--vendor URL --protocol NAME``, built by :func:`craft_adapter.vendors.registry.make_vendor`, the
same call serve uses) or by the in-process model standing in for the adapter's kind of vendor. A combination that
cannot be scored faithfully (a soft adapter through a string API, an adapter fitted on other weights, a vendor of
the other kind) is refused with exit 2; a vendor that fails exits 3.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from craft_adapter.cli.shared import (
    DEFAULT_MODEL,
    EXIT_VENDOR,
    DataOpt,
    DeviceOpt,
    ModelOpt,
    WeightsOpt,
    err,
    fail,
    load_backend,
    load_test_set,
    out,
    shown,
)
from craft_adapter.reference.task import HAND_TEMPLATE

VENDOR = "Through a vendor (what ships)"


def eval_cmd(
    ctx: typer.Context,
    adapter: Annotated[Path | None, typer.Argument(
        help="Adapter file (.safetensors or exported .onnx); without one, zero-shot only.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    data: DataOpt = None,
    template: Annotated[str, typer.Option(
        help="Hand-written prompt for zero-shot, {} marks the class name. With an adapter, the adapter's "
        "learned prompt is scored beside it.")] = HAND_TEMPLATE,
    shift: Annotated[bool, typer.Option(help="Reference task only: apply the catalogue shift.")] = True,
    json_out: Annotated[Path | None, typer.Option(
        "--json", help="Also write the result as JSON here, with per-class accuracy and the confusion matrix.")]
    = None,
    plot: Annotated[Path | None, typer.Option(help="Write the confusion matrix as a PNG here (needs matplotlib).")]
    = None,
    batch_size: Annotated[int, typer.Option(help="Images per runtime call.")] = 256,
    vendor: Annotated[str | None, typer.Option(
        help="Evaluate through this vendor, exactly as the runtime calls it, instead of an in-process model.",
        rich_help_panel=VENDOR)] = None,
    protocol: Annotated[str, typer.Option(help="The vendor's protocol: hf-zero-shot, openai-embeddings, cohere, "
                                          "voyage, embedding-api, or an installed plug-in's.",
                                          rich_help_panel=VENDOR)] = "hf-zero-shot",
    vendor_model: Annotated[str | None, typer.Option(help="Model name the vendor API is asked for.",
                                                     rich_help_panel=VENDOR)] = None,
    key_env: Annotated[str | None, typer.Option(
        help="Environment variable holding the vendor API key [default: CRAFT_VENDOR_API_KEY].", show_default=False,
        rich_help_panel=VENDOR)] = None,
    key_file: Annotated[Path | None, typer.Option(help="File holding the vendor API key (wins over --key-env).",
                                                  rich_help_panel=VENDOR)] = None,
) -> None:
    """Accuracy on a test set through exactly the runtime's path: zero-shot, prompt-only and adapted."""
    from craft_adapter.artifact.adapter_file import AdapterError
    from craft_adapter.vendors.faults import VendorError
    from craft_adapter.vendors.protocols import fill

    try:
        fill(template, "x")
    except ValueError as e:
        raise fail(str(e)) from None
    if batch_size < 1:
        raise fail("--batch-size must be at least 1")
    if plot is not None and adapter is None:
        raise fail("--plot draws an adapter's confusion matrix; pass an ADAPTER")
    test = load_test_set(data, shift)
    try:
        if vendor is not None:
            result = _through_vendor(adapter, test, template, batch_size, vendor, protocol, vendor_model,
                                     key_env, key_file, device)
        else:
            named = ctx.get_parameter_source("model")
            result = _in_process(adapter, test, template, batch_size, model, weights, device,
                                 named is not None and named.name in ("COMMANDLINE", "ENVIRONMENT"))
    except AdapterError as e:
        raise fail(str(e)) from None
    except VendorError as e:
        raise fail(f"the vendor failed: {e}", EXIT_VENDOR) from None
    _show(result)
    if plot is not None:
        _plot(result, plot)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


def _through_vendor(adapter: Path | None, test: Any, template: str, batch_size: int, url: str, protocol: str,
                    vendor_model: str | None, key_env: str | None, key_file: Path | None, device: str) -> dict:
    from craft_adapter.serve import AdapterRuntime, ShippedAdapter
    from craft_adapter.training.evaluate import evaluate_runtime, prompt_scores, recorded_backend
    from craft_adapter.vendors.credentials import DEFAULT_KEY_ENV, read_key
    from craft_adapter.vendors.registry import make_vendor
    from craft_adapter.vendors.replies import SIGMOID

    shipped = ShippedAdapter.load(adapter, device) if adapter is not None else None
    # a zero-shot vendor's score kind is what the adapter was fitted on (recorded in it), never a guess
    options = {"scores": "sigmoid"} if shipped is not None and shipped.logit_kind == SIGMOID else {}
    try:
        key = read_key(key_env or DEFAULT_KEY_ENV, str(key_file or ""))
        client = make_vendor(protocol, url, key=key, model=vendor_model, **options)
    except ValueError as e:  # a bad URL or key file, an unknown protocol, settings it does not take
        raise fail(str(e)) from None
    where = {"scored_by": "vendor", "protocol": protocol, "backend": dict(getattr(client, "identity", {}))}
    with err.status(f"scoring {len(test)} images through {protocol}"):
        if adapter is None:
            zs = prompt_scores(client, test.class_names, template, test.images, batch_size)
            return {**where, **_zero_shot_only(zs, test, template), **_calls(client)}
        runtime = AdapterRuntime(shipped, client)
        _same_classes(runtime.class_names, test.class_names)
        ev = evaluate_runtime(runtime, test.images, test.labels, vendor=client, zero_shot_template=template,
                              batch_size=batch_size)
    return {**where, **ev.report(), "template": template, "learned_template": runtime.adapter.template,
            "adapter_backend": recorded_backend(adapter), **_calls(client)}


def _in_process(adapter: Path | None, test: Any, template: str, batch_size: int, model: str, weights: Path | None,
                device: str, model_named: bool) -> dict:
    from craft_adapter.blackbox.box import BlackBox
    from craft_adapter.blackbox.meter import QueryMeter
    from craft_adapter.serve import AdapterRuntime, ShippedAdapter
    from craft_adapter.training.evaluate import (
        check_stand_in,
        evaluate_runtime,
        recorded_backend,
        stand_in_vendor,
        zero_shot,
    )

    recorded = recorded_backend(adapter) if adapter is not None else {}
    backend = load_backend(model, weights, device)
    if adapter is not None:
        check_stand_in(recorded, backend.identity, model_named)
    box = BlackBox(backend, test.images, test.class_names, QueryMeter())
    where = {"scored_by": "in-process", "backend": backend.identity}
    with err.status(f"scoring {len(test)} images"):
        res, zs = zero_shot(box, test.labels, template)
        cost = {"queries": res.queries, "vendor_calls": res.vendor_calls}
        if adapter is None:
            return {**where, **_zero_shot_only(zs, test, template), **cost}
        shipped = ShippedAdapter.load(adapter, device)
        runtime = AdapterRuntime(shipped, stand_in_vendor(backend, shipped.logit_kind))
        _same_classes(runtime.class_names, test.class_names)
        ev = evaluate_runtime(runtime, test.images, test.labels, batch_size=batch_size)
    return {**where, **ev.report(), "zero_shot_accuracy": res.accuracy, "template": template,
            "learned_template": runtime.adapter.template, "adapter_backend": recorded, **cost}


def _same_classes(adapter_names: list[str], data_names: list[str]) -> None:
    from craft_adapter.artifact.adapter_file import AdapterError

    if list(adapter_names) != list(data_names):
        raise AdapterError(f"the adapter's classes {adapter_names} differ from the data's {data_names}; evaluate "
                           "on data with the same class folders")


def _zero_shot_only(scores: Any, test: Any, template: str) -> dict:
    from craft_adapter.training.evaluate import accuracy

    return {"zero_shot_accuracy": accuracy(scores, test.labels), "template": template, "n_images": len(test)}


def _calls(client: Any) -> dict:
    calls = getattr(client, "calls", None)  # the embedding clients count every request they send
    return {"vendor_calls": calls} if isinstance(calls, int) else {}


def _show(result: dict) -> None:
    out.print(f"zero-shot accuracy: [bold]{100 * result['zero_shot_accuracy']:.2f}%[/] "
              f"with {shown(repr(result['template']))}")
    if "adapted_accuracy" in result:
        out.print(f"prompt-only accuracy: {100 * result['prompt_only_accuracy']:.2f}%")
        out.print(f"adapted accuracy:   [bold green]{100 * result['adapted_accuracy']:.2f}%[/]")
        per_class = ", ".join(f"{name} {'n/a' if acc is None else f'{100 * acc:.1f}%'}"
                              for name, acc in result["per_class_accuracy"].items())
        out.print(f"per class: {shown(per_class)}", highlight=False)
    calls = f", {result['vendor_calls']} vendor calls" if "vendor_calls" in result else ""
    queries = f", {result['queries']} queries" if "queries" in result else ""
    out.print(f"{result['n_images']} images{queries}{calls}, scored by {result['scored_by']} "
              f"{shown(result['backend'].get('name', ''))}", highlight=False)


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: write the file only
        import matplotlib.pyplot as plt
    except ImportError:
        raise fail("--plot needs matplotlib: pip install matplotlib (or craft-adapter[dev])") from None
    names, m = result["class_names"], result["confusion_matrix"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(names), 0.8 + 0.6 * len(names)))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"adapted accuracy {100 * result['adapted_accuracy']:.1f}%")
    for i, row in enumerate(m):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise fail(f"cannot write the plot to {path} ({e.strerror})") from None
    finally:
        plt.close(fig)


def inspect_cmd(
    adapter: Annotated[Path, typer.Argument(help="Adapter file (.safetensors).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw metadata as JSON.")] = False,
) -> None:
    """Show what an adapter file holds: classes, prompt, mode, logits, backend and fit summary."""
    from craft_adapter.artifact.adapter_file import Adapter, AdapterError

    try:
        a = Adapter.load(adapter)
    except AdapterError as e:
        raise fail(str(e)) from None
    meta = a.metadata()
    if as_json:
        out.print_json(json.dumps(meta))
        return
    t = Table(title=shown(adapter), show_header=False)
    t.add_row("format version", str(a.format_version))
    t.add_row("mode", shown(a.mode))
    t.add_row("classes", f"{a.n_classes}: " + shown(", ".join(a.class_names)))
    t.add_row("prompt template", shown(a.template))
    if a.ctx is not None:
        reading = shown(repr(a.prompt_reading))
        t.add_row("learned context", f"{a.ctx.shape[0]} vectors x {a.ctx.shape[1]}, reads as {reading}")
    t.add_row("logits", shown(f"{a.logit_kind} (scale {a.logit_scale:.4g}); refiner input: "
                              f"{meta['logits']['refiner_input']}"))
    identity = not any(v.any() for v in a.refiner.values())
    t.add_row("refiner", f"residual MLP {a.n_classes} -> {a.hidden} -> {a.n_classes}" + (" (the identity)" if
                                                                                      identity else ""))
    if a.head is not None:
        t.add_row("embedding head", f"{a.n_classes} x {a.head_dim} on the image embedding: refined = refiner(x) + "
                  "scale * e @ head.delta^T; served only through an embedding vendor")
    t.add_row("backend", shown(json.dumps(a.backend)))
    fit = {k: v for k, v in a.fit.items() if k != "config"}
    t.add_row("fit", shown(json.dumps(fit)))
    t.add_row("file size", f"{adapter.stat().st_size} bytes")
    out.print(t)


def register(app: typer.Typer) -> None:
    """Add ``eval`` and ``inspect`` to the app."""
    app.command("eval")(eval_cmd)
    app.command("inspect")(inspect_cmd)
