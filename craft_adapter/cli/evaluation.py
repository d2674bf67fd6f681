"""``craft-adapter eval`` and ``craft-adapter inspect``: what an adapter scores, and what it holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

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
from craft_adapter.reference.task import HAND_TEMPLATE


def eval_cmd(
    adapter: Annotated[Path | None, typer.Argument(help="Adapter file; without one, zero-shot only.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    data: DataOpt = None,
    template: Annotated[str, typer.Option(
        help="Hand-written prompt for zero-shot, {} marks the class name. With an adapter, the adapter's "
        "learned prompt is scored beside it.")] = HAND_TEMPLATE,
    shift: Annotated[bool, typer.Option(help="Reference task only: apply the catalogue shift.")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON here.")] = None,
) -> None:
    """Zero-shot, and with an adapter the adapted, accuracy on a test set, with the queries it cost."""
    from craft_adapter.artifact.adapter_file import Adapter, AdapterError
    from craft_adapter.blackbox.box import BlackBox
    from craft_adapter.blackbox.meter import QueryMeter
    from craft_adapter.training.evaluate import evaluate_adapter, zero_shot
    from craft_adapter.vendors.protocols import fill

    try:
        fill(template, "x")
        loaded = Adapter.load(adapter) if adapter is not None else None
    except (ValueError, AdapterError) as e:
        raise fail(str(e)) from None
    test = load_test_set(data, shift)
    backend = load_backend(model, weights, device)
    box = BlackBox(backend, test.images, test.class_names, QueryMeter())
    with err.status(f"scoring {len(test)} images"):
        if loaded is None:
            res, _ = zero_shot(box, test.labels, template)
            result = {"zero_shot_accuracy": res.accuracy, "template": template, "n_images": res.n_images,
                      "queries": res.queries, "vendor_calls": res.vendor_calls}
        else:
            try:
                result = {**evaluate_adapter(box, test.labels, loaded, template), "template": template,
                          "learned_template": loaded.template}
            except AdapterError as e:
                raise fail(str(e)) from None
    out.print(f"zero-shot accuracy: [bold]{100 * result['zero_shot_accuracy']:.2f}%[/] "
              f"with {result['template']!r}")
    if loaded is not None:
        out.print(f"prompt-only accuracy: {100 * result['prompt_only_accuracy']:.2f}%")
        out.print(f"adapted accuracy:   [bold green]{100 * result['adapted_accuracy']:.2f}%[/]")
    out.print(f"{result['n_images']} images, {result['queries']} queries, {result['vendor_calls']} vendor calls")
    if json_out is not None:
        json_out.write_text(json.dumps({**result, "backend": backend.identity}, indent=2) + "\n")


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
    t = Table(title=str(adapter), show_header=False)
    t.add_row("format version", str(a.format_version))
    t.add_row("mode", a.mode)
    t.add_row("classes", f"{a.n_classes}: " + ", ".join(a.class_names))
    t.add_row("prompt template", a.template)
    if a.ctx is not None:
        t.add_row("learned context", f"{a.ctx.shape[0]} vectors x {a.ctx.shape[1]}, reads as {a.prompt_reading!r}")
    t.add_row("logits", f"{a.logit_kind} (scale {a.logit_scale:.4g}); refiner input: {meta['logits']['refiner_input']}")
    t.add_row("refiner", f"residual MLP {a.n_classes} -> {a.hidden} -> {a.n_classes}")
    t.add_row("backend", json.dumps(a.backend))
    fit = {k: v for k, v in a.fit.items() if k != "config"}
    t.add_row("fit", json.dumps(fit))
    t.add_row("file size", f"{adapter.stat().st_size} bytes")
    out.print(t)


def register(app: typer.Typer) -> None:
    """Add ``eval`` and ``inspect`` to the app."""
    app.command("eval")(eval_cmd)
    app.command("inspect")(inspect_cmd)
