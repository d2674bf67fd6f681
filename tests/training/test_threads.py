"""The fit's own arithmetic runs on one thread, and the thread counts come back afterwards."""

from __future__ import annotations

import numpy as np
import torch
from threadpoolctl import threadpool_info

from craft_adapter.training.threads import one_thread


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
