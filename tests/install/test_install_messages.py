"""What a user sees when an install lacks something: exit code 2 and the extra to install, never a traceback; and a
warning naming the fix when two onnxruntime builds are installed. Fast; runs with the ordinary suite.

A package is made absent the way Python sees a missing one: a finder that raises ``ModuleNotFoundError`` for it
(the real installs without it are exercised by ``test_install_kinds.py``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from craft_adapter.artifact.synthetic import synthetic_adapter


def absent(modules: list[str]) -> str:
    """Python source that makes the top-level ``modules`` look not installed."""
    return ("import sys\n"
            "class _Absent:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.split('.')[0] in {modules!r}:\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, _Absent())\n")


def cli(missing: list[str], args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``craft-adapter ARGS`` in a fresh process where ``missing`` are not installed."""
    code = absent(missing) + f"sys.argv = ['craft-adapter', *{args!r}]\nfrom craft_adapter.cli import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("missing", "args", "extra"), [
    (["torch", "open_clip", "cma"], ["fit", "-o", "x.safetensors", "--no-cache"], "fit"),
    (["torch", "onnx"], ["export", "a.safetensors", "--onnx"], "fit"),
    (["torch", "open_clip"], ["vendor", "--port", "0"], "fit"),
    (["starlette", "uvicorn", "multipart", "python_multipart"], ["serve", "a.safetensors", "--vendor",
                                                                  "http://127.0.0.1:9/"], "server"),
    (["typer", "rich", "click"], ["inspect", "a.safetensors"], "cli"),
])
def test_missing_extra_exits_2_and_names_it(tmp_path: Path, missing: list[str], args: list[str], extra: str) -> None:
    synthetic_adapter(3).save(tmp_path / "a.safetensors")
    proc = cli(missing, args, tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"pip install 'craft-adapter[{extra}]'" in proc.stderr
    assert "Traceback" not in proc.stderr and "╭" not in proc.stderr


def test_version_needs_no_command_line_packages(tmp_path: Path) -> None:
    from craft_adapter.cli import version

    proc = cli(["typer", "rich", "click", "torch", "numpy"], ["--version"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"craft-adapter {version()}"


def test_other_missing_modules_are_not_hidden(tmp_path: Path) -> None:
    """A module no extra provides is a bug to see, not an install to suggest."""
    proc = cli(["sqlite3", "_sqlite3"], ["cache", "stats", str(tmp_path / "c.sqlite")], tmp_path)
    assert proc.returncode == 1
    assert "sqlite3" in proc.stderr and "pip install" not in proc.stderr


def test_two_onnxruntime_builds_warn_with_the_fix(tmp_path: Path) -> None:
    """Planted distribution metadata, found by the real importlib.metadata before the installed ones."""
    for dist, name in (("onnxruntime", "onnxruntime"), ("onnxruntime_gpu", "onnxruntime-gpu")):
        info = tmp_path / "site" / f"{dist}-9.9.9.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 9.9.9\n")
    synthetic_adapter(3).save(tmp_path / "a.safetensors")
    code = ("import sys, warnings\n"
            f"sys.path.insert(0, {str(tmp_path / 'site')!r})\n"
            "from craft_adapter.serve import ShippedAdapter\n"
            "from craft_adapter.serve.session import OnnxruntimeConflictWarning\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    warnings.simplefilter('always')\n"
            f"    ShippedAdapter.load({str(tmp_path / 'a.safetensors')!r}, device='cpu')\n"
            f"    ShippedAdapter.load({str(tmp_path / 'a.safetensors')!r}, device='cpu')\n"
            "hits = [str(w.message) for w in seen if issubclass(w.category, OnnxruntimeConflictWarning)]\n"
            "print(len(hits)); print(hits[0] if hits else '')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    count, message = proc.stdout.strip().split("\n", 1)
    assert count == "1"  # once per process
    assert "onnxruntime==9.9.9 and onnxruntime-gpu==9.9.9" in message
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in message
