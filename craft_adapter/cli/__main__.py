"""``python -m craft_adapter.cli``: the same as the ``craft-adapter`` command."""

from craft_adapter.cli import main

main()
