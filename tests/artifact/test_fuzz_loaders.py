"""The loader fuzz campaign (``benchmarks/fuzz_loaders.py``), CI-sized and derandomized: a few hundred mutated
files per loader, each ending in a clean AdapterError or a correct load (the full run has 11,000)."""

from __future__ import annotations

import importlib.util
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from craft_adapter.artifact.adapter_file import Adapter, AdapterError

# isort: split
from craft_adapter.export.onnx_export import trace_refiner

EXAMPLES = 500  # per loader
BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_loaders.py"


def _load_benchmark() -> ModuleType:
    """``benchmarks/fuzz_loaders.py`` as a module (benchmarks are scripts, not an installed package)."""
    folder = str(BENCHMARK.parent)
    spec = importlib.util.spec_from_file_location("fuzz_loaders", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, folder)  # its mutations import as sibling scripts, as when it runs as a script
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


fuzz = _load_benchmark()


@pytest.fixture(scope="module")
def seed_files() -> dict[str, list[bytes]]:
    """The campaign's seeds, the torch-exported .onnx traced in-process."""
    return fuzz.seeds(trace_refiner(fuzz.seed_adapters()[1]).SerializeToString())


@pytest.fixture
def tally(tmp_path: Path) -> Iterator[object]:
    """A strict tally (the first bad case fails the test) with the per-case timeout armed."""
    previous = signal.signal(signal.SIGALRM, fuzz._alarm)
    yield fuzz.Tally(tmp_path, strict=True)
    signal.signal(signal.SIGALRM, previous)


def test_seeds_load(seed_files: dict[str, list[bytes]], tally: object) -> None:
    for loader in fuzz.LOADERS:
        for raw in seed_files["onnx" if loader.endswith("(.onnx)") else "safetensors"]:
            tally.run(loader, raw, "seed")
    assert tally.outcomes["ShippedAdapter.load(.onnx)"]["loaded"] == 2


@pytest.mark.parametrize("loader", fuzz.LOADERS)
def test_mutated_files_are_refused_cleanly_or_load_correctly(loader: str, seed_files: dict[str, list[bytes]],
                                                              tally: object) -> None:
    files = seed_files["onnx" if loader.endswith("(.onnx)") else "safetensors"]
    start = time.perf_counter()
    fuzz.campaign(tally, loader, files, EXAMPLES, derandomize=True)
    outcomes = tally.outcomes[loader]
    assert outcomes["rejected"] + outcomes["loaded"] == tally.total >= EXAMPLES
    assert outcomes["rejected"] > EXAMPLES // 2 and outcomes["loaded"] > 0  # the mutations reach both ends
    assert tally.slowest["seconds"] < 2.0 and time.perf_counter() - start < 30


def test_the_harness_reports_foreign_exceptions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loader that leaks a KeyError, or takes too long, is a failure, not a rejection."""
    tally = fuzz.Tally(tmp_path)
    raw = fuzz.seed_adapters()[0].to_bytes()
    monkeypatch.setattr(Adapter, "from_bytes", classmethod(lambda cls, raw, source="": {}["x"]))
    tally.run("Adapter.from_bytes", raw, "leaky")
    monkeypatch.setattr(Adapter, "from_bytes", classmethod(lambda cls, raw, source="": (_ for _ in ()).throw(
        AdapterError(""))))
    tally.run("Adapter.from_bytes", raw, "silent")
    previous = signal.signal(signal.SIGALRM, fuzz._alarm)
    monkeypatch.setattr(fuzz, "CASE_TIMEOUT_S", 0.05)
    monkeypatch.setattr(Adapter, "from_bytes", classmethod(lambda cls, raw, source="": time.sleep(1)))
    try:
        tally.run("Adapter.from_bytes", raw, "slow")
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert [f["case"] for f in tally.failures] == ["leaky", "silent", "slow"]
    assert "KeyError" in tally.failures[0]["error"] and "ran over" in tally.failures[2]["error"]
