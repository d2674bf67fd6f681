"""Issue 15, the refit: after the loop, the chosen refiner trains on every shot, the held-out ones too, for one query.

The refit must cost exactly the one query the loop reserved for it, see the held-out images (not only the training
ones), leave the prompt as chosen, be recorded in the adapter, be off in text mode and with ``--refit-epochs 0``
(which gives the fit as it was before the refit existed), and keep a fit deterministic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_SOFT_FIT, few_shots

from craft_adapter import FitConfig, fit_adapter
from craft_adapter.blackbox.box import BlackBox
from craft_adapter.blackbox.meter import QueryMeter
from craft_adapter.training.image_sets import split_holdout
from craft_adapter.training.refiner import Refiner
from craft_adapter.training.refit import refit_on_every_shot
from craft_adapter.vendors.open_clip_backend import OpenClipBackend


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> OpenClipBackend:
    return OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu")


def _fit(backend: OpenClipBackend, **over):
    return fit_adapter(few_shots(3, 4), backend, FitConfig(**{**SMALL_SOFT_FIT, **over}))


def test_the_refit_costs_the_one_reserved_query_and_is_recorded(backend: OpenClipBackend) -> None:
    on, off = _fit(backend, refit_epochs=5), _fit(backend, refit_epochs=0)
    assert on.adapter.fit["refit"] == {"epochs": 5, "lr": 1e-4, "images": 12}  # the loop's learning rate
    assert "refit" not in off.adapter.fit
    assert on.adapter.fit["queries"] <= on.adapter.fit["budget"] == 80
    # the same loop: same prompt; the refit's query is the only difference in what was spent
    np.testing.assert_array_equal(on.adapter.ctx, off.adapter.ctx)
    assert on.adapter.fit["queries"] == off.adapter.fit["queries"] + 1
    assert any(not np.array_equal(on.adapter.refiner[k], off.adapter.refiner[k]) for k in on.adapter.refiner)
    assert on.adapter.fit["config"]["refit_epochs"] == 5 and "refit_epochs" not in off.adapter.fit["config"]


def test_a_refit_fit_is_deterministic(backend: OpenClipBackend) -> None:
    a, b = _fit(backend), _fit(backend)  # the default epochs
    assert a.adapter.to_bytes() == b.adapter.to_bytes()


def test_the_budget_always_leaves_the_refit_its_query(backend: OpenClipBackend) -> None:
    for budget in range(12, 40):  # every budget from one generation and two checks up
        try:
            out = _fit(backend, budget=budget, refit_epochs=2)
        except Exception as e:  # too small for a generation: the fit says so before spending
            assert "too small" in str(e)
            continue
        assert out.adapter.fit["queries"] <= budget and out.adapter.fit["refit"]["epochs"] == 2


def test_the_refit_learns_from_the_held_out_images(backend: OpenClipBackend) -> None:
    data = few_shots(3, 4)
    tr, ho = split_holdout(data.labels, 1, 1)
    boxes = [BlackBox(backend, [data.images[i] for i in idx], data.class_names, QueryMeter()) for idx in (tr, ho)]
    ctx = boxes[0].soft_prompt_init("a photo of a")
    cfg = FitConfig(**{**SMALL_SOFT_FIT, "refit_epochs": 30})
    x_ho = torch.from_numpy(boxes[1].logits_soft(ctx[None])[0])

    def held_out_loss(net: Refiner) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(net(x_ho), torch.from_numpy(data.labels[ho])))

    def refit(sets: list[int]) -> tuple[Refiner, dict]:
        torch.manual_seed(0)
        net = Refiner(3, 16)
        info = refit_on_every_shot(net, [boxes[i] for i in sets], [data.labels[(tr, ho)[i]] for i in sets], ctx,
                                   cfg, torch.Generator().manual_seed(0))
        return net, info

    used = boxes[1].meter.queries
    with_held, info = refit([0, 1])
    assert boxes[1].meter.queries == used + 1 and boxes[0].meter.queries == 0 and info["images"] == 12
    without, _ = refit([0])
    torch.manual_seed(0)
    assert held_out_loss(with_held) < min(held_out_loss(without), held_out_loss(Refiner(3, 16)))


def test_refit_epochs_is_soft_mode_only() -> None:
    with pytest.raises(ValueError, match="soft-mode"):
        FitConfig(prompt="text", refit_epochs=3)
    assert FitConfig(prompt="text").resolved_refit_epochs == 0 and "refit_epochs" not in FitConfig(
        prompt="text").to_dict()
    with pytest.raises(ValueError, match="non-negative"):
        FitConfig(refit_epochs=-1)


def test_no_refit_under_an_embedding_head_which_replaces_the_refiner(backend: OpenClipBackend) -> None:
    headed = _fit(backend, embedding_head=True, refit_epochs=5)
    assert "refit" not in headed.adapter.fit and headed.adapter.head is not None
    assert headed.adapter.fit["queries"] == _fit(backend, refit_epochs=0).adapter.fit["queries"]


def test_above_the_row_cap_a_refit_epoch_trains_on_a_balanced_sample(backend: OpenClipBackend,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from craft_adapter.training import refit as refit_mod

    seen: list[np.ndarray] = []
    real = refit_mod.train_epoch

    def spy(refiner, opt, x, y, *rest):  # noqa: ANN001, ANN202 (records each epoch's labels)
        seen.append(y.numpy().copy())
        return real(refiner, opt, x, y, *rest)

    monkeypatch.setattr(refit_mod, "train_epoch", spy)
    out = _fit(backend, fitness_rows=6, refit_epochs=4)  # 12 shots in all, 6 rows an epoch
    refit_epochs = seen[-4:]
    assert all(len(y) == 6 and sorted(np.bincount(y, minlength=3)) == [2, 2, 2] for y in refit_epochs)
    assert out.adapter.fit["refit"] == {"epochs": 4, "lr": 1e-4, "images": 12, "rows_an_epoch": 6}
    seen.clear()
    _fit(backend, fitness_rows=0, refit_epochs=4)
    assert all(len(y) == 12 for y in seen[-4:])  # no cap: every shot, every epoch
