"""Mutations of ONNX refiners for the loader fuzz campaign (``fuzz_loaders.py``), as hypothesis draws.

Structured graph edits (extra or swapped nodes, other ops and domains, subgraphs, functions, external data, inputs,
outputs, initializers, attributes, opsets, metadata), benign edits that keep the refiner valid, and protobuf-level
damage (byte flips, truncation, raw fields appended).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
from fuzz_mutations import dump_with_tokens, edit_metadata, flip_bytes, truncate
from hypothesis import strategies as st
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from craft_adapter.artifact.adapter_file import METADATA_KEY, REFINER_KEYS


def _subgraph() -> onnx.GraphProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    return helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "body", [x],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])


def extra_node(data: st.DataObject) -> onnx.NodeProto:
    """A node a refiner never has: another op, a custom domain, a subgraph, a constant."""
    kind = data.draw(st.sampled_from(["Identity", "Constant", "Loop", "If", "custom", "Relu"]))
    if kind == "Constant":
        return helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(2, np.float32)))
    if kind == "Loop":
        return helper.make_node("Loop", ["", ""], ["z"], body=_subgraph())
    if kind == "If":
        return helper.make_node("If", ["cond"], ["z"], then_branch=_subgraph(), else_branch=_subgraph())
    if kind == "custom":
        return helper.make_node("Run", ["probabilities"], ["z"], domain="com.evil", command="id")
    return helper.make_node(kind, ["probabilities"], [data.draw(st.sampled_from(["z", "probabilities"]))])


def edit_graph(data: st.DataObject, m: onnx.ModelProto) -> str:
    """One structured edit of an ONNX refiner, in place; returns what was done."""
    g = m.graph
    i = data.draw(st.integers(0, len(g.node) - 1))
    what = data.draw(st.sampled_from([
        "extra node", "insert node", "op type", "domain", "opset", "ir", "second input", "input type", "batch dim",
        "class dim", "outputs", "init values", "init dims", "init type", "external data", "extra init", "drop init",
        "float_data", "wiring", "attribute", "subgraph attribute", "function", "value_info", "training_info",
        "sparse init", "metadata", "metadata props", "doc_string", "benign", "benign"]))
    if what == "benign":  # the same refiner spelled differently: other tensor and node names, opset, doc strings
        edit = data.draw(st.sampled_from(["rename", "node names", "opset", "doc"]))
        if edit == "rename" and i < 3:
            new = data.draw(st.text(min_size=1, max_size=20).filter(lambda t: t not in (*REFINER_KEYS, "z")))
            g.node[i + 1].input[0 if i < 2 else 1] = g.node[i].output[0] = new
        elif edit == "node names":
            g.node[i].name = data.draw(st.text(max_size=30))
        elif edit == "opset":
            m.opset_import[0].version = data.draw(st.integers(17, 23))
            m.opset_import[0].domain = data.draw(st.sampled_from(["", "ai.onnx"]))
        else:
            g.node[i].doc_string = g.doc_string = data.draw(st.text(max_size=50))
        what = f"benign {edit}"
    elif what == "extra node":
        g.node.append(extra_node(data))
    elif what == "insert node":
        node = g.node[i]
        node.output[0], out = "moved", node.output[0]
        g.node.insert(i + 1, helper.make_node("Identity", ["moved"], [out]))
    elif what == "op type":
        g.node[i].op_type = data.draw(st.sampled_from(["MatMul", "Sigmoid", "LogSoftmax", "Sub", "Identity", "Scan",
                                                       "Gemm", "Relu", "Softmax", "Einsum"]))
    elif what == "domain":
        g.node[i].domain = data.draw(st.sampled_from(["com.microsoft", "ai.onnx.ml", "com.evil", "ai.onnx", ""]))
    elif what == "opset":
        edit = data.draw(st.sampled_from(["version", "extra domain", "none", "ai.onnx"]))
        if edit == "version":
            m.opset_import[0].version = data.draw(st.sampled_from([1, 16, 17, 18, 23, 24, 99, -1]))
        elif edit == "extra domain":
            m.opset_import.append(helper.make_opsetid("com.evil", 1))
        elif edit == "none":
            del m.opset_import[:]
        else:
            m.opset_import[0].domain = "ai.onnx"
        what = f"opset {edit}"
    elif what == "ir":
        m.ir_version = data.draw(st.sampled_from([0, 3, 7, 8, 9, 11, 12, 99, -1]))
    elif what == "second input":
        g.input.append(helper.make_tensor_value_info(data.draw(st.sampled_from(["refiner.fc1.bias", "y"])),
                                                     TensorProto.FLOAT, [4]))
    elif what == "input type":
        v = data.draw(st.sampled_from([*g.input, *g.output]))
        v.type.tensor_type.elem_type = data.draw(st.sampled_from([11, 7, 10, 0, 1]))
    elif what == "batch dim":
        v = data.draw(st.sampled_from([*g.input, *g.output]))
        v.type.tensor_type.shape.dim[0].dim_value = data.draw(st.sampled_from([1, 0, -1]))
    elif what == "class dim":
        v = data.draw(st.sampled_from([*g.input, *g.output]))
        d = v.type.tensor_type.shape.dim[1]
        d.dim_value = d.dim_value + data.draw(st.sampled_from([-1, 1, 10**6]))
    elif what == "outputs":
        edit = data.draw(st.sampled_from(["drop", "swap", "rename", "extra"]))
        if edit == "drop":
            del g.output[data.draw(st.integers(0, 1))]
        elif edit == "swap":
            a, b = copy.deepcopy(g.output[0]), copy.deepcopy(g.output[1])
            g.output[0].CopyFrom(b)
            g.output[1].CopyFrom(a)
        elif edit == "rename":
            g.output[0].name = "refined"
        else:
            g.output.append(helper.make_tensor_value_info("refiner_input", TensorProto.FLOAT, ["batch", 6]))
        what = f"outputs {edit}"
    elif what.startswith("init") or what in ("external data", "extra init", "drop init", "float_data"):
        t = g.initializer[data.draw(st.integers(0, len(g.initializer) - 1))]
        arr = numpy_helper.to_array(t).copy()
        if what == "init values":
            arr.flat[data.draw(st.integers(0, arr.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, 3e38, 2e4,
                                                                                           -9e3, 1e-45]))
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
        elif what == "init dims":
            t.dims[data.draw(st.integers(0, len(t.dims) - 1))] += data.draw(st.sampled_from([-1, 1, 2**40]))
        elif what == "init type":
            t.data_type = data.draw(st.sampled_from([TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT32]))
        elif what == "external data":
            t.data_location = TensorProto.EXTERNAL
            where = data.draw(st.sampled_from(["/etc/passwd", "../w.bin", "w.bin"]))
            external_data_helper.set_external_data(t, location=where)
            t.ClearField("raw_data")
        elif what == "extra init":
            g.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), data.draw(
                st.sampled_from(["evil", "refiner_input", t.name]))))
        elif what == "drop init":
            g.initializer.remove(t)
        else:  # the same values as float_data: a valid form; or both fields, or a short payload
            edit = data.draw(st.sampled_from(["float_data", "both", "short"]))
            if edit != "both":
                t.ClearField("raw_data")
            t.float_data.extend(arr.ravel().tolist()[:None if edit != "short" else -1])
            what = f"init {edit}"
    elif what == "wiring":
        node = g.node[i]
        names = [*REFINER_KEYS, "refiner_input", "refined_logits", *[n.output[0] for n in g.node]]
        slot = data.draw(st.integers(0, len(node.input) - 1)) if node.input else 0
        edit = data.draw(st.sampled_from(["rename", "swap", "extra output", "extra input"]))
        if edit == "rename" and node.input:
            node.input[slot] = data.draw(st.sampled_from(names))
        elif edit == "swap" and len(node.input) > 1:
            node.input[0], node.input[1] = node.input[1], node.input[0]
        elif edit == "extra output":
            node.output.append("z")
        else:
            node.input.append(data.draw(st.sampled_from(names)))
        what = f"wiring {edit}"
    elif what == "attribute":
        node = g.node[i]
        name = data.draw(st.sampled_from(["transB", "transA", "alpha", "beta", "axis", "foo"]))
        value = data.draw(st.sampled_from([0, 1, -1, 2, 1.0, 2.0, 0.5, "s"]))
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(kept + ([helper.make_attribute(name, value)] if data.draw(st.booleans()) else []))
    elif what == "subgraph attribute":
        g.node[i].attribute.append(helper.make_attribute("body", _subgraph()))
    elif what == "function":
        m.functions.append(helper.make_function("com.evil", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                                                [helper.make_opsetid("", 18)]))
    elif what == "value_info":
        g.value_info.append(helper.make_tensor_value_info(g.node[i].output[0], TensorProto.FLOAT, ["batch", 3]))
    elif what == "training_info":
        m.training_info.add().algorithm.CopyFrom(_subgraph())
    elif what == "sparse init":
        vals = numpy_helper.from_array(np.ones(1, np.float32), "sv")
        g.sparse_initializer.append(helper.make_sparse_tensor(vals, numpy_helper.from_array(np.zeros(1, np.int64)),
                                                              [4]))
    elif what in ("metadata", "metadata props"):
        props = {p.key: p.value for p in m.metadata_props}
        if what == "metadata":
            tokens: dict[str, str] = {}
            meta, what = edit_metadata(data, json.loads(props[METADATA_KEY]), tokens)
            props[METADATA_KEY] = dump_with_tokens(meta, tokens)
        else:
            edit = data.draw(st.sampled_from(["drop", "many", "not json", "huge", "duplicate"]))
            if edit == "drop":
                props.pop(METADATA_KEY)
            elif edit == "many":
                props.update({f"k{j}": "v" for j in range(17)})
            elif edit != "duplicate":
                props[METADATA_KEY] = "{not json" if edit == "not json" else "x" * 800_000
            what = f"metadata props {edit}"
        del m.metadata_props[:]
        helper.set_model_props(m, props)
        if what.endswith("duplicate"):
            m.metadata_props.append(copy.deepcopy(m.metadata_props[0]))
    else:
        m.doc_string = "d" * data.draw(st.sampled_from([10, 1 << 20]))
    return f"graph {what}"


RAW_TAILS = [  # a repeated ir_version, unknown field 21, functions (25), a group, a truncated graph, an 11-byte varint
    b"\x08\x09", b"\xaa\x01\x00", b"\xca\x01\x00", b"\x0b", b"\x3a\x05abc", b"\xff" * 10 + b"\x01"]


def mutate_onnx(data: st.DataObject, raw: bytes) -> tuple[bytes, str]:
    """A structured graph edit and/or protobuf-level damage of an ONNX seed."""
    steps = []
    if data.draw(st.integers(0, 3)):
        m = onnx.ModelProto()
        m.ParseFromString(raw)
        steps.append(edit_graph(data, m))
        try:
            raw = m.SerializeToString()
        except ValueError:  # a lone surrogate the edit put into a string field
            return raw, steps[0] + " (not serialisable; seed kept)"
    for _ in range(data.draw(st.integers(0 if steps else 1, 2))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "append"]))
        if kind == "flip" and raw:
            raw, what = flip_bytes(data, raw, len(raw))
        elif kind == "truncate" and raw:
            raw, what = truncate(data, raw)
        else:
            tail = data.draw(st.sampled_from(RAW_TAILS))
            raw, what = raw + tail, f"appended raw field {tail!r}"
        steps.append(what)
    return raw, "; ".join(steps)
