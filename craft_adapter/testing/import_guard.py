"""The import guard: what a torch-free process may load, checked on the modules it really loaded.

The import-linter contracts in ``pyproject.toml`` check the import graph statically; this checks a running
process, which also catches imports made through strings, plug-ins or a dependency's own imports.

import-linter finds a package's modules by walking its folder, but ``serve/`` and ``export/`` install as
``craft_adapter.serve`` and ``craft_adapter.export`` through a package-dir mapping, so :func:`installed_layout`
copies the sources into the layout a wheel has before the contracts are checked.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

# never in a process that only serves adapters: frameworks, the query cache's SQLite, the fit's modules
HEAVY_TOP_LEVEL = frozenset({"torch", "torchvision", "open_clip", "open_clip_train", "sqlite3", "_sqlite3"})
TRAINING_SIDE = ("craft_adapter.training", "craft_adapter.blackbox", "craft_adapter.cli", "craft_adapter.export",
                 "craft_adapter.reference", "craft_adapter.vendors.open_clip_backend")


def heavy_modules(loaded: Iterable[str]) -> list[str]:
    """The modules in ``loaded`` from heavy frameworks (torch, open_clip) or SQLite."""
    return sorted(m for m in loaded if m.split(".")[0] in HEAVY_TOP_LEVEL)


def serve_violations(loaded: Iterable[str]) -> list[str]:
    """The modules in ``loaded`` that a serving process must not load (heavy frameworks or training code)."""
    return sorted(m for m in loaded if m.split(".")[0] in HEAVY_TOP_LEVEL
                  or any(m == t or m.startswith(t + ".") for t in TRAINING_SIDE))


def blocker_source(blocked: Iterable[str]) -> str:
    """Python source that makes importing any of the top-level packages ``blocked`` fail, for ``python -c``."""
    names = sorted(set(blocked))
    return (
        "import sys\n"
        "class _Blocked:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {names!r}:\n"
        "            raise ImportError(f'{name} is blocked: this process must not need it')\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Blocked())\n"
    )


def installed_layout(repo: Path, dest: Path) -> Path:
    """Copy ``repo``'s sources into ``dest`` laid out as installed (serve/ and export/ inside craft_adapter/)."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "vendor")
    package = dest / "craft_adapter"
    shutil.copytree(repo / "craft_adapter", package, ignore=skip)
    shutil.copytree(repo / "serve", package / "serve", ignore=skip)
    shutil.copytree(repo / "export", package / "export", ignore=skip)
    shutil.copy(repo / "pyproject.toml", dest / "pyproject.toml")
    return dest
