"""The ``craft-adapter`` command line: one thin module per command group, all on the app in :mod:`.shared`.

Commands parse options, call the library, and turn its typed errors into exit codes; nothing else. Nothing
imports this package (an import contract checks it).
"""

from __future__ import annotations

from craft_adapter.cli import caching, evaluation, fitting, serving, shipping
from craft_adapter.cli.shared import app

__all__ = ["app", "main"]


@app.callback()
def _root() -> None:
    """Fine-tune a black-box vision-language model for few-shot classification (CraFT)."""


for _group in (evaluation, fitting, shipping, serving, caching):
    _group.register(app)


def main() -> None:
    """Console entry point."""
    app()

