"""export --onnx of a soft-prompt adapter says that its context vectors do not travel; a text adapter's says nothing."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from craft_adapter.artifact.adapter_file import Adapter
from craft_adapter.cli import app
from craft_adapter.serve import AdapterError, load_runtime


def adapter(mode: str) -> Adapter:
    rng = np.random.default_rng(0)
    c, h = 3, 8
    refiner = {"refiner.fc1.weight": rng.normal(size=(h, c)), "refiner.fc1.bias": np.zeros(h),
               "refiner.fc2.weight": rng.normal(size=(c, h)), "refiner.fc2.bias": np.zeros(c)}
    return Adapter(class_names=["a", "b", "c"], template="a photo of a {}.", mode=mode, logit_kind="logits",
                   logit_scale=10.0, refiner={k: v.astype(np.float32) for k, v in refiner.items()},
                   ctx=rng.normal(size=(4, 16)).astype(np.float32) if mode == "soft" else None)


def test_soft_export_warns_that_the_context_vectors_stay_behind(tmp_path):
    for mode in ("soft", "text"):
        path = adapter(mode).save(tmp_path / f"{mode}.safetensors")
        r = CliRunner().invoke(app, ["export", str(path), "--onnx"])
        assert r.exit_code == 0, r.output
        assert ("context vectors" in r.output and "do not travel" in r.output) == (mode == "soft")
    # and the warning is true: the runtime cannot send a soft prompt from the .onnx
    with pytest.raises(AdapterError, match="soft prompts"):
        load_runtime(tmp_path / "soft.onnx", lambda images, prompts: np.zeros((len(images), 3)))
