"""The kill test, CI-sized: a soft-mode fit SIGKILLed mid-run and resumed ends with the uninterrupted adapter's bytes.

Real processes: each fit runs the CLI through ``benchmarks/kill_child.py``, which counts every in-process vendor call
in a ledger file before the call starts, so what was paid is counted outside the fit's own accounting.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
CLASSES = ["ankle boot", "bag", "coat", "sandal"]


def load_kill_resume():  # noqa: ANN201 (a module)
    """``benchmarks/kill_resume.py`` as a module (benchmarks are scripts, not an installed package)."""
    spec = importlib.util.spec_from_file_location("kill_resume", BENCHMARKS / "kill_resume.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


kr = load_kill_resume()


@pytest.fixture
def shots_folder(tmp_path: Path) -> Path:
    """4 classes x 6 random 28x28 PNGs in ``root/<class>/``."""
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(
                tmp_path / "data" / name / f"{i}.png")
    return tmp_path / "data"


def test_ledger_counts_calls_started_and_kill_lands_mid_fit(tiny_model_dir: Path, shots_folder: Path,
                                                              tmp_path: Path) -> None:
    fit_args = ["--model", f"local-dir:{tiny_model_dir}", "--data", str(shots_folder), "--device", "cpu",
                "--shots", "4", "--budget", "400", "--popsize", "10", "--intrinsic-dim", "32", "--seed", "1"]
    base_dir = tmp_path / "uninterrupted"
    base_dir.mkdir()
    output = base_dir / "adapter.safetensors"
    counter = kr.LedgerCounter(base_dir / "ledger")
    base = kr.run_fit(counter, ["fit", "-o", str(output), *fit_args], base_dir / "fit.log", output)
    assert base.rc == 0, (base_dir / "fit.log").read_text()
    upper = base.calls
    assert upper == base.meter["paid_calls"] > 20  # the ledger agrees with the fit's own count of calls paid
    logical = base.meter["vendor_calls"]  # the budget's count: paid, or repeated within the fit and cached
    reference = kr.sha256(output)

    results = [kr.kill_and_resume(kr.LedgerCounter(tmp_path / f"kill{i}" / "ledger"), fit_args, tmp_path / f"kill{i}",
                                  point, reference, upper)
               for i, point in enumerate([upper // 5, upper // 2, 4 * upper // 5])]
    shown = "\n".join(kr._row(r, 1) for r in results)
    for r in results:
        assert r.note == "" and r.point <= r.calls_before_kill < upper, shown  # killed mid-fit, after the point
        assert r.resume_rc == 0 and r.identical, shown
        assert r.calls_before_kill + r.calls_in_resume <= upper + 1, shown  # at most the one call in flight again
        assert r.resume_meter["paid_calls"] == r.calls_in_resume, shown
        assert r.resume_meter["vendor_calls"] == logical, shown  # the budget's count is the same, replayed or paid


def test_kill_points_are_seeded_and_inside_the_run() -> None:
    points = kr.kill_points(20, 221, seed=0)
    assert points == kr.kill_points(20, 221, seed=0) and points != kr.kill_points(20, 221, seed=1)
    assert all(1 <= p <= 220 for p in points) and len(set(points)) > 10
