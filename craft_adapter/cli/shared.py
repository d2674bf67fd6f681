"""What every ``craft-adapter`` command shares: the app, consoles, option types, and loaders with clean errors."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from craft_adapter.reference.task import REFERENCE_VENDOR_DIR
from craft_adapter.training.image_sets import DataError, LabeledImages, load_image_folder

if TYPE_CHECKING:
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

app = typer.Typer(
    help="Fine-tune a black-box vision-language model for few-shot classification (CraFT).",
    no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False,
)
out = Console()
err = Console(stderr=True)

DEFAULT_MODEL = f"local-dir:{REFERENCE_VENDOR_DIR}"
ModelOpt = Annotated[str, typer.Option(
    "--model", help="open_clip architecture name (with --weights) or local-dir:PATH. "
    "Default: the built-in reference vendor.", show_default=False)]
WeightsOpt = Annotated[Path | None, typer.Option(
    "--weights", help="Local weights file for a built-in architecture, e.g. open_clip_pytorch_model.bin.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
DataOpt = Annotated[Path | None, typer.Option(
    "--data", help="Image folder, root/<class name>/*.png|jpg. Default: the reference task.")]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` as an error and return the exit to raise."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def load_backend(model: str, weights: Path | None, device: str) -> OpenClipBackend:
    """Build the in-process open_clip backend, turning setup mistakes into clean CLI errors."""
    from craft_adapter.vendors.open_clip_backend import BackendError, OpenClipBackend

    try:
        with err.status(f"loading {model}"):
            return OpenClipBackend(model, weights, device=device)
    except BackendError as e:
        raise fail(str(e)) from None


def load_test_set(data: Path | None, shifted: bool = True) -> LabeledImages:
    """The test images: a folder, or the reference task's 10,000-image test split."""
    from craft_adapter.reference.task import reference_test

    try:
        if data is not None:
            return load_image_folder(data)
        with err.status("loading the reference task's test split"):
            return reference_test(shifted)
    except DataError as e:
        raise fail(str(e)) from None


def load_train_set(data: Path | None, shots: int, seed: int) -> LabeledImages:
    """``shots`` images per class drawn by ``seed``: from a folder, or the reference task's train split."""
    from craft_adapter.reference.task import reference_train
    from craft_adapter.training.image_sets import sample_k_shot

    try:
        if data is None:
            return reference_train(shots, seed)
        ds = load_image_folder(data)
        return ds.subset(sample_k_shot(ds.labels, shots, seed, n_classes=len(ds.class_names)))
    except DataError as e:
        raise fail(str(e)) from None
