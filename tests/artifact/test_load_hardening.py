"""Safe loading, rule by rule: every limit and check on .safetensors and .onnx adapters refuses what it should."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from craft_adapter.artifact import adapter_file as artifact
from craft_adapter.artifact.adapter_file import (
    MAX_CLASSES,
    MAX_CTX_TOKENS,
    MAX_HEADER_BYTES,
    MAX_HIDDEN,
    MAX_JSON_DEPTH,
    MAX_METADATA_BYTES,
    MAX_METADATA_ENTRIES,
    MAX_TEXT_CHARS,
    METADATA_KEY,
    Adapter,
    AdapterError,
)

# isort: split
from craft_adapter.artifact.onnx_check import MAX_OPSET, MIN_OPSET, check_refiner_onnx
from craft_adapter.artifact.onnx_graph import build_refiner_onnx
from craft_adapter.export.onnx_export import trace_refiner
from craft_adapter.serve import shipped as shipped_module
from craft_adapter.serve.shipped import ShippedAdapter

C, H = 3, 8


def make(c: int = C, h: int = H, mode: str = "soft", scale: float = 1.0) -> Adapter:
    """A small valid adapter (soft mode has a prompt.ctx)."""
    rng = np.random.default_rng(0)
    r = {"refiner.fc1.weight": rng.normal(size=(h, c)), "refiner.fc1.bias": rng.normal(size=h),
         "refiner.fc2.weight": rng.normal(size=(c, h)), "refiner.fc2.bias": rng.normal(size=c)}
    return Adapter([f"class {i}" for i in range(c)], "a photo of a {}.", mode, "logits", 50.0,
                   {k: (scale * v).astype(np.float32) for k, v in r.items()},
                   ctx=rng.normal(size=(4, 16)).astype(np.float32) if mode == "soft" else None)


def split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's parsed header and its data section."""
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def pack(header: dict[str, Any] | str, body: bytes) -> bytes:
    """A header (object or raw JSON text) and a data section as a safetensors file."""
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text)) + text + body


def edit_header(edit: Callable[[dict[str, Any]], Any], raw: bytes | None = None) -> bytes:
    """An adapter file with its header JSON edited in place by ``edit``."""
    header, body = split(raw or make().to_bytes())
    edit(header)
    return pack(header, body)


def edit_meta(edit: Callable[[dict[str, Any]], Any]) -> bytes:
    """An adapter file with its craft_adapter metadata edited in place by ``edit``."""
    def go(header: dict[str, Any]) -> None:
        meta = json.loads(header["__metadata__"][METADATA_KEY])
        edit(meta)
        header["__metadata__"][METADATA_KEY] = json.dumps(meta)
    return edit_header(go)


def refused(raw: bytes, message: str) -> None:
    """``Adapter.from_bytes`` refuses ``raw`` with an AdapterError matching ``message``."""
    with pytest.raises(AdapterError, match=message):
        Adapter.from_bytes(raw)


# -- sizes and JSON ---------------------------------------------------------------------------------------------

def test_file_size_is_checked_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for suffix in (".safetensors", ".onnx"):
        big = tmp_path / f"big{suffix}"
        with big.open("wb") as f:  # sparse: 64 MiB + 1 on paper, nothing on disk
            f.truncate(artifact.MAX_FILE_BYTES + 1)
        with pytest.raises(AdapterError, match="67108865 bytes, over the 67108864-byte limit"):
            ShippedAdapter.load(big)
    monkeypatch.setattr(artifact, "MAX_FILE_BYTES", 100)
    refused(make().to_bytes(), "over the 100-byte limit")
    with pytest.raises(AdapterError, match="not a regular file"):
        Adapter.load(tmp_path.parent)


def test_header_length_and_size_limits() -> None:
    raw = make().to_bytes()
    refused(struct.pack("<Q", MAX_HEADER_BYTES + 1) + raw[8:], "header length")
    refused(struct.pack("<Q", len(raw)) + raw[8:], "header length")
    refused(struct.pack("<Q", 2**64 - 1) + raw[8:], "header length")
    refused(edit_meta(lambda m: m.update(fit={"note": "x" * MAX_METADATA_BYTES})), "over the limit")
    refused(edit_header(lambda h: h["__metadata__"].update({f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES)})),
            f"at most {MAX_METADATA_ENTRIES} keys")
    refused(edit_header(lambda h: h["__metadata__"].update(other=3)), "to strings")


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 999, 100_000])
def test_deep_json_is_an_adapter_error_not_a_recursion_error(depth: int) -> None:
    deep = "[" * depth + "]" * depth
    _, body = split(make().to_bytes())
    refused(pack('{"__metadata__":{"craft_adapter":"{}"},"x":' + deep + "}", body), "nested deeper")
    header, body = split(make().to_bytes())
    meta = header["__metadata__"][METADATA_KEY]
    header["__metadata__"][METADATA_KEY] = meta[:-1] + ',"deep":' + deep + "}"
    refused(pack(header, body), "nested deeper")


@pytest.mark.parametrize("token,message", [
    ("NaN", "not JSON"), ("Infinity", "not JSON"), ("1e400", "out of range"), ("9" * 5000, "not valid JSON")])
def test_non_finite_and_huge_numbers_in_metadata(token: str, message: str) -> None:
    header, body = split(make().to_bytes())
    header["__metadata__"][METADATA_KEY] = header["__metadata__"][METADATA_KEY].replace('"scale":50.0',
                                                                                      f'"scale":{token}')
    refused(pack(header, body), message)


def test_duplicate_keys_and_bad_utf8_are_refused() -> None:
    header, body = split(make().to_bytes())
    text = json.dumps(header)
    entry = '"refiner.fc1.bias": ' + json.dumps(header["refiner.fc1.bias"])
    refused(pack(text.replace(entry, entry + ", " + entry), body), "duplicate keys")
    raw = make().to_bytes()
    refused(raw.replace(b"class 0", b"class \xff"), "not valid JSON")


# -- the tensor table, before allocation ------------------------------------------------------------------------

@pytest.fixture
def no_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors may not be reached: the header check must refuse first."""
    monkeypatch.setattr(artifact, "st_load", lambda raw: pytest.fail("safetensors.load reached"))


@pytest.mark.parametrize("edit,message", [
    (lambda h: h["refiner.fc1.bias"].update(dtype="F64"), "float32"),
    (lambda h: h["refiner.fc1.bias"].update(dtype="I32"), "float32"),
    (lambda h: h["refiner.fc1.bias"].update(shape=[-1]), "expected 1 or 2 sizes"),
    (lambda h: h["refiner.fc1.bias"].update(shape=[2**63]), "expected 1 or 2 sizes"),
    (lambda h: h["refiner.fc1.bias"].update(shape=[True]), "expected 1 or 2 sizes"),
    (lambda h: h["refiner.fc1.bias"].update(shape=[9]), "do not hold"),
    (lambda h: h["prompt.ctx"].update(shape=[2, 2, 16]), "expected 1 or 2 sizes"),
    (lambda h: h["refiner.fc1.bias"].update(data_offsets=[0, 2**70]), "do not hold"),
    (lambda h: h["refiner.fc1.bias"].update(data_offsets=[-4, 28]), "do not hold"),
    (lambda h: h["refiner.fc1.bias"].update(data_offsets="0,32"), "malformed data_offsets"),
    (lambda h: h["refiner.fc1.bias"].update(data_offsets=list(h["refiner.fc2.bias"]["data_offsets"])), "do not hold"),
    (lambda h: h["refiner.fc1.bias"].update(extra=1), "dtype, shape and data_offsets only"),
    (lambda h: h.update(evil={"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}), "unexpected tensors"),
    (lambda h: h.pop("refiner.fc2.weight"), "tensor data"),
    (lambda h: h.pop("__metadata__"), "no craft_adapter metadata"),
])
def test_header_rules(edit: Callable[[dict[str, Any]], Any], message: str, no_allocation: None) -> None:
    refused(edit_header(edit), message)


def test_offsets_must_tile_the_data_exactly(no_allocation: None) -> None:
    header, body = split(make().to_bytes())
    refused(pack(header, body + b"\0" * 4), "padded")
    refused(pack(header, body[:-4]), "truncated")
    a, b = header["refiner.fc1.bias"]["data_offsets"]
    header["refiner.fc1.bias"]["data_offsets"] = [a + 4, b + 4]  # overlaps the next tensor, leaves a gap
    refused(pack(header, body), "overlaps or leaves a gap")


def test_shapes_are_checked_against_the_class_count_before_allocation(no_allocation: None) -> None:
    refused(edit_meta(lambda m: m.update(class_names=["a", "b"])), r"has shape \(8, 3\), expected \(8, 2\)")
    refused(edit_meta(lambda m: m.update(class_names=[f"c{i}" for i in range(MAX_CLASSES + 1)])), "1 to 20000")


def test_hidden_and_ctx_limits(no_allocation: None) -> None:
    refused(_over_hidden(), f"hidden in 1..{MAX_HIDDEN}")
    a = make()
    a.ctx = np.zeros((MAX_CTX_TOKENS + 1, 4), np.float32)
    refused(a.to_bytes(), f"n_ctx in 1..{MAX_CTX_TOKENS}")


def _over_hidden() -> bytes:
    """A file whose refiner is wider than MAX_HIDDEN (the Adapter constructor would refuse to build it)."""
    h, c = MAX_HIDDEN + 1, 1
    from safetensors.numpy import save

    tensors = {"refiner.fc1.weight": np.zeros((h, c), np.float32), "refiner.fc1.bias": np.zeros(h, np.float32),
               "refiner.fc2.weight": np.zeros((c, h), np.float32), "refiner.fc2.bias": np.zeros(c, np.float32)}
    meta = make(mode="text").metadata() | {"class_names": ["a"]}
    return save(tensors, metadata={METADATA_KEY: json.dumps(meta)})


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(class_names=["x" * (MAX_TEXT_CHARS + 1), "b", "c"]), "at most 1000 characters"),
    (lambda m: m.update(class_names=["\ud800", "b", "c"]), "valid Unicode"),
    (lambda m: m["logits"].update(scale="50"), "finite number"),
    (lambda m: m["logits"].update(scale=True), "finite number"),
    (lambda m: m.update(prompt=[]), "malformed field"),
    (lambda m: m.update(backend=[1]), "must be JSON objects"),
    (lambda m: m.update(format_version=1.0), "integer format_version"),
    (lambda m: m.update(format_version=0), "invalid format_version"),
])
def test_metadata_types(edit: Callable[[dict[str, Any]], Any], message: str) -> None:
    refused(edit_meta(edit), message)


def test_huge_and_non_finite_weights_are_refused() -> None:
    with pytest.raises(AdapterError, match="finite float32 with"):
        make(scale=2e4)
    header, body = split(make().to_bytes())
    a, _ = header["refiner.fc2.bias"]["data_offsets"]
    refused(pack(header, body[:a] + struct.pack("<f", 3e38) + body[a + 4:]), "finite float32")


def test_valid_variants_still_load() -> None:
    """Tensors in another order in the data section, header padding: still the same adapter."""
    header, body = split(make().to_bytes())
    names = ["prompt.ctx", "refiner.fc2.bias", "refiner.fc1.weight", "refiner.fc2.weight", "refiner.fc1.bias"]
    chunks = {k: body[header[k]["data_offsets"][0]:header[k]["data_offsets"][1]] for k in names}
    pos = 0
    for k in names:
        header[k]["data_offsets"] = [pos, pos + len(chunks[k])]
        pos += len(chunks[k])
    loaded = Adapter.from_bytes(pack(json.dumps(header) + "   ", b"".join(chunks[k] for k in names)))
    assert loaded.to_bytes() == make().to_bytes()


# -- ONNX ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported() -> onnx.ModelProto:
    return trace_refiner(make(mode="text"))


def model(base: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """A copy of ``base``, or of the torch-free builder's refiner."""
    m = onnx.ModelProto()
    m.CopyFrom(base if base is not None else onnx.load_from_string(build_refiner_onnx(make(mode="text"))))
    return m


def onnx_refused(m: onnx.ModelProto | bytes, message: str) -> None:
    """The ONNX check refuses ``m`` with an AdapterError matching ``message``."""
    with pytest.raises(AdapterError, match=message):
        check_refiner_onnx(m if isinstance(m, bytes) else m.SerializeToString(), "x.onnx")


def _subgraph() -> onnx.GraphProto:
    v = helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])
    return helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "g", [v],
                             [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])


def test_both_exported_forms_are_accepted_at_every_opset() -> None:
    adapter = make(mode="text")
    for opset in range(MIN_OPSET, MAX_OPSET + 1):
        raw = trace_refiner(adapter, opset).SerializeToString()
        assert check_refiner_onnx(raw, "x")["class_names"] == adapter.class_names
    assert check_refiner_onnx(build_refiner_onnx(adapter), "x")["class_names"] == adapter.class_names


def _append(nodes: Any, node: onnx.NodeProto) -> None:
    nodes.append(node)


SMUGGLED: dict[str, tuple[Callable[[onnx.ModelProto], Any], str]] = {
    "extra node": (lambda m: _append(m.graph.node, helper.make_node("Identity", ["probabilities"], ["z"])),
                   r"nodes are \[.*'Identity'\]"),
    "different op": (lambda m: setattr(m.graph.node[1], "op_type", "Sigmoid"), "expected.*Relu"),
    "MatMul instead of Gemm": (lambda m: setattr(m.graph.node[0], "op_type", "MatMul"), "expected.*Gemm"),
    "Loop": (lambda m: m.graph.node[1].attribute.append(helper.make_attribute("body", _subgraph())),
             r"g \(a subgraph\)"),
    "second input": (lambda m: m.graph.input.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])),
                     r"inputs are \['refiner_input', 'y'\]"),
    "initializer as input": (lambda m: m.graph.input.append(helper.make_tensor_value_info(
        "refiner.fc1.bias", TensorProto.FLOAT, [8])), "inputs are"),
    "custom domain op": (lambda m: setattr(m.graph.node[1], "domain", "com.evil"), "domain 'com.evil'"),
    "custom opset": (lambda m: m.opset_import.append(helper.make_opsetid("com.evil", 1)), "imports opsets"),
    "opset too new": (lambda m: setattr(m.opset_import[0], "version", MAX_OPSET + 1), "imports opsets"),
    "opset too old": (lambda m: setattr(m.opset_import[0], "version", MIN_OPSET - 1), "imports opsets"),
    "ir version": (lambda m: setattr(m, "ir_version", 12), "IR version 12"),
    "local function": (lambda m: m.functions.append(helper.make_function(
        "com.evil", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], [helper.make_opsetid("", 18)])),
        "functions"),
    "training info": (lambda m: m.training_info.add().algorithm.CopyFrom(_subgraph()), "training_info"),
    "value info": (lambda m: m.graph.value_info.append(helper.make_tensor_value_info("hidden", 1, [1, 8])),
                   "value_info"),
    "sparse initializer": (lambda m: m.graph.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(np.ones(1, np.float32), "s"), numpy_helper.from_array(np.zeros(1, np.int64)), [3])),
        "sparse_initializer"),
    "extra initializer": (lambda m: m.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "e")),
                          "initializers are"),
    "wiring swapped": (lambda m: m.graph.node[3].input.reverse(), "not x \\+ fc2"),
    "fc1 and fc2 swapped": (lambda m: (m.graph.node[0].input.__setitem__(1, "refiner.fc2.weight"),
                                       m.graph.node[2].input.__setitem__(1, "refiner.fc1.weight")), "reads"),
    "skip the relu": (lambda m: m.graph.node[2].input.__setitem__(0, m.graph.node[0].output[0]), "reads"),
    "transB 0": (lambda m: m.graph.node[0].attribute[0].__setattr__("i", 0), "transB=0"),
    "alpha 2": (lambda m: m.graph.node[2].attribute.append(helper.make_attribute("alpha", 2.0)), "alpha=2.0"),
    "softmax axis 0": (lambda m: m.graph.node[4].attribute[0].__setattr__("i", 0), "axis=0"),
    "unknown attribute": (lambda m: m.graph.node[1].attribute.append(helper.make_attribute("foo", 1)), "'foo'"),
    "input float64": (lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", 11), "must be float32"),
    "fixed batch": (lambda m: m.graph.input[0].type.tensor_type.shape.dim[0].__setattr__("dim_value", 1),
                    "batch"),
    "output renamed": (lambda m: setattr(m.graph.output[1], "name", "p"), "outputs"),
    "nan initializer": (lambda m: m.graph.initializer[1].CopyFrom(numpy_helper.from_array(
        np.full(8, np.nan, np.float32), "refiner.fc1.bias")), "not finite"),
    "float64 initializer": (lambda m: m.graph.initializer[1].CopyFrom(numpy_helper.from_array(
        np.zeros(8, np.float64), "refiner.fc1.bias")), "expected float32"),
    "no metadata": (lambda m: m.ClearField("metadata_props"), "no craft_adapter metadata"),
}


@pytest.mark.parametrize("name", list(SMUGGLED))
def test_anything_but_the_refiner_is_refused(name: str) -> None:
    edit, message = SMUGGLED[name]
    m = model()
    edit(m)
    onnx_refused(m, message)


def test_external_data_is_refused(tmp_path: Path) -> None:
    m = model()
    t = m.graph.initializer[0]
    external_data_helper.set_external_data(t, location="/etc/passwd")
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("raw_data")
    onnx_refused(m, "external_data|data_location")


def test_initializer_shapes_must_match_the_metadata_class_count() -> None:
    m = model()
    props = {p.key: p.value for p in m.metadata_props}
    meta = json.loads(props[METADATA_KEY])
    meta["class_names"] = ["a", "b"]
    props[METADATA_KEY] = json.dumps(meta)
    del m.metadata_props[:]
    helper.set_model_props(m, props)
    onnx_refused(m, "for the 2 classes in the metadata")


def test_protobuf_tricks_are_refused() -> None:
    raw = build_refiner_onnx(make(mode="text"))
    onnx_refused(raw + b"\x08\x09", "ir_version is given twice")
    onnx_refused(raw + b"\xaa\x01\x00", "model field 21")
    onnx_refused(raw[:-3], "truncated|")
    onnx_refused(b"not onnx", "onnxruntime cannot load it")
    onnx_refused(b"\xff" * 11, "varint")
    m = model()
    m.graph.node[0].attribute.append(helper.make_attribute("transB", 1))
    onnx_refused(m, "repeated attribute 'transB'")
    props = {p.key: p.value for p in m.metadata_props}
    m = model()
    m.metadata_props.append(m.metadata_props[0])
    onnx_refused(m, "distinct keys")
    m = model()
    del m.metadata_props[:]
    helper.set_model_props(m, props | {METADATA_KEY: "[" * 100_000})
    onnx_refused(m, "nested deeper")


def test_float_data_form_is_accepted_and_matches(exported: onnx.ModelProto) -> None:
    m = model(exported)
    for t in m.graph.initializer:
        arr = numpy_helper.to_array(t)
        t.ClearField("raw_data")
        t.float_data.extend(arr.ravel().tolist())
    check_refiner_onnx(m.SerializeToString(), "x")


def test_onnxruntime_only_sees_verified_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              exported: onnx.ModelProto) -> None:
    seen: list[Any] = []
    real = shipped_module.make_session
    monkeypatch.setattr(shipped_module, "make_session", lambda m, d: seen.append(m) or real(m, d))
    good = tmp_path / "good.onnx"
    good.write_bytes(exported.SerializeToString())
    assert ShippedAdapter.load(good).n_classes == C
    assert seen == [good.read_bytes()]  # the very bytes that were checked, not a second read of the path
    bad = model(exported)
    bad.graph.node.append(helper.make_node("Identity", ["probabilities"], ["z"]))
    (tmp_path / "bad.onnx").write_bytes(bad.SerializeToString())
    with pytest.raises(AdapterError, match="Identity"):
        ShippedAdapter.load(tmp_path / "bad.onnx")
    assert len(seen) == 1


def test_onnx_reader_agrees_with_onnx(exported: onnx.ModelProto) -> None:
    """What the strict reader accepts, the onnx package parses to the same graph and weights."""
    from craft_adapter.artifact.onnx_check import _Reader

    raw = exported.SerializeToString()
    mine = _Reader(raw).message("model", 0, len(raw))
    assert [n["op_type"] for n in mine["graph"]["node"]] == [n.op_type for n in exported.graph.node]
    for t, theirs in zip(mine["graph"]["initializer"], exported.graph.initializer, strict=True):
        assert t["name"] == theirs.name and t["dims"] == list(theirs.dims)
        np.testing.assert_array_equal(np.frombuffer(t["raw_data"], "<f4"), numpy_helper.to_array(theirs).ravel())


def test_export_writes_only_what_the_loader_accepts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from craft_adapter.export import ExportError, export_onnx, onnx_export

    real_trace = onnx_export.trace_refiner

    def drifted_trace(adapter: Adapter, opset: int = 18) -> onnx.ModelProto:  # as if torch began emitting Identity
        m = real_trace(adapter, opset)
        m.graph.node.append(helper.make_node("Identity", ["probabilities"], ["p2"]))
        return m

    monkeypatch.setattr(onnx_export, "trace_refiner", drifted_trace)
    with pytest.raises(ExportError, match="not one the runtime loads.*Identity"):
        export_onnx(make(mode="text"), tmp_path / "r.onnx")
    assert not list(tmp_path.iterdir())
