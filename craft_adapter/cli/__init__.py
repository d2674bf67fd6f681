"""The ``craft-adapter`` command line: one thin module per command group, all on the app in :mod:`.shared`.

Commands parse options, call the library, and turn its typed errors into exit codes; nothing else. Nothing
imports this package (an import contract checks it).

Every install kind gets the ``craft-adapter`` command, but the packages its commands need come with extras: the
command line itself (typer, rich) with ``[cli]``, ``serve`` with ``[server]``, ``fit``, ``export``, ``vendor`` and
``demo`` with ``[fit]``. So the app is assembled only when used, and :func:`main` turns a missing package into exit
code 2 and the ``pip install`` that adds it, never a traceback. ``--version`` answers before anything is
imported, so it works on a bare runtime install too.
"""

# no ``from __future__ import annotations``: typer reads the option annotation of ``_root``, defined where typer
# is imported, so it must be evaluated there and then
import sys
from importlib import metadata
from typing import TYPE_CHECKING, Annotated

if TYPE_CHECKING:
    import typer

__all__ = ["app", "main", "version"]

DISTRIBUTION = "craft-adapter"
EXTRA_FOR = {  # top-level module -> the extra that installs it
    "typer": "cli", "rich": "cli", "click": "cli", "shellingham": "cli",
    "starlette": "server", "uvicorn": "server", "multipart": "server", "python_multipart": "server",
    "torch": "fit", "torchvision": "fit", "open_clip": "fit", "timm": "fit", "cma": "fit", "onnx": "fit",
}
_app: "typer.Typer | None" = None


def version() -> str:
    """The installed distribution's version, or the source tree's when it is not installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        from craft_adapter import __version__

        return __version__


def _build() -> "typer.Typer":
    """The app with every command group registered (once)."""
    global _app
    if _app is None:
        import typer

        from craft_adapter.cli import caching, evaluation, fitting, serving, shipping
        from craft_adapter.cli.shared import app

        def show_version(value: bool) -> None:
            if value:
                typer.echo(f"{DISTRIBUTION} {version()}")
                raise typer.Exit()

        @app.callback()
        def _root(_version: Annotated[bool, typer.Option(
                "--version", "-V", help="Print the version and exit.", is_eager=True, callback=show_version)] = False,
        ) -> None:
            """Fine-tune a black-box vision-language model for few-shot classification (CraFT)."""

        for group in (evaluation, fitting, shipping, serving, caching):
            group.register(app)
        _app = app
    return _app


def __getattr__(name: str) -> "typer.Typer":  # ``from craft_adapter.cli import app`` assembles it on first use
    if name == "app":
        return _build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def missing_extra_message(error: ModuleNotFoundError, argv: list[str]) -> str | None:
    """What to tell the user when ``error`` is a package of an extra this install lacks, else None."""
    module = (error.name or "").split(".")[0]
    extra = EXTRA_FOR.get(module)
    if extra is None:
        return None
    command = next((a for a in argv if not a.startswith("-")), None)
    what = f"`craft-adapter {command}`" if command and extra != "cli" else "the craft-adapter command line"
    kinds = " (or [server] / [fit], which include it)" if extra == "cli" else ""
    return (f"{what} needs {module}, which this install lacks: pip install '{DISTRIBUTION}[{extra}]'{kinds}. "
            "The bare install is the Python runtime only; see the README's Install section.")


def main() -> None:
    """Console entry point."""
    argv = sys.argv[1:]
    if argv[:1] in (["--version"], ["-V"]):
        print(f"{DISTRIBUTION} {version()}")
        return
    try:
        _build()()
    except ModuleNotFoundError as e:
        message = missing_extra_message(e, argv)
        if message is None:
            raise
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2) from None
