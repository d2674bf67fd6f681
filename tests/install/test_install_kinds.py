"""CI: the built wheel, installed from the registry into one fresh venv per install kind, does each kind's job.

- runtime (bare ``pip install craft-adapter``): no torch, no onnx, no command-line or server packages (aiohttp
  among them); wraps the local vendor and classifies, from the ``.safetensors`` adapter and from its exported
  ``.onnx``, identically;
- server (``[server]``): no torch, no onnx, with aiohttp (its vendor client); serves the adapter and classifies
  over HTTP, with the runtime's answer;
- fit (``[fit]``): a tiny soft fit on the reference vendor shipped in the wheel, a tiny text fit against the local
  vendor over HTTP, and ``export --onnx`` of both.

Every kind passes ``pip check`` and answers ``--version``; a command whose extra is missing exits 2 and names it.
Runs with ``make install-check`` (``.ci/run``); about 5 minutes on 2 cores, most of it installing torch.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import random_images
from install_venvs import (
    ABSENT,
    KINDS,
    PRESENT,
    Process,
    Venv,
    build_wheel,
    make_venv,
    run,
    runtime_classify,
    start_server,
    start_vendor,
    text_fit,
)

pytestmark = pytest.mark.install


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder outside the checkout for the wheel, the venvs and every command's working directory."""
    return tmp_path_factory.mktemp("install_kinds")


@pytest.fixture(scope="module")
def wheel(workdir: Path) -> Path:
    """The wheel, built from the checkout's files."""
    return build_wheel(workdir / "wheel")


@pytest.fixture(scope="module")
def venvs(wheel: Path, workdir: Path) -> dict[str, Venv]:
    """One fresh venv per install kind, each with the wheel installed as that kind."""
    return {kind: make_venv(kind, wheel, workdir / f"venv-{kind}") for kind in KINDS}


@pytest.fixture(scope="module")
def vendor(venvs: dict[str, Venv], workdir: Path) -> Process:
    """The local reference vendor, from the fit venv, in its own process."""
    proc = start_vendor(venvs["fit"], workdir)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def adapter(venvs: dict[str, Venv], vendor: Process, workdir: Path) -> Path:
    """A text-mode adapter fitted by the fit venv against the vendor over HTTP, exported beside it."""
    return text_fit(venvs["fit"], vendor.url, workdir / "fitted" / "text.safetensors")


@pytest.fixture(scope="module")
def images(workdir: Path) -> list[Path]:
    """Three PNG images on disk."""
    paths = []
    for i, im in enumerate(random_images(3, seed=7)):
        paths.append(workdir / f"image{i}.png")
        im.save(paths[-1])
    return paths


def version_of(wheel: Path) -> str:
    """The version in the wheel's file name."""
    return wheel.name.split("-")[1]


def test_wheel_is_self_contained(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for data in ("open_clip_config.json", "open_clip_model.safetensors"):
        assert f"craft_adapter/reference/vendor/{data}" in names
    assert not [n for n in names if n.split("/")[0] in ("serve", "export", "reference", "tests", "benchmarks")]


@pytest.mark.parametrize("kind", list(KINDS))
def test_kind_has_what_it_needs_and_nothing_heavier(venvs: dict[str, Venv], kind: str) -> None:
    v = venvs[kind]
    installed = v.packages()
    assert PRESENT[kind] <= set(installed), sorted(PRESENT[kind] - set(installed))
    assert not ABSENT[kind] & set(installed), sorted(ABSENT[kind] & set(installed))
    check = v.pip_check()
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("kind", list(KINDS))
def test_version(venvs: dict[str, Venv], wheel: Path, workdir: Path, kind: str) -> None:
    out = run(venvs[kind].cli("--version"), cwd=workdir).stdout
    assert out.strip() == f"craft-adapter {version_of(wheel)}"


@pytest.mark.parametrize(("kind", "args", "extra"), [
    ("runtime", ["fit", "-o", "x.safetensors"], "[cli]"),
    ("runtime", ["inspect", "x.safetensors"], "[cli]"),
    ("server", ["fit", "-o", "x.safetensors", "--no-cache"], "[fit]"),
    ("server", ["vendor", "--port", "0"], "[fit]"),
])
def test_missing_extra_exits_2_and_names_it(venvs: dict[str, Venv], workdir: Path, kind: str, args: list[str],
                                            extra: str) -> None:
    proc = run(venvs[kind].cli(*args), cwd=workdir, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"pip install 'craft-adapter{extra}'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_runtime_has_no_onnx_or_torch_to_import(venvs: dict[str, Venv], workdir: Path) -> None:
    for module in ("onnx", "torch", "open_clip"):
        proc = run([venvs["runtime"].python, "-c", f"import {module}"], cwd=workdir, check=False)
        assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr


def test_fit_kind_soft_fit_on_the_shipped_reference_vendor_and_export(venvs: dict[str, Venv], workdir: Path) -> None:
    out = workdir / "soft" / "soft.safetensors"
    out.parent.mkdir()
    fit = venvs["fit"]
    fitted = run(fit.cli("fit", "-o", str(out), "--shots", "2", "--budget", "50", "--no-cache"), cwd=out.parent)
    run(fit.cli("export", str(out), "--onnx"), cwd=out.parent)
    assert out.stat().st_size > 0 and out.with_suffix(".onnx").stat().st_size > 0
    assert "Warning" not in fitted.stderr, fitted.stderr  # e.g. cma's "cannot plot" on an install without matplotlib


def test_fit_kind_text_fit_against_the_vendor_and_export(adapter: Path) -> None:
    assert adapter.stat().st_size > 0 and adapter.with_suffix(".onnx").stat().st_size > 0


def test_runtime_kind_wraps_the_vendor_and_classifies(venvs: dict[str, Venv], vendor: Process, adapter: Path,
                                                      images: list[Path], workdir: Path) -> None:
    from_safetensors = runtime_classify(venvs["runtime"], adapter, vendor.url, images, workdir)
    from_onnx = runtime_classify(venvs["runtime"], adapter.with_suffix(".onnx"), vendor.url, images, workdir)
    assert from_safetensors["heavy"] == [] and from_onnx["heavy"] == []
    assert len(from_safetensors["classes"]) == 10 and set(from_safetensors["labels"]) <= set(
        from_safetensors["classes"])
    probs = np.array(from_safetensors["probabilities"])
    assert probs.shape == (3, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(probs, np.array(from_onnx["probabilities"]), atol=1e-5)


def test_server_kind_serves_the_adapter_and_classifies_over_http(venvs: dict[str, Venv], vendor: Process,
                                                                 adapter: Path, images: list[Path],
                                                                 wheel: Path, workdir: Path) -> None:
    expected = runtime_classify(venvs["runtime"], adapter, vendor.url, images, workdir)
    server = start_server(venvs["server"], adapter, vendor.url, workdir)
    try:
        server.wait_for("/healthz")
        info = httpx.get(server.url + "/v1/info", timeout=10).json()
        assert info["version"] == version_of(wheel)
        for i, path in enumerate(images):
            r = httpx.post(server.url + "/v1/classify", content=path.read_bytes(),
                           headers={"Content-Type": "image/png"}, timeout=60)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["label"] == expected["labels"][i], body
            assert body["probability"] == pytest.approx(max(expected["probabilities"][i]), abs=1e-5)
        buf = io.BytesIO()
        random_images(1, seed=99)[0].save(buf, format="PNG")
        hf = httpx.post(server.url + "/", content=buf.getvalue(), headers={"Content-Type": "image/png"}, timeout=60)
        assert hf.status_code == 200 and len(hf.json()) == 10
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()
