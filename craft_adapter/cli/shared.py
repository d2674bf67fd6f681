"""What every ``craft-adapter`` command shares: the app, consoles, option types, options generated from a
settings dataclass, and loaders with clean errors."""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from craft_adapter.reference.task import REFERENCE_VENDOR_DIR
from craft_adapter.training.api import use_passive_omp_wait
from craft_adapter.training.image_sets import DataError, LabeledImages, load_image_folder
from craft_adapter.vendors.protocols import MEMORY_BUDGET_MB

if TYPE_CHECKING:
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

app = typer.Typer(
    help="Fine-tune a black-box vision-language model for few-shot classification (CraFT).",
    no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False,
)
out = Console()
err = Console(stderr=True)
# Exit codes: 2 (typer's, and fail's default) bad input; 3 the vendor failed (fit: everything paid is kept,
# --resume later); 130 interrupted.
EXIT_VENDOR = 3
EXIT_INTERRUPTED = 130

DEFAULT_MODEL = f"local-dir:{REFERENCE_VENDOR_DIR}"
ModelOpt = Annotated[str, typer.Option(
    "--model", help="open_clip architecture name (with --weights) or local-dir:PATH. "
    "Default: the built-in reference vendor.", show_default=False)]
WeightsOpt = Annotated[Path | None, typer.Option(
    "--weights", help="Local weights file for a built-in architecture, e.g. open_clip_pytorch_model.bin.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
DataOpt = Annotated[Path | None, typer.Option(
    "--data", help="Image folder, root/<class name>/*.png|jpg. Default: the reference task.")]


# C0 and C1 controls but tab and newline, and the bidi overrides that reorder what a terminal shows
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def shown(text: object) -> str:
    """Untrusted text (class names, templates, vendor replies, paths) made safe to print with rich: control
    characters become visible escapes (no terminal sequences, no hyperlinks) and ``[...]`` is not markup."""
    visible = _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))
    return escape(visible)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` as an error (as plain text: it may quote untrusted input) and return the exit to raise."""
    err.print(f"[bold red]error:[/] {shown(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def load_backend(model: str, weights: Path | None, device: str,
                 memory_mb: float = MEMORY_BUDGET_MB) -> OpenClipBackend:
    """Build the in-process open_clip backend, turning setup mistakes into clean CLI errors."""
    use_passive_omp_wait()  # before torch loads
    from craft_adapter.vendors.open_clip_backend import BackendError, OpenClipBackend

    try:
        with err.status(f"loading {model}"):
            return OpenClipBackend(model, weights, device=device, memory_mb=memory_mb)
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


def train_data(data: Path | None, shots: int, seed: int) -> Path | LabeledImages:
    """What to fit on: the image folder, or the reference task's few-shot set (``shots`` per class by ``seed``)."""
    from craft_adapter.reference.task import reference_train

    if data is not None:
        return data
    try:
        return reference_train(shots, seed)
    except DataError as e:
        raise fail(str(e)) from None


def options_from(settings: type, *, panels: Mapping[str, str] | None = None, flags: Mapping[str, str] | None = None,
                 arguments: Iterable[str] = (), env_prefix: str | None = None,
                 unset: bool = False) -> dict[str, inspect.Parameter]:
    """typer parameters generated from a settings dataclass: one per field, with its type, default, help text
    (``metadata["help"]``) and help panel (``panels[metadata["group"]]``).

    ``flags`` renames a field's option (default ``--field-name``; booleans get ``--x/--no-x``); fields named in
    ``arguments`` become positional arguments. With ``env_prefix`` each reads ``<PREFIX><FIELD>`` too. With
    ``unset``, every option defaults to ``None`` (so the dataclass's own default, or its environment, applies),
    and help shows the field's default.
    """
    hints = typing.get_type_hints(settings)
    params = {}
    for f in fields(settings):
        kind, optional = _strip_none(hints[f.name])
        required = f.default is MISSING
        shown: Any = True
        if unset and not required:
            shown = False if f.default in (None, "") else str(f.default).lower() if kind is bool else str(f.default)
        extra: dict[str, Any] = {"help": f.metadata.get("help"), "show_default": shown,
                                 "rich_help_panel": (panels or {}).get(f.metadata.get("group", ""))}
        if env_prefix:
            extra.update(envvar=env_prefix + f.name.upper(), show_envvar=True)
        if f.name in arguments:
            info: Any = typer.Argument(**extra)
        else:
            flag = (flags or {}).get(f.name, "--" + f.name.replace("_", "-"))
            info = typer.Option(f"{flag}/--no-{flag[2:]}" if kind is bool else flag, **extra)
        annotation = kind | None if (optional or unset) and not required else kind
        default = inspect.Parameter.empty if required else None if unset else f.default
        params[f.name] = inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                           annotation=Annotated[annotation, info])
    return params


def with_options(command: Callable[..., None], options: Iterable[inspect.Parameter]) -> Callable[..., None]:
    """``command`` as typer sees it: its ``**kwargs`` replaced by ``options`` (it receives them by name)."""
    sig = inspect.signature(command, eval_str=True)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = sig.replace(parameters=[*own, *options])  # type: ignore[attr-defined]
    return command


def _strip_none(kind: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``, else ``(kind, False)``."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        rest = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return kind, False
