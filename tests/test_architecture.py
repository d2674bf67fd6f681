"""The architecture, checked by machine: import contracts, what serving loads, and one stem per module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from craft_adapter.testing.import_guard import installed_layout, serve_violations

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter on the copy at ``root`` with the contracts from its pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "pyproject.toml", "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_hold(tmp_path: Path) -> None:
    done = lint_imports(installed_layout(REPO, tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("victim, planted, contract", [
    ("serve/runtime.py", "import craft_adapter.training.loop", "serve imports only artifact"),
    ("vendors/protocols.py", "import craft_adapter.blackbox.meter", "Layers"),
    ("training/refiner.py", "import craft_adapter.cli.shared", "Nothing imports the CLI"),
    ("serve/session.py", "import torch", "serve imports only artifact"),
])
def test_a_planted_violation_breaks_its_contract(tmp_path: Path, victim: str, planted: str, contract: str) -> None:
    root = installed_layout(REPO, tmp_path)
    path = root / "craft_adapter" / victim
    path.write_text(path.read_text() + f"\n{planted}  # planted\n")
    done = lint_imports(root)
    assert done.returncode != 0
    broken = done.stdout.split("Broken contracts")[-1]
    assert contract in broken and victim.replace("/", ".").removesuffix(".py") in broken


CLOSURE = """
import json, sys
import craft_adapter.serve
import craft_adapter.serve.server.http_app
print(json.dumps(sorted(m for m in sys.modules if m.startswith("craft_adapter") or m.split(".")[0] in
                        {"torch", "open_clip", "sqlite3", "_sqlite3", "onnx", "cma"})))
"""


def test_what_import_craft_adapter_serve_loads() -> None:
    done = subprocess.run([sys.executable, "-c", CLOSURE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert serve_violations(loaded) == []
    assert all(m.split(".")[1] in {"serve", "artifact", "vendors"} for m in loaded if m.count("."))
    assert "craft_adapter.serve.server.http_app" in loaded  # the check really saw the server


def test_no_two_modules_share_a_stem() -> None:
    stems = Counter(p.stem for d in ("craft_adapter", "serve", "export") for p in (REPO / d).rglob("*.py")
                    if p.stem not in {"__init__", "__main__"})
    assert [s for s, n in stems.items() if n > 1] == []
