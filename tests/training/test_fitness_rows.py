"""Issue 17, time per generation: a soft generation scores at most ``fitness_rows`` training images, a class-balanced
sample drawn from the seed and the queries used, so a capped fit is deterministic and resumes to the same bytes, and
a fit with fewer images than the cap is the fit it was before the cap existed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_SOFT_FIT, few_shots, random_images

from craft_adapter import FitConfig, fit_adapter
from craft_adapter.blackbox.box import BlackBox
from craft_adapter.blackbox.query_cache import QueryCache
from craft_adapter.training.prompt_modules import SoftModule, balanced_rows
from craft_adapter.training.resume import FitRun, manifest_path
from craft_adapter.vendors.open_clip_backend import OpenClipBackend

# 3 classes x 4 shots, 1 held out: 9 training images a generation when uncapped
SMALL = SMALL_SOFT_FIT


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> OpenClipBackend:
    return OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu")


def test_the_sample_is_class_balanced_sorted_and_drawn_from_its_generator_only() -> None:
    labels = np.repeat(np.arange(5), 7)
    by_class = [np.flatnonzero(labels == c) for c in range(5)]
    rows = balanced_rows(by_class, 12, np.random.default_rng([1, 40, 7]))
    counts = np.bincount(labels[rows], minlength=5)
    assert len(rows) == len(set(rows)) == 12 and rows == sorted(rows)
    assert set(counts) == {2, 3} and counts.sum() == 12  # floor or ceil of 12 / 5
    assert rows == balanced_rows(by_class, 12, np.random.default_rng([1, 40, 7]))
    assert rows != balanced_rows(by_class, 12, np.random.default_rng([1, 48, 7]))  # another generation
    few = balanced_rows(by_class, 3, np.random.default_rng(0))  # fewer rows than classes: 3 classes, one each
    assert len(few) == 3 and len(set(labels[few])) == 3
    short = [np.array([0]), np.arange(1, 9)]  # a class with fewer images than its share gives what it has
    assert balanced_rows(short, 6, np.random.default_rng(0))[0] == 0 and len(balanced_rows(short, 6,
                                                                                        np.random.default_rng(0))) == 4


def test_the_module_caps_only_above_the_cap_and_draws_by_seed_and_queries(backend: OpenClipBackend) -> None:
    labels = np.repeat(np.arange(3), 3)
    box = BlackBox(backend, random_images(9, seed=1), ["a", "b", "c"])
    rows = lambda cap, used, seed=1: SoftModule(box, FitConfig(fitness_rows=cap, seed=seed), labels).rows(  # noqa: E731
        used, 80)
    assert rows(0, 0) is None and rows(9, 0) is None and rows(2048, 0) is None  # every image
    assert rows(4, 8) == rows(4, 8) and len(rows(4, 8)) == 4
    assert {tuple(rows(4, u)) for u in range(0, 400, 8)} != {tuple(rows(4, 8))}  # drawn afresh each generation
    assert rows(4, 8) != rows(4, 8, seed=2) or rows(4, 16) != rows(4, 16, seed=2)


def test_below_the_cap_a_fit_is_the_uncapped_fit_byte_for_byte(backend: OpenClipBackend, tmp_path: Path) -> None:
    data = few_shots(3, 5)
    outs, runs = {}, {}
    # 12: exactly every shot (the refit's epoch); 9: exactly the training images (a generation); None: the default
    for cap in (0, 9, 12, 2048, None):
        outs[cap] = tmp_path / f"{cap}.safetensors"
        more = {} if cap is None else {"fitness_rows": cap}
        runs[cap] = fit_adapter(data, backend, FitConfig(**SMALL, **more), output=outs[cap])
    assert outs[2048].read_bytes() == outs[None].read_bytes()
    # the others record their setting (it is not the default): everything else is the same
    for cap in (0, 9, 12):
        a, b = runs[cap].adapter, runs[None].adapter
        assert runs[cap].record.history == runs[None].record.history and a.ctx.tobytes() == b.ctx.tobytes()
        same_refiner = all(np.array_equal(v, b.refiner[k]) for k, v in a.refiner.items())
        # at 9 the loop is uncapped but the refit's epochs (12 shots, the held-out ones too) are: 9 rows each
        assert same_refiner == (cap != 9) and ("rows_an_epoch" in a.fit["refit"]) == (cap == 9)
        assert {**a.fit["config"], "fitness_rows": None} == {**b.fit["config"], "fitness_rows": None}


def test_a_capped_generation_scores_and_trains_on_the_sample_only(backend: OpenClipBackend,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[int, ...]] = []
    real = BlackBox.cosine_logits

    def spy(self, text_emb, rows=None):  # noqa: ANN001, ANN202 (records what the real product makes)
        out = real(self, text_emb, rows)
        made.append(out.shape)
        return out

    monkeypatch.setattr(BlackBox, "cosine_logits", spy)
    data = few_shots(3, 5)
    capped = fit_adapter(data, backend, FitConfig(**SMALL, fitness_rows=4))
    train = [s for s in made if s[0] == 8]  # whole generations (the population in one chunk)
    assert train and all(s == (8, 4, 3) for s in train), made  # [p, m, c] with m the cap, never [p, 9, 3]
    # the hold-out checks: every held-out image; the refit (training/refit.py): every image of both sets, once
    assert {s for s in made if s[0] == 1} == {(1, 3, 3), (1, 9, 3)} and made.count((1, 9, 3)) == 1
    made.clear()
    whole = fit_adapter(data, backend, FitConfig(**SMALL, fitness_rows=0))
    assert {s for s in made if s[0] == 8} == {(8, 9, 3)}
    meter, whole_meter = capped.record.meter, whole.record.meter  # a candidate is one query whatever its rows
    assert (meter["queries"], meter["vendor_calls"]) == (whole_meter["queries"], whole_meter["vendor_calls"])
    assert capped.record.history != whole.record.history  # the cap bites: other rows, another search


@pytest.mark.parametrize("every", [3, 0], ids=["from the checkpoint", "by replay"])
@pytest.mark.parametrize("cap", [4, 2], ids=["cap 4 > classes", "cap 2 < classes"])
def test_a_stopped_capped_fit_resumes_to_the_same_bytes(backend: OpenClipBackend, tmp_path: Path, every: int,
                                                         cap: int) -> None:
    class Stop(Exception):
        pass

    def stop_at_8(state) -> None:  # noqa: ANN001
        if state.generation == 8:
            raise Stop

    data = few_shots(3, 5)
    cfg = FitConfig(**SMALL, checkpoint_every=every, fitness_rows=cap)
    ref = tmp_path / "ref" / "a.safetensors"
    ref.parent.mkdir()
    fit_adapter(data, backend, cfg, output=ref)
    out = tmp_path / "cut" / "a.safetensors"
    out.parent.mkdir()
    with QueryCache(out.parent / "cache.sqlite") as cache, pytest.raises(Stop):
        fit_adapter(data, backend, cfg, output=out, cache=cache, on_progress=stop_at_8)
    with QueryCache(out.parent / "cache.sqlite") as cache:
        fit_adapter(data, backend, cfg, output=out, cache=cache, resume=FitRun.load(manifest_path(out)))
    assert out.read_bytes() == ref.read_bytes()


def test_the_cap_is_decisive_and_recorded_only_off_its_default() -> None:
    assert "fitness_rows" not in FitConfig().to_dict()  # adapters of fewer images than the cap keep their bytes
    assert FitConfig(fitness_rows=0).to_dict()["fitness_rows"] == 0
    started = FitRun(FitConfig(fitness_rows=40).to_dict(), {"name": "b"}, "digest", {})
    assert started.conflicts(FitConfig().to_dict(), {"name": "b"}, "digest")  # a resume cannot change the cap
    with pytest.raises(ValueError, match="fitness_rows"):
        FitConfig(fitness_rows=-1)
