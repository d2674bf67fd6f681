"""Issue 17 on the tiny model: the fitness in chunks gives the same adapter as one pass, and a soft-mode fit stopped
mid-way continues from its checkpoint to the uninterrupted adapter's bytes, replaying only what came after it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SMALL_SOFT_FIT, few_shots
from safetensors import safe_open

from craft_adapter import FitConfig, fit_adapter
from craft_adapter.blackbox.query_cache import QueryCache
from craft_adapter.training.api import ResumeConflict, SettingsError
from craft_adapter.training.checkpoint import META_KEY, checkpoint_path
from craft_adapter.training.refiner import chunk_plan
from craft_adapter.training.resume import FitRun, manifest_path
from craft_adapter.vendors.open_clip_backend import OpenClipBackend

SMALL = SMALL_SOFT_FIT


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> OpenClipBackend:
    return OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu")


def test_chunk_plan_keeps_one_pass_when_it_fits_and_splits_rows_only_when_one_candidate_does_not() -> None:
    assert chunk_plan(40, 120, 10, 256, 512) == (40, 120)  # the reference task: today's single pass
    q, r = chunk_plan(40, 12_000, 1000, 256, 512)
    assert (q, r) == (1, 12_000)  # 1,000 classes: one candidate at a time, about 0.5 GB of temporaries
    assert chunk_plan(40, 12_000, 1000, 256, 64) == (1, 64 * 2**20 // (4 * (10 * 1000 + 512)))


def test_fitness_in_tiny_chunks_gives_the_one_pass_adapter_byte_for_byte(backend: OpenClipBackend,
                                                                           tmp_path: Path) -> None:
    # 50 classes x 6 train images: each candidate's logits are a 300 x 32 x 50 product, on BLAS's regular path
    data = few_shots(50, 8)
    cfg = FitConfig(shots=8, budget=40, popsize=8, intrinsic_dim=16, hidden=16, eval_every=2, holdout_shots=2)
    one = fit_adapter(data, backend, cfg, output=tmp_path / "one.safetensors")
    tiny = FitConfig(**{**cfg.__dict__, "memory_budget_mb": 0.01})  # 4 image rows of one candidate per chunk
    assert chunk_plan(8, 300, 50, 16, 0.01)[0] == 1 and chunk_plan(8, 300, 50, 16, 0.01)[1] < 10
    chunked = fit_adapter(data, backend, tiny, output=tmp_path / "chunked.safetensors")
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "chunked.safetensors").read_bytes()
    assert one.record.history == chunked.record.history


class Stop(Exception):
    """Raised from the progress callback to stop a fit mid-way, as Ctrl-C would."""


def _stop_at(gen: int):  # noqa: ANN202
    def hook(state) -> None:  # noqa: ANN001
        if state.generation == gen:
            raise Stop
    return hook


@pytest.mark.parametrize(("engine", "diagonal"), [("numpy", True), ("cma", True), ("cma", False)],
                         ids=["numpy separable CMA-ES", "cma separable CMA-ES", "cma full CMA-ES"])
def test_a_stopped_fit_resumes_from_its_checkpoint_to_the_same_bytes(backend: OpenClipBackend, tmp_path: Path,
                                                                    engine: str, diagonal: bool) -> None:
    data = few_shots(3, 5)
    cfg = FitConfig(**SMALL, checkpoint_every=3, cma_diagonal=diagonal, cma_engine=engine)
    ref = tmp_path / "ref" / "a.safetensors"
    ref.parent.mkdir()
    fit_adapter(data, backend, cfg, output=ref)
    assert not checkpoint_path(ref).exists()  # removed once the adapter is written

    out = tmp_path / "cut" / "a.safetensors"
    out.parent.mkdir()
    with QueryCache(out.parent / "cache.sqlite") as cache, pytest.raises(Stop):
        fit_adapter(data, backend, cfg, output=out, cache=cache, on_progress=_stop_at(8))
    assert checkpoint_path(out).exists()  # written at generation 6 (and again on the stop: nothing newer)
    with QueryCache(out.parent / "cache.sqlite") as cache:
        resumed = fit_adapter(data, backend, cfg, output=out, cache=cache, resume=FitRun.load(manifest_path(out)))
    assert out.read_bytes() == ref.read_bytes()
    meter = resumed.record.meter
    # replay would ask for all 15 calls again; from the checkpoint: the two image sets, generations 7-8, the rest
    # (9 generations, 3 hold-out checks, the refit, 2 image sets)
    assert meter["vendor_calls"] == 15 and meter["paid_calls"] + meter["cached_calls"] <= 7, meter
    assert len(resumed.record.history) == 9 and not checkpoint_path(out).exists()


@pytest.mark.parametrize("seconds", [0.0, 1e-6], ids=["by generations only", "by time too"])
def test_a_slow_generation_writes_a_checkpoint_without_waiting_for_the_generation_count(
        backend: OpenClipBackend, tmp_path: Path, seconds: float) -> None:
    out = tmp_path / "a.safetensors"
    on_disk: dict[int, int | None] = {}  # generation ending -> generation of the checkpoint on disk at that moment

    def look(state) -> None:  # noqa: ANN001
        path = checkpoint_path(out)
        if path.exists():
            with safe_open(str(path), "np") as f:
                on_disk[state.generation] = json.loads(f.metadata()[META_KEY])["generation"]
        else:
            on_disk[state.generation] = None

    cfg = FitConfig(**SMALL, checkpoint_every=1000, checkpoint_seconds=seconds)
    fit_adapter(few_shots(3, 5), backend, cfg, output=out, on_progress=look)
    if seconds:  # every generation took longer than 1 us: each one's state was written when it ended
        assert on_disk == {1: None, **{g: g - 1 for g in range(2, 10)}}
    else:
        assert set(on_disk.values()) == {None}


def test_a_damaged_checkpoint_is_refused_and_another_fits_is_ignored(backend: OpenClipBackend,
                                                                      tmp_path: Path) -> None:
    data = few_shots(3, 5)
    cfg = FitConfig(**SMALL, checkpoint_every=2)
    out = tmp_path / "a.safetensors"
    with QueryCache(tmp_path / "cache.sqlite") as cache, pytest.raises(Stop):
        fit_adapter(data, backend, cfg, output=out, cache=cache, on_progress=_stop_at(5))
    good = checkpoint_path(out).read_bytes()
    damaged = good.replace(b'"F32"', b'"F64"', 1)
    checkpoint_path(out).write_bytes(damaged)
    with QueryCache(tmp_path / "cache.sqlite") as cache, pytest.raises(SettingsError, match="delete it"):
        fit_adapter(data, backend, cfg, output=out, cache=cache, resume=FitRun.load(manifest_path(out)))
    checkpoint_path(out).write_bytes(good[:len(good) // 2])  # truncated
    with QueryCache(tmp_path / "cache.sqlite") as cache, pytest.raises(SettingsError, match="delete it"):
        fit_adapter(data, backend, cfg, output=out, cache=cache, resume=FitRun.load(manifest_path(out)))
    # the same fit with float16 answers is another fit (it finds another adapter): resuming into it is refused
    checkpoint_path(out).write_bytes(good)
    half = FitConfig(**{**cfg.__dict__, "cache_precision": "float16"})
    with QueryCache(tmp_path / "cache.sqlite") as cache, pytest.raises(ResumeConflict, match="cache_precision"):
        fit_adapter(data, backend, half, output=out, cache=cache, resume=FitRun.load(manifest_path(out)))


def test_float16_answers_are_a_decisive_setting_recorded_only_when_chosen() -> None:
    from craft_adapter.training.config import FitConfig
    from craft_adapter.training.resume import FitRun

    assert "cache_precision" not in FitConfig().to_dict()  # adapters fitted before the setting keep their bytes
    f16 = FitConfig(cache_precision="float16").to_dict()
    assert f16["cache_precision"] == "float16"
    started = FitRun(f16, {"name": "b"}, "digest", {})
    assert started.conflicts(FitConfig().to_dict(), {"name": "b"}, "digest")  # a resume cannot switch precision
    assert not started.conflicts(f16, {"name": "b"}, "digest")
