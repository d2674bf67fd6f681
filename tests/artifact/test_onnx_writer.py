"""The torch-free ONNX writer: byte-identical to ``onnx.helper`` for the refiner, accepted by the strict reader,
run by onnxruntime with the same numerics, and built without the ``onnx`` package in the process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from craft_adapter.artifact.adapter_file import REFINER_KEYS, Adapter, refiner_input
from craft_adapter.artifact.onnx_check import check_refiner_onnx
from craft_adapter.artifact.onnx_graph import (
    BATCH_DIM,
    INPUT_NAME,
    IR_VERSION,
    OPSET,
    OUTPUT_NAMES,
    build_refiner_onnx,
    metadata_props,
)
from craft_adapter.artifact.synthetic import synthetic_adapter
from craft_adapter.testing.import_guard import blocker_source


def helper_build(adapter: Adapter, metadata: dict[str, str] | None = None) -> bytes:
    """The refiner graph as ``onnx.helper`` writes it (the builder this writer replaced), checked by onnx."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.ascontiguousarray(adapter.refiner[k]), k) for k in REFINER_KEYS]
    nodes = [
        helper.make_node("Gemm", [INPUT_NAME, REFINER_KEYS[0], REFINER_KEYS[1]], ["hidden"], transB=1),
        helper.make_node("Relu", ["hidden"], ["hidden_relu"]),
        helper.make_node("Gemm", ["hidden_relu", REFINER_KEYS[2], REFINER_KEYS[3]], ["delta"], transB=1),
        helper.make_node("Add", [INPUT_NAME, "delta"], [OUTPUT_NAMES[0]]),
        helper.make_node("Softmax", [OUTPUT_NAMES[0]], [OUTPUT_NAMES[1]], axis=-1),
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [BATCH_DIM, adapter.n_classes])
          for n in (INPUT_NAME, *OUTPUT_NAMES)]
    model = helper.make_model(helper.make_graph(nodes, "craft_refiner", io[:1], io[1:], inits),
                              opset_imports=[helper.make_opsetid("", OPSET)], producer_name="craft-adapter",
                              ir_version=IR_VERSION)
    helper.set_model_props(model, metadata_props(adapter) if metadata is None else metadata)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def soft_adapter(n_classes: int, hidden: int) -> Adapter:
    """A soft-mode adapter with a context, logit-kind logits and non-ASCII class names."""
    base = synthetic_adapter(n_classes, hidden, logit_kind="logits", seed=3)
    ctx = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
    names = [f"clase {i} ñ 猫" for i in range(n_classes)]
    return Adapter(names, "X X X X {}.", "soft", "logits", 100.0, base.refiner, ctx=ctx)


CASES = [synthetic_adapter(2, 1), synthetic_adapter(10), synthetic_adapter(1000, 256, seed=5),
         synthetic_adapter(3, 300, logit_kind="logits"), soft_adapter(7, 64)]


def case_id(a: Adapter) -> str:
    """mode-classes x hidden."""
    return f"{a.mode}-{a.n_classes}x{a.refiner[REFINER_KEYS[0]].shape[0]}"


@pytest.mark.parametrize("adapter", CASES, ids=case_id)
def test_bytes_equal_onnx_helper(adapter: Adapter) -> None:
    assert build_refiner_onnx(adapter) == helper_build(adapter)


def test_custom_metadata_bytes_equal_onnx_helper() -> None:
    adapter = synthetic_adapter(5)
    meta = {**metadata_props(adapter), "extra": "é" * 200, "": ""}
    assert build_refiner_onnx(adapter, meta) == helper_build(adapter, meta)


def test_writer_can_fail() -> None:
    """The comparison sees a one-value change in the weights (so the tests above can fail)."""
    a = synthetic_adapter(4)
    b = synthetic_adapter(4)
    b.refiner[REFINER_KEYS[3]][0] += 1e-3
    assert build_refiner_onnx(a) != helper_build(b)


@pytest.mark.parametrize("adapter", CASES[:3] + CASES[4:], ids=case_id)
def test_strict_reader_accepts_and_onnxruntime_runs(adapter: Adapter) -> None:
    raw = build_refiner_onnx(adapter)
    assert check_refiner_onnx(raw, "built")["class_names"] == adapter.class_names
    session = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
    scores = np.random.default_rng(0).dirichlet(np.ones(adapter.n_classes), size=5).astype(np.float32)
    x = refiner_input(scores, adapter.logit_kind)
    refined, probs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
    r = adapter.refiner
    h = np.maximum(x @ r[REFINER_KEYS[0]].T + r[REFINER_KEYS[1]], 0)
    expected = x + h @ r[REFINER_KEYS[2]].T + r[REFINER_KEYS[3]]
    np.testing.assert_allclose(refined, expected, atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_builds_without_onnx_installed() -> None:
    """Loading a .safetensors adapter in the runtime must not need the onnx package (nor torch)."""
    code = blocker_source(["onnx", "torch", "google"]) + (
        "from craft_adapter.artifact.synthetic import synthetic_adapter\n"
        "from craft_adapter.serve.shipped import ShippedAdapter\n"
        "import tempfile, pathlib, numpy as np\n"
        "p = pathlib.Path(tempfile.mkdtemp()) / 'a.safetensors'\n"
        "p.write_bytes(synthetic_adapter(3).to_bytes())\n"
        "s = ShippedAdapter.load(p, device='cpu')\n"
        "print(s.refine(np.full((1, 3), 1 / 3, np.float32))[1].shape)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "(1, 3)"
