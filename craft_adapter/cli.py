"""The ``craft-adapter`` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .data import DataError, LabeledImages, load_image_folder
from .reference import HAND_TEMPLATE, REFERENCE_VENDOR_DIR

app = typer.Typer(
    help="Fine-tune a black-box vision-language model for few-shot classification (CraFT).",
    no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False,
)
out = Console()
err = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option(
    "--model", help="open_clip architecture name (with --weights) or local-dir:PATH. "
    "Default: the built-in reference vendor.")]
WeightsOpt = Annotated[Path | None, typer.Option(
    "--weights", help="Local weights file for a built-in architecture, e.g. open_clip_pytorch_model.bin.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
DataOpt = Annotated[Path | None, typer.Option(
    "--data", help="Image folder, root/<class name>/*.png|jpg. Default: the reference task.")]

DEFAULT_MODEL = f"local-dir:{REFERENCE_VENDOR_DIR}"


@app.callback()
def _root() -> None:
    """Fine-tune a black-box vision-language model for few-shot classification (CraFT)."""


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` as an error and return the exit to raise."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def load_backend(model: str, weights: Path | None, device: str):
    """Build the in-process open_clip backend, turning setup mistakes into clean CLI errors."""
    from .backends.open_clip_backend import BackendError, OpenClipBackend

    try:
        with err.status(f"loading {model}"):
            return OpenClipBackend(model, weights, device=device)
    except BackendError as e:
        raise fail(str(e)) from None


def load_test_set(data: Path | None, shifted: bool) -> LabeledImages:
    """The test images: a folder, or the reference task's 10,000-image test split."""
    from .reference import reference_task

    try:
        if data is not None:
            return load_image_folder(data)
        with err.status("loading the reference task's test split"):
            return reference_task(shots=1, seed=0, shifted=shifted)[1]
    except DataError as e:
        raise fail(str(e)) from None


@app.command("eval")
def eval_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    data: DataOpt = None,
    template: Annotated[str, typer.Option(help="Hand-written prompt, {} marks the class name.")] = HAND_TEMPLATE,
    shift: Annotated[bool, typer.Option(help="Reference task only: apply the catalogue shift.")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON here.")] = None,
) -> None:
    """Zero-shot accuracy of a hand-written prompt on a test set, with the queries it cost."""
    from .boundary import BlackBox, QueryMeter, fill
    from .evaluate import zero_shot

    try:
        fill(template, "x")
    except ValueError as e:
        raise fail(str(e)) from None
    test = load_test_set(data, shift)
    backend = load_backend(model, weights, device)
    box = BlackBox(backend, test.images, test.class_names, QueryMeter())
    with err.status(f"scoring {len(test)} images"):
        result, _ = zero_shot(box, test.labels, template)
    out.print(f"zero-shot accuracy: [bold]{100 * result.accuracy:.2f}%[/] on {result.n_images} images "
              f"with {template!r} ({result.queries} queries, {result.vendor_calls} vendor calls)")
    if json_out is not None:
        json_out.write_text(json.dumps({
            "zero_shot_accuracy": result.accuracy, "template": template, "n_images": result.n_images,
            "queries": result.queries, "vendor_calls": result.vendor_calls, "backend": backend.identity,
        }, indent=2) + "\n")


def main() -> None:
    """Console entry point."""
    app()
