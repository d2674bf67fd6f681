"""The fit's own arithmetic runs on one thread, and the thread counts come back afterwards."""

from __future__ import annotations

import numpy as np
import torch
from threadpoolctl import threadpool_info

from craft_adapter.training.threads import one_thread, torch_threads


def _blas_threads() -> list[int]:
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def test_one_thread_limits_torch_and_blas_and_restores_them() -> None:
    np.ones((4, 4)) @ np.ones((4, 4))  # numpy's BLAS loaded
    torch.set_num_threads(2)
    before = _blas_threads()
    assert before, "numpy's BLAS should be visible to threadpoolctl"
    with one_thread():
        assert torch.get_num_threads() == 1
        assert _blas_threads() == [1] * len(before)
    assert torch.get_num_threads() == 2
    assert _blas_threads() == before


def test_one_thread_restores_even_when_the_block_raises() -> None:
    torch.set_num_threads(2)
    try:
        with one_thread():
            raise KeyError("stop")
    except KeyError:
        pass
    assert torch.get_num_threads() == 2


def test_the_fitness_gets_torchs_threads_back_inside_one_thread_and_loses_them_after(
        tiny_model_dir, monkeypatch) -> None:  # noqa: ANN001
    from conftest import SMALL_SOFT_FIT, few_shots

    from craft_adapter import FitConfig, fit_adapter
    from craft_adapter.training import loop
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    seen: list[tuple[int, list[int]]] = []
    real = loop.population_fitness

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 (records the thread counts the fitness ran with)
        seen.append((torch.get_num_threads(), _blas_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "population_fitness", spy)
    torch.set_num_threads(2)
    fit_adapter(few_shots(3, 4), OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu"),
                FitConfig(**SMALL_SOFT_FIT))
    assert seen and all(t == 2 and set(blas) == {1} for t, blas in seen)  # torch's back; BLAS still limited
    assert torch.get_num_threads() == 2
    with torch_threads(3):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == 2
