"""The vendor plug-in point: built-ins, register_vendor, and a plug-in package installed into a fresh venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import random_images

from craft_adapter.vendors.cohere_embed import CohereEmbedVendor
from craft_adapter.vendors.credentials import Secret
from craft_adapter.vendors.http_clients import HttpZeroShotVendor
from craft_adapter.vendors.openai_embeddings import OpenAIEmbeddingsVendor
from craft_adapter.vendors.registry import (
    VendorRegistryError,
    available_protocols,
    make_vendor,
    register_vendor,
    unregister_vendor,
)
from craft_adapter.vendors.voyage_embed import VoyageEmbedVendor


def test_builtins_make_the_right_clients_and_keys_stay_secret():
    assert isinstance(make_vendor("hf-zero-shot", "http://127.0.0.1:9/zs"), HttpZeroShotVendor)
    v = make_vendor("openai-embeddings", "http://127.0.0.1:9", key="sk-123456", model="clip")
    assert isinstance(v, OpenAIEmbeddingsVendor) and v.identity["model"] == "clip" and "sk-123456" not in repr(
        v.identity)
    assert isinstance(make_vendor("cohere", None, key=Secret("k")), CohereEmbedVendor)
    assert make_vendor("voyage", None).url == "https://api.voyageai.com/v1"
    assert isinstance(make_vendor("voyage", None), VoyageEmbedVendor)
    assert available_protocols()[:4] == ["hf-zero-shot", "openai-embeddings", "cohere", "voyage"]


def test_unknown_protocols_options_and_names_are_refused():
    with pytest.raises(VendorRegistryError, match="unknown vendor protocol 'nope'.*hf-zero-shot"):
        make_vendor("nope", "http://x")
    with pytest.raises(VendorRegistryError, match="does not take"):
        make_vendor("openai-embeddings", "http://x", colour="blue")
    with pytest.raises(VendorRegistryError, match="already taken"):
        register_vendor("cohere", lambda url, **kw: None)
    register_vendor("not-a-vendor", lambda url, *, key=None, model=None: 42)
    try:
        with pytest.raises(VendorRegistryError, match="not a vendor"):
            make_vendor("not-a-vendor", None)
        with pytest.raises(VendorRegistryError, match="already taken"):
            register_vendor("not-a-vendor", lambda url, **kw: None)
    finally:
        unregister_vendor("not-a-vendor")


def test_a_registered_protocol_is_used_by_make_vendor():
    calls = []

    def factory(url, *, key=None, model=None, scale=1.0):
        calls.append((url, key.reveal() if key else None, model, scale))
        return lambda images, prompts: np.zeros((len(images), len(prompts)))

    register_vendor("mine", factory)
    try:
        vendor = make_vendor("mine", "http://v", key="abc", model="m", scale=2.0)
        assert vendor(random_images(2), ["a", "b", "c"]).shape == (2, 3)
        assert calls == [("http://v", "abc", "m", 2.0)] and "mine" in available_protocols()
    finally:
        unregister_vendor("mine")


PLUGIN = '''
"""A vendor protocol for the /embed API of `craft-adapter vendor`, in the shape any plug-in takes."""
import base64, io, json, urllib.request

import numpy as np
from craft_adapter.vendors.protocols import Capabilities


class TinyEmbedVendor:
    capabilities = Capabilities(style="embedding")
    logit_scale = None  # the adapter records the scale it was fitted with

    def __init__(self, url, *, key=None, model=None):
        self.url, self.identity = url.rstrip("/"), {"name": "tiny-embed", "url": url}

    def _post(self, path, inputs):
        req = urllib.request.Request(self.url + path, json.dumps({"inputs": inputs}).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            return np.asarray(json.load(r)["embeddings"], np.float32)

    def embed_images(self, images):
        def png(im):
            buf = io.BytesIO(); im.save(buf, format="PNG"); return base64.b64encode(buf.getvalue()).decode()
        return self._post("/embed/images", [png(im) for im in images])

    def embed_texts(self, texts):
        return self._post("/embed/texts", list(texts))
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "craft-tiny-embed"
version = "0.1.0"
dependencies = []

[project.entry-points."craft_adapter.vendors"]
tiny-embed = "craft_tiny_embed:TinyEmbedVendor"

[tool.setuptools]
py-modules = ["craft_tiny_embed"]
'''

USE_IT = '''
import json, sys
from craft_adapter.vendors.registry import available_protocols, make_vendor
v = make_vendor("tiny-embed", sys.argv[1])
print(json.dumps({"protocols": available_protocols(), "identity": v.identity,
                  "width": int(v.embed_texts(["a coat"]).shape[1])}))
'''


@pytest.fixture
def plugin_python(tmp_path):
    """A fresh venv that sees the project venv's packages and has the plug-in wheel installed in it."""
    src = tmp_path / "plugin"
    src.mkdir()
    (src / "craft_tiny_embed.py").write_text(textwrap.dedent(PLUGIN))
    (src / "pyproject.toml").write_text(PYPROJECT)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, src], check=True, timeout=300)
    (wheel,) = dist.glob("craft_tiny_embed-0.1.0-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # the project venv's packages (torch, the editable craft-adapter) seen from the fresh venv, .pth files included
    Path(site, "project-venv.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    subprocess.run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], check=True, timeout=300)
    return python


def test_a_plugin_package_works_through_make_vendor_and_cli_eval(plugin_python, tiny_model_dir, tmp_path):
    from craft_adapter.blackbox.box import BlackBox
    from craft_adapter.blackbox.meter import QueryMeter
    from craft_adapter.reference.local_vendor import make_vendor_server, serve_in_thread
    from craft_adapter.training.config import FitConfig
    from craft_adapter.training.loop import fit
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    assert "tiny-embed" not in available_protocols()  # installed only in the fresh venv
    backend = OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu")
    classes, images = ["bag", "coat"], random_images(16, seed=5)
    labels = np.arange(16) % 2
    cfg = FitConfig(shots=4, budget=20, prompt="text", text_children=3, text_elites=2, hidden=8, holdout_shots=0)
    box = BlackBox(backend, images[:8], classes, QueryMeter(cfg.resolved_budget, cfg.budget_unit))
    adapter_path = fit(box, None, labels[:8], None, cfg).adapter.save(tmp_path / "text.safetensors")
    data = tmp_path / "test"
    for i in range(8, 16):
        (data / classes[labels[i]]).mkdir(parents=True, exist_ok=True)
        images[i].save(data / classes[labels[i]] / f"{i}.png")
    server = make_vendor_server(backend)
    thread = serve_in_thread(server)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        got = subprocess.run([plugin_python, "-c", USE_IT, server.url], check=True, capture_output=True, text=True,
                             env=env, timeout=300)
        report = json.loads(got.stdout)
        assert "tiny-embed" in report["protocols"] and report["identity"]["name"] == "tiny-embed"
        assert report["width"] == backend.embed_texts(["x"]).shape[1]
        cli = [plugin_python, "-m", "craft_adapter.cli", "eval", adapter_path, "--data", data, "--device", "cpu"]
        r = subprocess.run([*cli, "--vendor", server.url, "--protocol", "tiny-embed", "--json", tmp_path / "v.json"],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr + r.stdout
        r = subprocess.run([*cli, "--model", f"local-dir:{tiny_model_dir}", "--json", tmp_path / "i.json"],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr + r.stdout
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    through_plugin, in_process = (json.loads((tmp_path / f).read_text()) for f in ("v.json", "i.json"))
    assert through_plugin["backend"]["name"] == "tiny-embed" and through_plugin["protocol"] == "tiny-embed"
    assert through_plugin["confusion_matrix"] == in_process["confusion_matrix"]
    assert through_plugin["adapted_accuracy"] == in_process["adapted_accuracy"]
