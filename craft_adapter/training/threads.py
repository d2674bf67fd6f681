"""The fit's own arithmetic on one thread.

Between vendor calls a fit does small sums: CMA-ES, the projection ``z @ A``, cosine logits, the refiner on a
few hundred rows. Spread over threads, those cost more in waking and spinning workers than they save, and on a
busy machine far more: measured on the 2-core reference machine under load, a reference soft fit spent 37 s
outside vendor calls with numpy's BLAS at its default threads and 21 s with one (benchmarks/results/
fit_threads.json). The vendor call itself (an in-process model's forward) keeps every thread it had.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from threadpoolctl import threadpool_limits


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with torch and every BLAS library limited to one thread, then restore them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(n)
