"""The collaborative fit on the tiny model: budget, determinism, improvement, ablations (through ``fit_adapter``;
the meter checks build the box by hand)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_images

from craft_adapter.artifact.adapter_file import Adapter
from craft_adapter.blackbox.box import BlackBox
from craft_adapter.blackbox.meter import QueryMeter
from craft_adapter.training.api import SettingsError, fit_adapter
from craft_adapter.training.config import FitConfig, default_budget
from craft_adapter.training.loop import fit
from craft_adapter.vendors.open_clip_backend import OpenClipBackend

CLASSES = ["coat", "bag", "sandal"]


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu")


def run(backend, budget=130, seed=0, n_holdout=1, **kw):
    """A fit through the public API on 4 random images per class; the outcome and the meter's summary."""
    cfg = FitConfig(shots=4, seed=seed, budget=budget, popsize=8, intrinsic_dim=16, eval_every=3,
                    holdout_shots=n_holdout, **kw)
    outcome = fit_adapter(random_images(12, seed=1), backend, cfg, labels=np.repeat(np.arange(3), 4),
                          class_names=CLASSES)
    return outcome, outcome.record.meter


def expected_queries(budget: int, popsize: int, every: int, refit: int = 1) -> tuple[int, int]:
    """The accounting rule: a generation starts only if it, a due check, the final check and the refit still fit."""
    used = gens = 0
    due = False
    while True:
        due = (gens + 1) % every == 0
        if popsize + (1 + due) + refit > budget - used:
            break
        used, gens = used + popsize + due, gens + 1
    last_checked = gens % every == 0
    return used + (0 if last_checked else 1) + refit, gens


def test_budget_is_never_exceeded_and_count_is_exact(backend):
    res, meter = run(backend, budget=130)
    queries, gens = expected_queries(130, 8, 3)
    assert meter["queries"] == queries <= 130
    assert res.adapter.fit["queries"] == meter["queries"]
    assert len(res.record.history) == gens
    checks = -(-gens // 3)
    # one text call per generation, check and the refit; images once per set
    assert meter["vendor_calls"] == gens + checks + 1 + 2


def test_budget_too_small_is_a_clear_error(backend):
    with pytest.raises(SettingsError, match="too small for one generation"):
        run(backend, budget=7)


def test_fit_is_deterministic_byte_for_byte(backend):
    a = run(backend, seed=3)[0].adapter.to_bytes()
    b = run(backend, seed=3)[0].adapter.to_bytes()
    c = run(backend, seed=4)[0].adapter.to_bytes()
    assert a == b
    assert a != c


def test_adapter_round_trips(backend, tmp_path):
    a = run(backend)[0].adapter
    b = Adapter.load(a.save(tmp_path / "a.safetensors"))
    assert b.to_bytes() == a.to_bytes()
    assert b.class_names == CLASSES and b.mode == "soft" and b.ctx.shape == (4, 32)
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_array_equal(a.refine(x), b.refine(x))


def test_prompt_only_leaves_the_refiner_as_identity(backend):
    a = run(backend, train_refiner=False)[0].adapter
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    np.testing.assert_allclose(a.refine(x), x, atol=0)


def test_refiner_only_pays_for_the_fixed_prompt_once(backend):
    res, meter = run(backend, train_prompt=False, budget=80)
    assert meter["queries"] == 3  # train set once, hold-out once, the refit once (both sets, one call)
    assert len(res.record.history) == 80 // 8
    np.testing.assert_allclose(res.adapter.ctx, backend.soft_prompt_init("a photo of a"))


def test_meter_budget_must_match_the_config(backend):
    cfg = FitConfig(shots=4, budget=100, popsize=8, intrinsic_dim=16)
    box = BlackBox(backend, random_images(3), CLASSES, QueryMeter(budget=50))
    with pytest.raises(ValueError, match="budget"):
        fit(box, None, np.arange(3), None, cfg)


def test_a_generation_that_would_overspend_is_never_started(backend):
    cfg = FitConfig(shots=4, budget=100, popsize=8, intrinsic_dim=16, holdout_shots=0)
    meter = QueryMeter(budget=100)
    meter.queries = 95  # someone else already spent most of it
    box = BlackBox(backend, random_images(3), CLASSES, meter)
    with pytest.raises(ValueError, match="too small for one generation"):
        fit(box, None, np.arange(3), None, cfg)
    assert meter.queries == 95 and meter.vendor_calls == 0


def test_default_budgets_follow_the_paper():
    assert [default_budget(s) for s in (1, 2, 4, 8, 16)] == [2000, 4000, 4000, 8000, 8000]


def test_config_validation_and_file(tmp_path):
    with pytest.raises(ValueError, match="popsize"):
        FitConfig(popsize=1)
    with pytest.raises(ValueError, match="holdout_shots"):
        FitConfig(shots=2, holdout_shots=2)
    p = tmp_path / "c.toml"
    p.write_text("popsize = 20\nsigma = 0.5\n")
    cfg = FitConfig.from_file(p, sigma=0.7)
    assert (cfg.popsize, cfg.sigma) == (20, 0.7)
    j = tmp_path / "c.json"
    j.write_text('{"popsiz": 3}')
    with pytest.raises(ValueError, match="unknown fit settings"):
        FitConfig.from_file(j)


def test_separable_search_is_the_default_and_recorded_while_full_keeps_old_records() -> None:
    from craft_adapter.training.soft_prompt import SoftPromptSearch

    p0 = np.zeros((2, 8), np.float32) + np.arange(8, dtype=np.float32)
    assert SoftPromptSearch(p0, FitConfig(intrinsic_dim=16, cma_engine="cma")).es.opts["CMA_diagonal"] is True
    assert not SoftPromptSearch(p0, FitConfig(intrinsic_dim=16, cma_diagonal=False, cma_engine="cma")
                                ).es.opts["CMA_diagonal"]  # the numpy engine (the default) is separable only
    assert FitConfig().to_dict()["cma_diagonal"] is True
    assert "cma_diagonal" not in FitConfig(cma_diagonal=False, cma_engine="cma").to_dict()  # as adapters fitted
    # before it record
    assert FitConfig().kl_decay_n == 1  # the refiner's KL term stays on to the end (issue 15: late drift)
    assert FitConfig().resolved_lr == 1e-4 and FitConfig(prompt="text").resolved_lr == 1e-3
    assert FitConfig(lr=5e-3).resolved_lr == 5e-3 and FitConfig().to_dict()["lr"] is None
    with pytest.raises(ValueError, match="lr"):
        FitConfig(lr=0.0)
