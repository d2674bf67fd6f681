"""End to end, as a user ships it: the local vendor on loopback, a fit through the real Hugging Face client,
ONNX export, then the runtime in a separate venv with no torch, wrapping the real InferenceClient."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import local_vendor
from huggingface_hub import InferenceClient

from craft_adapter.blackbox.box import BlackBox
from craft_adapter.blackbox.meter import QueryMeter
from craft_adapter.reference.task import reference_task
from craft_adapter.training.api import fit_adapter
from craft_adapter.training.config import FitConfig
from craft_adapter.training.evaluate import accuracy, adapted_scores

# isort: split
from craft_adapter.export import export_onnx
from craft_adapter.serve import HfInferenceVendor

REPO = Path(__file__).resolve().parents[2]
N_TEST = 300
# the build tools and the real Hugging Face client; the runtime's own dependencies come from pyproject.toml
RUNTIME_PACKAGES = ["huggingface_hub", "setuptools>=68", "wheel"]


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def vendor_url(reference_vendor_dir):
    with local_vendor(reference_vendor_dir) as url:
        yield url


@pytest.fixture(scope="module")
def torch_free_python(tmp_path_factory) -> Path:
    """A fresh venv with the bare install of craft-adapter (the torch-free runtime) and huggingface_hub."""
    venv = tmp_path_factory.mktemp("runtime-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt")]
    subprocess.run([*pip, *RUNTIME_PACKAGES], check=True)
    subprocess.run([*pip, "--no-build-isolation", "-e", str(REPO)], check=True)  # the bare install: the runtime
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "None", "the runtime venv must not have torch"
    return py


RUNTIME_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from huggingface_hub import InferenceClient
    from PIL import Image
    from craft_adapter.serve import HfInferenceVendor, load_runtime

    onnx_path, url, folder, out = sys.argv[1:]
    runtime = load_runtime(onnx_path, HfInferenceVendor(InferenceClient(model=url)))
    files = sorted(Path(folder).glob("*.png"), key=lambda p: int(p.stem))
    images = [Image.open(f) for f in files]
    batch = runtime.predict(images[:-1])
    one = runtime.predict_one(images[-1])
    assert "torch" not in sys.modules and "open_clip" not in sys.modules
    last = [one.probabilities[c] for c in runtime.class_names]
    json.dump({"labels": batch.labels + [one.label],
               "probabilities": [p.tolist() for p in batch.probabilities] + [last]}, open(out, "w"))
""")


@pytest.mark.slow
def test_fit_through_hf_export_and_serve_without_torch(vendor_url, torch_free_python, tmp_path):
    # 1. fit through the real huggingface_hub client against the local vendor (text prompt, refiner)
    backend = HfInferenceVendor(InferenceClient(model=vendor_url))
    cfg = FitConfig(shots=8, seed=1, budget=8000, prompt="text", train_prompt=False)
    train, test = reference_task(cfg.shots, cfg.seed)
    outcome = fit_adapter(train, backend, cfg)
    adapter = outcome.adapter
    assert adapter.mode == "text" and adapter.logit_kind == "probabilities"
    assert outcome.record.meter["vendor_calls"] == len(train)  # each few-shot image scored once with the template
    adapter_path = adapter.save(tmp_path / "adapter.safetensors")

    # 2. export the refiner
    onnx_path = tmp_path / "adapter.onnx"
    export_onnx(adapter_path, onnx_path)

    # 3. in-process adapted predictions on part of the shifted test set, through the same client
    idx = np.random.default_rng(0).choice(len(test), N_TEST, replace=False)
    images = [test.images[i] for i in idx]
    y = test.labels[idx]
    test_box = BlackBox(backend, images, test.class_names, QueryMeter())
    raw, refined = adapted_scores(test_box, adapter)
    expected = softmax(refined)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(images):
        im.save(folder / f"{i}.png")

    # 4. the torch-free runtime in its own venv, wrapping the real InferenceClient
    out = tmp_path / "runtime.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([str(torch_free_python), "-c", RUNTIME_SCRIPT, str(onnx_path), vendor_url, str(folder), str(out)],
                   check=True, env=env, cwd=tmp_path, timeout=600)
    got = json.loads(out.read_text())
    assert got["labels"] == [adapter.class_names[i] for i in expected.argmax(1)]
    np.testing.assert_allclose(np.array(got["probabilities"]), expected, atol=1e-5, rtol=0)
    vendor_alone, adapted = accuracy(raw, y), accuracy(refined, y)
    print(f"vendor alone {vendor_alone:.3f}, adapted {adapted:.3f} on {N_TEST} shifted test images")
    assert adapted > vendor_alone + 0.05
