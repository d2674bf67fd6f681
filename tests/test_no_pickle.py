"""No pickle and no code on any load path: a static scan of the source, and loads with pickle made to explode."""

from __future__ import annotations

import ast
import io
import pickle
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY_CFG

from craft_adapter.artifact.adapter_file import Adapter
from craft_adapter.artifact.synthetic import synthetic_adapter
from craft_adapter.vendors import open_clip_backend
from craft_adapter.vendors.open_clip_backend import BackendError, OpenClipBackend

# isort: split
from craft_adapter.export import export_onnx
from craft_adapter.serve.shipped import ShippedAdapter

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("craft_adapter", "export", "serve")
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}
BANNED_CALLS = {"eval", "exec"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def _kw_present(call: ast.Call, name: str) -> bool:
    return any(k.arg == name or k.arg is None for k in call.keywords)  # **kwargs could carry it


def scan_source(source: str, filename: str = "<source>") -> list[str]:
    """Every import or call in ``source`` that could unpickle or run code: ``file:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in BANNED_MODULES:
                found.append(f"{where}: from {module} import ...")
            if module.split(".")[0] in ("torch", "numpy", "yaml") and any(
                    a.name in ("load", "unsafe_load", "full_load", "load_all") for a in node.names):
                found.append(f"{where}: from {module} import load (unchecked)")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in BANNED_CALLS or name in {f"builtins.{c}" for c in BANNED_CALLS}:
                found.append(f"{where}: {name}()")
            elif name == "torch.load" and not _kw_is_true(node, "weights_only"):
                found.append(f"{where}: torch.load without weights_only=True")
            elif name in ("torch.jit.load", "torch.hub.load", "torch.package.PackageImporter"):
                found.append(f"{where}: {name}() runs code")
            elif name in ("np.load", "numpy.load") and _kw_present(node, "allow_pickle"):
                if not any(k.arg == "allow_pickle" and isinstance(k.value, ast.Constant) and k.value.value is False
                           for k in node.keywords):
                    found.append(f"{where}: {name} with allow_pickle")
            elif name.startswith("yaml.") and name.split(".")[-1] in ("load", "unsafe_load", "full_load", "load_all"):
                found.append(f"{where}: {name}()")
            elif name.endswith(".read_pickle"):
                found.append(f"{where}: {name}()")
    return found


def _python_files() -> Iterator[Path]:
    for folder in SCANNED:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_the_library_never_unpickles_or_evaluates() -> None:
    files = list(_python_files())
    assert len(files) > 30 and any(f.name == "open_clip_backend.py" for f in files)
    found = [hit for f in files for hit in scan_source(f.read_text(), str(f.relative_to(ROOT)))]
    assert found == []


@pytest.mark.parametrize("source", [
    "import pickle", "import cPickle as p", "from pickle import loads", "import dill", "import joblib.numpy_pickle",
    "import marshal", "import shelve", "from _pickle import Unpickler", "torch.load(p)",
    "torch.load(p, weights_only=False)", "torch.load(p, map_location='cpu', **kw)", "torch.jit.load(p)",
    "np.load(p, allow_pickle=True)", "numpy.load(p, allow_pickle=flag)", "eval('1')", "exec(code)",
    "builtins.eval(s)", "yaml.load(s)", "yaml.unsafe_load(s)", "from torch import load", "df = pd.read_pickle(p)",
])
def test_the_scan_catches_each_violation(source: str) -> None:
    assert scan_source(source) != []


@pytest.mark.parametrize("source", [
    "torch.load(p, weights_only=True)", "np.load(p)", "np.load(p, allow_pickle=False)", "yaml.safe_load(s)",
    "model.eval()", "json.loads(s)", "from safetensors.numpy import load",
])
def test_the_scan_passes_safe_code(source: str) -> None:
    assert scan_source(source) == []


# -- at run time, with pickle made to explode -----------------------------------------------------------------------

class PickleUsed(AssertionError):
    """Something reached pickle."""


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """pickle.load(s) and both Unpicklers raise; torch.load raises unless weights_only=True. The list of its calls."""
    import _pickle

    def boom(*args: Any, **kwargs: Any) -> None:
        raise PickleUsed("pickle was used on a load path")

    for module in (pickle, _pickle):
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(module, name, boom)
    monkeypatch.setattr(pickle, "_Unpickler", boom)
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def guarded_load(*args: Any, **kwargs: Any) -> Any:
        calls.append(dict(kwargs))
        if kwargs.get("weights_only") is not True:
            raise PickleUsed(f"torch.load without weights_only=True: {kwargs}")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded_load)
    return calls


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A soft adapter with ctx, a text adapter, and the text adapter's exported .onnx."""
    d = tmp_path_factory.mktemp("no_pickle")
    a = synthetic_adapter(6, seed=1)
    soft = Adapter(a.class_names, a.template, "soft", "logits", 50.0, a.refiner, ctx=np.zeros((4, 16), np.float32))
    text = a.save(d / "text.safetensors")
    return {"soft": soft.save(d / "soft.safetensors"), "text": text, "onnx": export_onnx(text).path}


def test_every_adapter_loads_with_pickle_disabled(files: dict[str, Path], no_pickle: list[dict[str, Any]]) -> None:
    with pytest.raises(PickleUsed):  # the trap works
        pickle.loads(pickle.dumps(1))
    scores = np.full((2, 6), 1 / 6, np.float32)
    assert Adapter.load(files["soft"]).ctx.shape == (4, 16)
    for key in ("soft", "text", "onnx"):
        refined, probs = ShippedAdapter.load(files[key], device="cpu").refine(scores)
        assert refined.shape == (2, 6) and np.isfinite(probs).all()
    assert no_pickle == []


# -- open_clip weights --------------------------------------------------------------------------------------------

def _folder_with(tiny_model_dir: Path, tmp_path: Path, name: str, payload: bytes) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "open_clip_config.json", folder)
    (folder / name).write_bytes(payload)
    return folder


def _torch_saved_state(tiny_model_dir: Path) -> bytes:
    from safetensors.torch import load_file

    buf = io.BytesIO()
    torch.save(load_file(tiny_model_dir / "open_clip_model.safetensors"), buf)
    return buf.getvalue()


def _type_error_pickle() -> bytes:
    """A torch zip file whose pickle calls an allowed global (OrderedDict) with bad arguments: a TypeError under
    weights_only=True, which makes open_clip retry torch.load without weights_only."""
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(2)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for n in src.namelist():
            z.writestr(n, b"\x80\x02ccollections\nOrderedDict\nK\x01\x85R." if n.endswith("data.pkl") else src.read(n))
    return out.getvalue()


@pytest.mark.parametrize("name", ["open_clip_pytorch_model.bin", "model.pth"])
def test_open_clip_bin_weights_load_with_weights_only(tiny_model_dir: Path, tmp_path: Path, name: str,
                                                      no_pickle: list[dict[str, Any]]) -> None:
    folder = _folder_with(tiny_model_dir, tmp_path, name, _torch_saved_state(tiny_model_dir))
    backend = OpenClipBackend(f"local-dir:{folder}", device="cpu")
    reference = OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu")
    assert len(no_pickle) == 2 and all(c.get("weights_only") is True for c in no_pickle)  # our check, open_clip's load
    np.testing.assert_array_equal(backend.embed_texts(["a cat"]), reference.embed_texts(["a cat"]))


def test_open_clip_builtin_name_with_a_bin_file(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                no_pickle: list[dict[str, Any]]) -> None:
    """The built-in-name form (``--model NAME --weights file.bin``), with the tiny config registered as a name."""
    import open_clip.factory

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "craft-tiny-test", TINY_CFG)
    (tmp_path / "w.bin").write_bytes(_torch_saved_state(tiny_model_dir))
    backend = OpenClipBackend("craft-tiny-test", weights=tmp_path / "w.bin", device="cpu")
    assert len(no_pickle) == 2 and all(c.get("weights_only") is True for c in no_pickle)
    reference = OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu")
    np.testing.assert_array_equal(backend.embed_texts(["a cat"]), reference.embed_texts(["a cat"]))


def test_a_crafted_bin_never_reaches_a_full_unpickle(tiny_model_dir: Path, tmp_path: Path,
                                                     no_pickle: list[dict[str, Any]]) -> None:
    folder = _folder_with(tiny_model_dir, tmp_path, "open_clip_pytorch_model.bin", _type_error_pickle())
    with pytest.raises(BackendError, match="not plain tensors.*weights_only=True"):
        OpenClipBackend(f"local-dir:{folder}", device="cpu")
    (tmp_path / "w.bin").write_bytes(_type_error_pickle())
    with pytest.raises(BackendError, match="not plain tensors"):
        OpenClipBackend("RN50", weights=tmp_path / "w.bin", device="cpu")
    assert no_pickle and all(c.get("weights_only") is True for c in no_pickle)


def test_open_clip_alone_would_retry_without_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the check exists: open_clip's loader retries a TypeError without weights_only (full unpickle on torch<2.6
    or with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1). If this starts failing, open_clip fixed it upstream."""
    import open_clip.factory

    calls: list[dict[str, Any]] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    (tmp_path / "w.bin").write_bytes(_type_error_pickle())
    with pytest.raises(TypeError):
        open_clip.factory.load_state_dict(str(tmp_path / "w.bin"))
    if len(calls) == 1:
        pytest.skip("open_clip no longer retries without weights_only; the check is now belt and braces")
    assert [c.get("weights_only") for c in calls] == [True, None]
    assert "retries without the flag" in (open_clip_backend._require_weights_only.__doc__ or "")
