"""The embedding head in both adapter files: ``head.delta`` in the .safetensors (round trip, hostile tensors and
metadata refused), the two-input ONNX graph (the torch-free builder byte-identical to ``onnx.helper``, accepted by the
strict reader, refused when the metadata and the graph disagree), and adapters without a head exactly as before."""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from craft_adapter.artifact.adapter_file import (
    HEAD_KEY,
    HEAD_META_KEY,
    METADATA_KEY,
    REFINER_KEYS,
    Adapter,
    AdapterError,
)
from craft_adapter.artifact.onnx_check import check_refiner_onnx
from craft_adapter.artifact.onnx_graph import (
    BATCH_DIM,
    EMBEDDING_NAME,
    HEAD_WEIGHT,
    INPUT_NAME,
    IR_VERSION,
    OPSET,
    OUTPUT_NAMES,
    build_refiner_onnx,
    metadata_props,
)
from craft_adapter.artifact.synthetic import synthetic_adapter

C, D = 5, 12


def with_head(c: int = C, d: int = D, seed: int = 0, mode: str = "text") -> Adapter:
    """A logits adapter with a random head ``[c, d]`` (soft mode with a context)."""
    rng = np.random.default_rng(seed)
    base = synthetic_adapter(c, 16, logit_kind="logits", seed=seed)
    ctx = rng.normal(size=(4, 8)).astype(np.float32) if mode == "soft" else None
    return dataclasses.replace(base, mode=mode, ctx=ctx, head=(0.01 * rng.normal(size=(c, d))).astype(np.float32))


def unit(n: int, d: int = D, seed: int = 1) -> np.ndarray:
    e = np.random.default_rng(seed).normal(size=(n, d))
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


def header_and_body(raw: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def repack(header: dict[str, Any], body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@pytest.mark.parametrize("mode", ["text", "soft"])
def test_a_head_round_trips_and_changes_the_refined_logits_by_its_own_term(mode: str) -> None:
    a = with_head(mode=mode)
    b = Adapter.from_bytes(a.to_bytes())
    np.testing.assert_array_equal(b.head, a.head)
    assert b.to_bytes() == a.to_bytes() and b.metadata()[HEAD_META_KEY]["dim"] == D
    scores, e = np.random.default_rng(2).normal(size=(6, C)).astype(np.float32), unit(6)
    no_head = dataclasses.replace(a, head=None).refine(scores)
    np.testing.assert_allclose(b.refine(scores, e) - no_head, a.logit_scale * e @ a.head.T, atol=1e-5)


def test_an_adapter_without_a_head_writes_what_it_wrote_before() -> None:
    a = synthetic_adapter(4, 8, logit_kind="logits")
    header, _ = header_and_body(a.to_bytes())
    assert sorted(k for k in header if k != "__metadata__") == sorted(REFINER_KEYS)
    assert HEAD_META_KEY not in json.loads(header["__metadata__"][METADATA_KEY])
    assert METADATA_KEY in metadata_props(a) and "embedding_input" not in metadata_props(a)["io"]


def test_refining_with_a_head_needs_embeddings_of_its_width() -> None:
    a, scores = with_head(), np.zeros((3, C), np.float32)
    with pytest.raises(AdapterError, match="needs the image embeddings"):
        a.refine(scores)
    with pytest.raises(AdapterError, match="reads 12-dimensional image embeddings, but the vendor returned 7"):
        a.refine(scores, unit(3, 7))
    with pytest.raises(AdapterError, match="expected \\(3, 12\\)"):
        a.refine(scores, unit(4))
    with pytest.raises(AdapterError, match="not all finite"):
        a.refine(scores, np.full((3, D), np.nan, np.float32))


def _head_file(edit_tensor=None, edit_meta=None, head: np.ndarray | None = None) -> bytes:
    """A head adapter's bytes, its head tensor replaced by ``head`` (float32, else its own dtype) or its header and
    metadata edited."""
    a = with_head()
    if head is not None:
        header, body = header_and_body(a.to_bytes())
        spec = header[HEAD_KEY]
        begin, end = spec["data_offsets"]
        data = np.ascontiguousarray(head).tobytes()
        spec.update(shape=list(head.shape), data_offsets=[begin, begin + len(data)],
                    dtype={np.float32: "F32", np.float64: "F64", np.float16: "F16"}[head.dtype.type])
        for other in header.values():  # tensors stored after the head move with it
            if isinstance(other, dict) and "data_offsets" in other and other is not spec and \
                    other["data_offsets"][0] >= end:
                other["data_offsets"] = [o + len(data) - (end - begin) for o in other["data_offsets"]]
        raw = repack(header, body[:begin] + data + body[end:])
    else:
        raw = a.to_bytes()
    header, body = header_and_body(raw)
    if edit_tensor:
        edit_tensor(header)
    if edit_meta:
        meta = json.loads(header["__metadata__"][METADATA_KEY])
        edit_meta(meta)
        header["__metadata__"][METADATA_KEY] = json.dumps(meta)
    return repack(header, body)


@pytest.mark.parametrize("head,message", [
    (np.zeros((C, D)), "has dtype F64"),
    (np.zeros((C, D), np.float16), "has dtype F16"),
    (np.zeros(C * D, np.float32), "expected \\(5, d\\)"),
    (np.zeros((C + 1, D), np.float32), "expected \\(5, d\\)"),
    (np.zeros((C, 0), np.float32), "expected \\(5, d\\)"),
    (np.full((C, D), np.inf, np.float32), "not finite"),
    (np.full((C, D), np.nan, np.float32), "not finite"),
    (np.full((C, D), 1e3, np.float32), "times the logit scale"),  # x 100 is past the value limit
])
def test_a_hostile_head_tensor_is_refused(head: np.ndarray, message: str) -> None:
    with pytest.raises(AdapterError, match=message):
        Adapter.from_bytes(_head_file(head=head))


def test_metadata_and_tensor_must_agree_on_the_head() -> None:
    with pytest.raises(AdapterError, match="disagrees with the head.delta tensor"):
        Adapter.from_bytes(_head_file(edit_meta=lambda m: m[HEAD_META_KEY].update(dim=D + 1)))
    with pytest.raises(AdapterError, match="disagrees"):
        Adapter.from_bytes(_head_file(edit_meta=lambda m: m.pop(HEAD_META_KEY)))
    with pytest.raises(AdapterError, match="integer dim"):
        Adapter.from_bytes(_head_file(edit_meta=lambda m: m.update({HEAD_META_KEY: {"dim": "12"}})))
    headless = synthetic_adapter(C, 16, logit_kind="logits")
    meta = headless.metadata() | {HEAD_META_KEY: {"dim": D}}
    header, body = header_and_body(headless.to_bytes())
    header["__metadata__"][METADATA_KEY] = json.dumps(meta)
    with pytest.raises(AdapterError, match="disagrees"):
        Adapter.from_bytes(repack(header, body))


def test_a_head_needs_a_logits_adapter() -> None:
    with pytest.raises(AdapterError, match="fitted on vendor logits"):
        dataclasses.replace(with_head(), logit_kind="probabilities")


def helper_build_with_head(adapter: Adapter) -> bytes:
    """The two-input graph as ``onnx.helper`` writes it, checked by onnx."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.ascontiguousarray(adapter.refiner[k]), k) for k in REFINER_KEYS]
    inits.append(numpy_helper.from_array(np.ascontiguousarray(adapter.head_weight().T), HEAD_WEIGHT))
    nodes = [
        helper.make_node("Gemm", [INPUT_NAME, REFINER_KEYS[0], REFINER_KEYS[1]], ["hidden"], transB=1),
        helper.make_node("Relu", ["hidden"], ["hidden_relu"]),
        helper.make_node("Gemm", ["hidden_relu", REFINER_KEYS[2], REFINER_KEYS[3]], ["delta"], transB=1),
        helper.make_node("Add", [INPUT_NAME, "delta"], ["refined_base"]),
        helper.make_node("MatMul", [EMBEDDING_NAME, HEAD_WEIGHT], ["head_logits"]),
        helper.make_node("Add", ["refined_base", "head_logits"], [OUTPUT_NAMES[0]]),
        helper.make_node("Softmax", [OUTPUT_NAMES[0]], [OUTPUT_NAMES[1]], axis=-1),
    ]
    value = lambda name, width: helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH_DIM, width])  # noqa: E731
    inputs = [value(INPUT_NAME, adapter.n_classes), value(EMBEDDING_NAME, adapter.head_dim)]
    model = helper.make_model(helper.make_graph(nodes, "craft_refiner", inputs,
                                                [value(n, adapter.n_classes) for n in OUTPUT_NAMES], inits),
                              opset_imports=[helper.make_opsetid("", OPSET)], producer_name="craft-adapter",
                              ir_version=IR_VERSION)
    helper.set_model_props(model, metadata_props(adapter))
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_the_head_graph_is_byte_identical_to_onnx_helper_and_runs_like_numpy() -> None:
    a = with_head(c=7, d=20, seed=4, mode="soft")
    raw = build_refiner_onnx(a)
    assert raw == helper_build_with_head(a)
    assert check_refiner_onnx(raw, "built")["head_dim"] == 20
    session = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
    scores, e = np.random.default_rng(5).normal(size=(9, 7)).astype(np.float32), unit(9, 20)
    refined, probs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: scores, EMBEDDING_NAME: e})
    np.testing.assert_allclose(refined, a.refine(scores, e), atol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)


def test_the_onnx_reader_refuses_a_graph_that_disagrees_with_its_metadata() -> None:
    a = with_head()
    headless_graph = build_refiner_onnx(dataclasses.replace(a, head=None), metadata=metadata_props(a))
    with pytest.raises(AdapterError, match="the metadata says an embedding head of width 12"):
        check_refiner_onnx(headless_graph, "x.onnx")
    hidden_head = build_refiner_onnx(a, metadata=metadata_props(dataclasses.replace(a, head=None)))
    with pytest.raises(AdapterError, match="the metadata says no embedding head"):
        check_refiner_onnx(hidden_head, "x.onnx")
    wider = dataclasses.replace(a, head=np.zeros((C, D + 3), np.float32))
    with pytest.raises(AdapterError, match="must be float32 \\[batch, 12\\] for the embedding width 12"):
        check_refiner_onnx(build_refiner_onnx(wider, metadata=metadata_props(a)), "x.onnx")
