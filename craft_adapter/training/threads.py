"""The fit's own arithmetic on one thread.

Between vendor calls a fit does small sums: CMA-ES, the projection ``z @ A``, cosine logits, the refiner on a
few hundred rows. Spread over threads, those cost more in waking and spinning workers than they save, and on a
busy machine far more: on the 2-core reference machine a reference soft fit spent 7.4 s outside vendor calls
with default threads against 5.5 s with one at load 3 to 4, and 32 s against 21 s at load 9
(benchmarks/fit_threads.py). The vendor call itself (an in-process model's forward) keeps every thread it had,
and so does one product that is not small: the refiner's pass over the whole population in the fitness
(``popsize x rows`` inputs through a hidden layer of 256). Given torch's threads back (:func:`torch_threads`), a
reference fit spent 3.09 s outside vendor calls against 3.44 s, median of 3 each, alternating, on 2 quiet cores
(a first run: 2.80 against 3.43), with the same adapter bytes (``benchmarks/fit_threads.py --fitness-threads``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from threadpoolctl import ThreadpoolController


@functools.cache
def _blas() -> ThreadpoolController:
    # found once: a fresh ``threadpool_limits`` walks every loaded library each time (0.9 ms, four times a generation)
    return ThreadpoolController()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with torch and every BLAS library limited to one thread, then restore them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _blas().limit(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(n)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with torch on ``n`` threads (the BLAS limits as they are), then restore torch's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
