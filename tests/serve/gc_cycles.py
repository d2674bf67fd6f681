"""Shared by the reference-cycle tests: collections off for the test, and what only a cycle still holds."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture(autouse=True)
def no_collections() -> Iterator[None]:
    """Collect once, then no collections during the test, so that whatever a cycle holds stays until checked."""
    gc.collect()
    gc.disable()
    yield
    gc.set_debug(0)
    gc.garbage.clear()
    gc.enable()


def held_only_by_cycles(wanted: Callable[[object], bool]) -> list[object]:
    """Objects ``wanted`` picks among those that only a reference cycle still holds (the next collection's)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    return [r for o in gc.garbage for r in gc.get_referents(o) if wanted(r)]
