"""The public fit API: ``fit_adapter`` on the tiny model and on a real HTTP stub vendor, its typed errors, the
files it writes, and what ``import craft_adapter`` does (and does not) do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import random_images

import craft_adapter
from craft_adapter import FitConfig, fit_adapter
from craft_adapter.artifact.adapter_file import Adapter
from craft_adapter.blackbox.query_cache import QueryCache
from craft_adapter.testing.stub_vendor import StubVendor, serve_stub_in_thread
from craft_adapter.training.api import (
    CacheFailed,
    FitError,
    FitOutcome,
    OutputFailed,
    ResumeConflict,
    SettingsError,
    VendorStopped,
)
from craft_adapter.training.image_sets import LabeledImages
from craft_adapter.training.resume import FitRun, manifest_path
from craft_adapter.vendors.open_clip_backend import OpenClipBackend

CLASSES = ["bag", "coat", "sandal"]
SMALL = {"shots": 4, "budget": 60, "popsize": 8, "intrinsic_dim": 16, "eval_every": 3, "holdout_shots": 1}
TEXT = {"shots": 4, "prompt": "text", "budget": 120, "text_children": 4, "text_elites": 2, "vocab_size": 100,
        "minibatch_start": 1, "minibatch_end": 2, "eval_every": 2, "concurrency": 4, "retries": 2,
        "retry_backoff": 0.01, "timeout": 5.0}


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> OpenClipBackend:
    return OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu")


@pytest.fixture(scope="module")
def shots() -> LabeledImages:
    """5 random images per class, listed class by class in reverse (the API orders and samples them)."""
    images, labels = random_images(15, seed=2), np.repeat(np.arange(3), 5)
    return LabeledImages(images[::-1], labels[::-1].copy(), list(CLASSES))


def write_folder(root: Path, data: LabeledImages) -> Path:
    for i, (im, y) in enumerate(zip(data.images, data.labels, strict=True)):
        (root / data.class_names[y]).mkdir(parents=True, exist_ok=True)
        im.save(root / data.class_names[y] / f"{i:02d}.png")
    return root


def test_images_labels_and_labeled_images_give_the_same_adapter(backend, shots) -> None:
    cfg = FitConfig(**SMALL)
    seen = []
    a = fit_adapter(shots, backend, cfg, on_progress=seen.append)
    b = fit_adapter(list(shots.images), backend, cfg, labels=list(shots.labels), class_names=CLASSES)
    assert isinstance(a, FitOutcome) and a.config is cfg
    assert a.adapter.to_bytes() == b.adapter.to_bytes()
    assert a.adapter.class_names == CLASSES and a.adapter.fit["queries"] <= 60
    assert [s.generation for s in seen] == list(range(1, len(a.record.history) + 1))
    assert seen[-1].meter["queries"] == seen[-1].queries and seen[-1].meter["unit"] == "queries"
    assert a.record.meter["budget"] == 60 and a.record.wall_time_s > 0 and not a.record.resumed
    c = fit_adapter(shots, backend, FitConfig(**{**SMALL, "seed": 2}))
    assert c.adapter.to_bytes() != a.adapter.to_bytes()


def test_a_folder_with_output_writes_adapter_fitlog_and_a_done_manifest(backend, shots, tmp_path) -> None:
    folder = write_folder(tmp_path / "shots", shots)
    out = tmp_path / "a.safetensors"
    cfg = FitConfig(**SMALL)
    outcome = fit_adapter(folder, backend, cfg, output=out, invocation={"data": str(folder)}, price_per_1k=2.0)
    assert Adapter.load(out).to_bytes() == outcome.adapter.to_bytes()
    log = json.loads(out.with_name(out.name + ".fitlog.json").read_text())
    assert log == json.loads(json.dumps(outcome.record.as_fitlog()))
    run = FitRun.load(manifest_path(out))
    assert run.status == "done" and run.invocation == {"data": str(folder)} and run.config == cfg.to_dict()
    assert outcome.adapter.fit["price_per_1k_calls"] == 2.0
    # Folder images are class-by-class sorted files; the same pixels in memory give the same few-shot set.
    same = fit_adapter(shots, backend, cfg, price_per_1k=2.0)
    assert same.adapter.to_bytes() == outcome.adapter.to_bytes()


def test_bad_settings_and_data_are_settings_errors(backend, shots) -> None:
    with pytest.raises(SettingsError, match="fewer than the 6 shots"):
        fit_adapter(shots, backend, FitConfig(**{**SMALL, "shots": 6}))
    with pytest.raises(SettingsError, match="too small for one generation"):
        fit_adapter(shots, backend, FitConfig(**{**SMALL, "budget": 5}))
    with pytest.raises(SettingsError, match="labels= and class_names="):
        fit_adapter(list(shots.images), backend, FitConfig(**SMALL))
    with pytest.raises(SettingsError, match="does not exist"):
        fit_adapter("/nonexistent/folder", backend, FitConfig(**SMALL))
    with pytest.raises(SettingsError, match="neither an embedding nor a scoring backend"):
        fit_adapter(shots, object(), FitConfig(**SMALL))  # type: ignore[arg-type]
    assert issubclass(SettingsError, FitError) and issubclass(SettingsError, ValueError)


def test_resume_conflicts_are_typed(backend, shots, tmp_path) -> None:
    out = tmp_path / "a.safetensors"
    fit_adapter(shots, backend, FitConfig(**SMALL), output=out)
    started = FitRun.load(manifest_path(out))
    with pytest.raises(ResumeConflict, match="seed is 3, the fit was started with 1") as e:
        fit_adapter(shots, backend, FitConfig(**{**SMALL, "seed": 3}), resume=started)
    assert e.value.problems and str(e.value).startswith("cannot resume: ")
    again = fit_adapter(shots, backend, FitConfig(**{**SMALL, "concurrency": 2}), resume=started)  # operational
    assert again.record.resumed and again.adapter.to_bytes() == Adapter.load(out).to_bytes()


@pytest.fixture()
def stub():
    vendor = StubVendor(retry_after="0.01")
    serve_stub_in_thread(vendor)
    yield vendor
    vendor.shutdown()
    vendor.server_close()


def test_a_vendor_url_fits_in_text_mode_and_a_dead_vendor_is_vendor_stopped(shots, stub, tmp_path) -> None:
    cfg = FitConfig(**TEXT)
    with QueryCache(tmp_path / "cache.sqlite") as cache:
        outcome = fit_adapter(shots, stub.url, cfg, cache=cache)
        assert outcome.adapter.mode == "text" and outcome.record.cache == str(cache.path)
        assert outcome.record.meter["paid_calls"] == sum(stub.calls.values()) > 0
        replay = fit_adapter(shots, stub.url, cfg, cache=cache)  # every answer comes from the cache
    assert replay.adapter.to_bytes() == outcome.adapter.to_bytes() and replay.record.meter["paid_calls"] == 0
    stub.script = ["500"] * 10_000
    with pytest.raises(VendorStopped):
        fit_adapter(shots, stub.url, cfg)


def test_a_cache_that_cannot_keep_an_answer_is_cache_failed(shots, stub, tmp_path) -> None:
    import sqlite3

    path = tmp_path / "cache.sqlite"
    QueryCache(path).close()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TRIGGER full BEFORE INSERT ON answers BEGIN SELECT RAISE(ABORT, 'disk is full'); END")
    with QueryCache(path) as cache, pytest.raises(CacheFailed, match="disk is full"):
        fit_adapter(shots, stub.url, FitConfig(**TEXT), cache=cache)


IMPORT_CHECK = """
import json, os, sys
before = dict(os.environ)
import craft_adapter, craft_adapter.serve
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "open_clip", "cma"}
                or m.startswith(("craft_adapter.training", "craft_adapter.blackbox")))
from craft_adapter import FitConfig, fit_adapter
print(json.dumps({"loaded": loaded, "env_changed": dict(os.environ) != before, "torch": "torch" in sys.modules}))
"""


def test_importing_the_package_loads_no_torch_and_sets_nothing() -> None:
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got == {"loaded": [], "env_changed": False, "torch": False}
    assert {"fit_adapter", "FitConfig", "FitError"} <= set(dir(craft_adapter))
    with pytest.raises(AttributeError):
        craft_adapter.no_such_name  # noqa: B018


class CountingBackend:
    """Wraps a backend and counts the calls that reach it (what a vendor would bill)."""

    def __init__(self, inner: OpenClipBackend) -> None:
        self.inner, self.calls = inner, 0
        self.capabilities, self.identity, self.logit_scale = inner.capabilities, inner.identity, inner.logit_scale

    def __getattr__(self, name: str):
        method = getattr(self.inner, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return method(*args, **kwargs)
        return counted


def test_one_class_and_an_unwritable_output_are_refused_before_anything_is_paid(backend, shots, tmp_path) -> None:
    counting = CountingBackend(backend)
    one = LabeledImages(shots.images[:4], np.zeros(4, np.int64), ["bag"])
    with pytest.raises(SettingsError, match="one class"):
        fit_adapter(one, counting, FitConfig(**SMALL))
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(OutputFailed, match="cannot write"):
        fit_adapter(shots, counting, FitConfig(**SMALL), output=tmp_path / "a-file" / "adapter.safetensors")
    assert counting.calls == 0


def test_an_adapter_that_cannot_be_written_at_the_end_is_rescued(backend, shots, tmp_path) -> None:
    out = tmp_path / "adapter.safetensors"

    def fill_the_disk(state) -> None:  # after the output was checked: the disk fills up during the fit
        tmp = out.with_name(out.name + ".tmp")
        if not tmp.exists():
            tmp.symlink_to("/dev/full")

    with pytest.raises(OutputFailed, match="written to .*rescued") as failed:
        fit_adapter(shots, backend, FitConfig(**SMALL), output=out, on_progress=fill_the_disk)
    rescued = failed.value.rescued
    assert rescued is not None and Adapter.load(rescued).class_names == CLASSES and not out.exists()
    rescued.unlink()
