"""Text-mode resume checkpoints against a real vendor over HTTP (the tiny open_clip model behind the local vendor
server): a stopped fit continues from its checkpoint to the uninterrupted adapter's bytes, paying or reading back
only the pairs after it; a damaged or hostile checkpoint is refused, another fit's is ignored, and one whose answers
left the query cache falls back to replay."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import local_vendor, random_images
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from test_scale import Stop, _stop_at  # a fit stopped from its progress callback, as Ctrl-C would

from craft_adapter import FitConfig, fit_adapter
from craft_adapter.blackbox.query_cache import QueryCache
from craft_adapter.training.api import SettingsError
from craft_adapter.training.checkpoint import META_KEY, checkpoint_path
from craft_adapter.training.image_sets import LabeledImages
from craft_adapter.training.resume import FitRun, manifest_path

TEXT = {"prompt": "text", "shots": 4, "budget": 240, "holdout_shots": 1, "eval_every": 2, "text_children": 4,
        "text_elites": 2, "vocab_size": 200, "minibatch_start": 1, "minibatch_end": 2, "checkpoint_every": 3}


@pytest.fixture(scope="module")
def vendor(tiny_model_dir: Path) -> Iterator[str]:
    with local_vendor(tiny_model_dir) as url:
        yield url


DATA = LabeledImages(random_images(15, seed=5), np.repeat(np.arange(3), 5), ["coat", "bag", "sandal"])


def _resume(vendor: str, cfg: FitConfig, out: Path):  # noqa: ANN202
    with QueryCache(out.parent / "cache.sqlite") as cache:
        return fit_adapter(DATA, vendor, cfg, output=out, cache=cache, resume=FitRun.load(manifest_path(out)))


def _stopped(vendor: str, cfg: FitConfig, out: Path, at: int) -> int:
    """Run the fit to ``out`` until generation ``at`` ends; the generation its checkpoint holds."""
    out.parent.mkdir(exist_ok=True)
    with QueryCache(out.parent / "cache.sqlite") as cache, pytest.raises(Stop):
        fit_adapter(DATA, vendor, cfg, output=out, cache=cache, on_progress=_stop_at(at))
    return _meta(checkpoint_path(out))["generation"]


def _meta(path: Path) -> dict:
    n = int.from_bytes(path.read_bytes()[:8], "little")
    return json.loads(json.loads(path.read_bytes()[8:8 + n])["__metadata__"][META_KEY])


@pytest.fixture(scope="module")
def reference(vendor: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[dict], dict]:
    """The uninterrupted fit (no query cache, so no checkpoint): its bytes, history and meter."""
    out = tmp_path_factory.mktemp("ref") / "a.safetensors"
    done = fit_adapter(DATA, vendor, FitConfig(**TEXT), output=out)
    assert not checkpoint_path(out).exists()
    return out.read_bytes(), done.record.history, done.record.meter


def test_a_stopped_text_fit_resumes_from_its_checkpoint_to_the_same_bytes(vendor: str, reference, tmp_path: Path
                                                                          ) -> None:
    ref, history, meter = reference
    assert len(history) >= 8 and meter["vendor_calls"] <= TEXT["budget"]
    cfg, out = FitConfig(**TEXT), tmp_path / "cut" / "a.safetensors"
    held = _stopped(vendor, cfg, out, 10)
    assert held == 9  # generation 10 was stopped in its callback: the snapshot of 9 (written at 9) is the last
    meta = _meta(checkpoint_path(out))
    assert meta["text"]["cur"] and len(meta["text"]["elites"]) == 2 and meta["meter"]["vendor_calls"] > 0
    resumed = _resume(vendor, cfg, out)
    assert out.read_bytes() == ref
    after = meter["vendor_calls"] - history[held - 1]["vendor_calls"]  # pairs charged after the checkpoint
    m = resumed.record.meter
    assert m["vendor_calls"] == meter["vendor_calls"] and m["paid_calls"] + m["cached_calls"] == after, (m, after)
    assert 0 < after < meter["vendor_calls"] // 3 and resumed.record.history == history, (len(history), after)
    assert not checkpoint_path(out).exists()

    # without the checkpoint, the same resume replays every pair from the cache: what the checkpoint saved
    _stopped(vendor, cfg, out, 10)
    checkpoint_path(out).unlink()
    replayed = _resume(vendor, cfg, out).record.meter
    assert out.read_bytes() == ref and replayed["paid_calls"] + replayed["cached_calls"] == meter["vendor_calls"]


def test_a_damaged_or_hostile_text_checkpoint_is_refused(vendor: str, tmp_path: Path) -> None:
    cfg, out = FitConfig(**TEXT), tmp_path / "a.safetensors"
    _stopped(vendor, cfg, out, 5)
    good = checkpoint_path(out).read_bytes()
    checkpoint_path(out).write_bytes(good.replace(b'"U32"', b'"F64"', 1))
    with pytest.raises(SettingsError, match="delete it"):
        _resume(vendor, cfg, out)
    checkpoint_path(out).write_bytes(good[:len(good) // 2])  # truncated
    with pytest.raises(SettingsError, match="delete it"):
        _resume(vendor, cfg, out)
    arrays = st_load(good)
    n = int.from_bytes(good[:8], "little")
    header_meta = json.loads(good[8:8 + n])["__metadata__"]
    hostile = {**arrays, "pairs.train": arrays["pairs.train"].copy()}
    hostile["pairs.train"][0, 0] = 10**6  # an image row the fit does not have
    checkpoint_path(out).write_bytes(st_save(hostile, metadata=header_meta))
    with pytest.raises(SettingsError, match="image row or template"):
        _resume(vendor, cfg, out)
    text = json.loads(header_meta[META_KEY])
    text["text"]["search_rng"]["state"]["state"] = 2**200  # no PCG64 state
    checkpoint_path(out).write_bytes(st_save(arrays, metadata={META_KEY: json.dumps(text)}))
    with pytest.raises(SettingsError, match="malformed metadata"):
        _resume(vendor, cfg, out)


def test_another_fits_checkpoint_is_ignored_and_lost_answers_mean_replay(vendor: str, reference, tmp_path: Path
                                                                         ) -> None:
    ref, _, meter = reference
    cfg, out = FitConfig(**TEXT), tmp_path / "a.safetensors"
    other = FitConfig(**{**TEXT, "text_children": 3})
    _stopped(vendor, other, tmp_path / "other" / "a.safetensors", 5)
    _stopped(vendor, cfg, out, 5)
    checkpoint_path(out).write_bytes(checkpoint_path(tmp_path / "other" / "a.safetensors").read_bytes())
    m = _resume(vendor, cfg, out).record.meter
    assert out.read_bytes() == ref and m["paid_calls"] + m["cached_calls"] == meter["vendor_calls"]  # replayed

    _stopped(vendor, cfg, out, 5)
    with sqlite3.connect(tmp_path / "cache.sqlite") as db:  # the cache lost one answer paid before the checkpoint
        db.execute("DELETE FROM answers WHERE id = (SELECT MIN(id) FROM answers WHERE kind = 'score')")
    m = _resume(vendor, cfg, out).record.meter
    assert out.read_bytes() == ref and m["paid_calls"] == 1 and m["paid_calls"] + m["cached_calls"] == \
        meter["vendor_calls"]


def test_a_text_fit_without_a_query_cache_writes_no_checkpoint(vendor: str, tmp_path: Path) -> None:
    out = tmp_path / "a.safetensors"
    with pytest.raises(Stop):
        fit_adapter(DATA, vendor, FitConfig(**TEXT), output=out, on_progress=_stop_at(4))
    assert not checkpoint_path(out).exists()  # nothing could restore it: the paid answers were kept nowhere
