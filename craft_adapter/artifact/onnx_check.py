"""Check an ``.onnx`` refiner before onnxruntime sees it: it must be exactly the graph craft-adapter exports.

A strict protobuf reader decodes only the fields a refiner uses and refuses every other one (local functions,
training info, subgraph attributes, sparse, external or segmented tensor data, value info, other types) and any
singular field given twice, so there is nothing the check skips and onnxruntime reads. It needs no ``onnx``
package: the runtime must run with numpy, safetensors and onnxruntime only. Then the model must be opset 17..23 of
the default domain, with one float input ``refiner_input [batch, C]``, the outputs ``refined_logits`` and
``probabilities``, exactly the four refiner initializers (float32, finite, shaped for the C classes its metadata
lists) and the nodes of ``x + fc2(relu(fc1(x)))`` and its softmax, as ``torch.onnx.export`` and
:func:`~craft_adapter.serve.onnx_graph.build_refiner_onnx` write them. An adapter with an embedding head (its
metadata says so, with the width ``d``) has exactly one more input, ``image_embedding [batch, d]``, one more
initializer, ``head.weight [d, C]``, and ``+ image_embedding @ head.weight`` before the softmax; the metadata and
the graph must agree on whether there is a head.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from craft_adapter.artifact.adapter_file import (
    MAX_FILE_BYTES,
    MAX_HIDDEN,
    MAX_METADATA_BYTES,
    MAX_METADATA_ENTRIES,
    METADATA_KEY,
    REFINER_KEYS,
    AdapterError,
    bounded,
    head_dim,
    metadata_fields,
    parse_json,
)
from craft_adapter.artifact.onnx_graph import EMBEDDING_NAME, HEAD_WEIGHT, INPUT_NAME, OUTPUT_NAMES

MIN_OPSET, MAX_OPSET = 17, 23  # what torch.onnx.export (TorchScript) writes for opset >= 17
MIN_IR, MAX_IR = 8, 11  # the IR versions those opsets come with
MAX_FIELDS = 2000  # protobuf fields in the whole model; an exported refiner has about 150
MAX_NAME_CHARS = 256  # graph, node, value and attribute names
DEFAULT_DOMAINS = ("", "ai.onnx")
FLOAT, INT = 1, 2  # AttributeProto.type
FLOAT32 = 1  # TensorProto.DataType
RE_EXPORT = "re-export with craft-adapter export --onnx"

_I, _S, _B, _F, _IS, _FS = "int", "str", "bytes", "float", "ints", "floats"
SCHEMA: dict[str, dict[int, tuple[str, str, bool]]] = {  # message -> field number -> (name, kind, repeated)
    "model": {1: ("ir_version", _I, False), 2: ("producer_name", _S, False), 3: ("producer_version", _S, False),
              4: ("domain", _S, False), 5: ("model_version", _I, False), 6: ("doc_string", _S, False),
              7: ("graph", "graph", False), 8: ("opset_import", "opset", True),
              14: ("metadata_props", "entry", True)},
    "opset": {1: ("domain", _S, False), 2: ("version", _I, False)},
    "entry": {1: ("key", _S, False), 2: ("value", _S, False)},
    "graph": {1: ("node", "node", True), 2: ("name", _S, False), 5: ("initializer", "tensor", True),
              10: ("doc_string", _S, False), 11: ("input", "value", True), 12: ("output", "value", True)},
    "node": {1: ("input", _S, True), 2: ("output", _S, True), 3: ("name", _S, False), 4: ("op_type", _S, False),
             5: ("attribute", "attribute", True), 6: ("doc_string", _S, False), 7: ("domain", _S, False)},
    "attribute": {1: ("name", _S, False), 2: ("f", _F, False), 3: ("i", _I, False), 13: ("doc_string", _S, False),
                  20: ("type", _I, False)},
    "tensor": {1: ("dims", _IS, True), 2: ("data_type", _I, False), 4: ("float_data", _FS, True),
               8: ("name", _S, False), 9: ("raw_data", _B, False), 12: ("doc_string", _S, False)},
    "value": {1: ("name", _S, False), 2: ("type", "type", False), 3: ("doc_string", _S, False)},
    "type": {1: ("tensor_type", "tensor_type", False)},
    "tensor_type": {1: ("elem_type", _I, False), 2: ("shape", "shape", False)},
    "shape": {1: ("dim", "dim", True)},
    "dim": {1: ("dim_value", _I, False), 2: ("dim_param", _S, False)},
}
REFUSED = {  # ONNX fields a refiner never has, named for the error message
    "model": {20: "training_info", 25: "functions (local functions)", 26: "configuration"},
    "graph": {13: "value_info", 14: "quantization_annotation", 15: "sparse_initializer", 16: "metadata_props"},
    "node": {8: "overload", 9: "metadata_props", 10: "device_configurations"},
    "attribute": {4: "s", 5: "t (a tensor)", 6: "g (a subgraph)", 7: "floats", 8: "ints", 9: "strings",
                  10: "tensors", 11: "graphs (subgraphs)", 14: "tp", 15: "type_protos", 21: "ref_attr_name",
                  22: "sparse_tensor", 23: "sparse_tensors"},
    "tensor": {3: "segment", 5: "int32_data", 6: "string_data", 7: "int64_data", 10: "double_data",
               11: "uint64_data", 13: "external_data", 14: "data_location", 16: "metadata_props"},
    "value": {4: "metadata_props"},
    "type": {4: "sequence_type", 5: "map_type", 6: "denotation", 7: "opaque_type", 8: "sparse_tensor_type",
             9: "optional_type"},
    "dim": {3: "denotation"},
}
# node i: op type, inputs ("tN": node N's output), required attributes, optional attributes, and what it writes
# ("tN": a new tensor of its own name, else that graph output)
_GEMM = {"alpha": (FLOAT, 1.0), "beta": (FLOAT, 1.0)}
PATTERN = (
    ("Gemm", (INPUT_NAME, REFINER_KEYS[0], REFINER_KEYS[1]), {"transB": (INT, 1)}, _GEMM, "t0"),
    ("Relu", ("t0",), {}, {}, "t1"),
    ("Gemm", ("t1", REFINER_KEYS[2], REFINER_KEYS[3]), {"transB": (INT, 1)}, _GEMM, "t2"),
    ("Add", (INPUT_NAME, "t2"), {}, {}, OUTPUT_NAMES[0]),
    ("Softmax", (OUTPUT_NAMES[0],), {"axis": (INT, -1)}, {}, OUTPUT_NAMES[1]),
)
HEAD_PATTERN = (  # with an embedding head: refined = (x + fc2(relu(fc1(x)))) + image_embedding @ head.weight
    *PATTERN[:3],
    ("Add", (INPUT_NAME, "t2"), {}, {}, "t3"),
    ("MatMul", (EMBEDDING_NAME, HEAD_WEIGHT), {}, {}, "t4"),
    ("Add", ("t3", "t4"), {}, {}, OUTPUT_NAMES[0]),
    PATTERN[4],
)


class _Malformed(Exception):
    """The bytes are not a protobuf message of the refiner's schema."""


class _Reader:
    """Decodes the protobuf wire format against :data:`SCHEMA`, refusing anything outside it."""

    def __init__(self, raw: bytes) -> None:
        self.buf = memoryview(raw)
        self.fields = 0

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        """An unsigned varint at ``pos`` and the position after it."""
        value = shift = 0
        while True:
            if pos >= end:
                raise _Malformed("truncated varint")
            b = self.buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value, pos
            shift += 7
            if shift >= 70:
                raise _Malformed("varint longer than 10 bytes")

    def message(self, kind: str, pos: int, end: int) -> dict[str, Any]:
        """The fields of one ``kind`` message in ``buf[pos:end]``: a dict of name -> value (a list if repeated)."""
        out: dict[str, Any] = {}
        while pos < end:
            key, pos = self.varint(pos, end)
            number, wire = key >> 3, key & 7
            self.fields += 1
            if self.fields > MAX_FIELDS:
                raise _Malformed(f"more than {MAX_FIELDS} protobuf fields")
            if number not in SCHEMA[kind]:
                raise _Malformed(f"{kind} field {REFUSED.get(kind, {}).get(number, number)} is not part of a refiner")
            name, field_kind, repeated = SCHEMA[kind][number]
            value, pos = self.value(field_kind, wire, pos, end, f"{kind}.{name}")
            if repeated:
                out.setdefault(name, []).extend(value if field_kind in (_IS, _FS) else [value])
            elif name in out:
                raise _Malformed(f"{kind}.{name} is given twice")
            else:
                out[name] = value
        return out

    def value(self, kind: str, wire: int, pos: int, end: int, what: str) -> tuple[Any, int]:
        """One field value of ``kind`` sent with wire type ``wire``, and the position after it."""
        if kind in (_I, _IS) and wire == 0:
            v, pos = self.varint(pos, end)
            if v >= 1 << 64:
                raise _Malformed(f"{what} overflows int64")
            v = v - (1 << 64) if v >= 1 << 63 else v
            return ([v] if kind == _IS else v), pos
        if kind in (_F, _FS) and wire == 5:
            if end - pos < 4:
                raise _Malformed(f"{what} is truncated")
            v = struct.unpack("<f", self.buf[pos:pos + 4])[0]
            return ([v] if kind == _FS else v), pos + 4
        if wire != 2 or kind in (_I, _F):
            raise _Malformed(f"{what} has wire type {wire}")
        n, pos = self.varint(pos, end)
        if n > end - pos:
            raise _Malformed(f"{what} is truncated ({n} bytes announced, {end - pos} left)")
        stop = pos + n
        if kind == _S:
            try:
                return str(self.buf[pos:stop], "utf-8"), stop
            except UnicodeDecodeError:
                raise _Malformed(f"{what} is not UTF-8") from None
        if kind == _B:
            return self.buf[pos:stop], stop
        if kind == _FS:
            if n % 4:
                raise _Malformed(f"{what} is not a whole number of floats")
            return list(np.frombuffer(self.buf[pos:stop], "<f4")), stop
        if kind == _IS:
            values = []
            while pos < stop:
                v, pos = self.value(_I, 0, pos, stop, what)
                values.append(v)
            return values, stop
        return self.message(kind, pos, stop), stop


def check_refiner_onnx(raw: bytes, source: str) -> dict[str, Any]:
    """Verify that ``raw`` is a refiner ``.onnx`` as craft-adapter exports it; return its metadata fields."""
    if len(raw) > MAX_FILE_BYTES:
        raise AdapterError(f"{source} is {len(raw)} bytes, over the {MAX_FILE_BYTES}-byte limit for an adapter")
    try:
        model = _Reader(raw).message("model", 0, len(raw))
    except _Malformed as e:
        raise AdapterError(f"{source}: not a refiner ONNX model, so onnxruntime cannot load it ({e}); "
                           f"{RE_EXPORT}") from None
    meta = parse_json(_metadata_json(model, source), "craft_adapter metadata", source)
    fields = metadata_fields(meta, source)
    fields["head_dim"] = head_dim(meta, source)  # None: no embedding head
    try:
        _check_model(model, len(fields["class_names"]), fields["head_dim"])
    except _Malformed as e:
        raise AdapterError(f"{source}: {e}; this is not the refiner graph craft-adapter exports, {RE_EXPORT}") from None
    return fields


def _metadata_json(model: dict[str, Any], source: str) -> str:
    props = model.get("metadata_props", [])
    keys = [p.get("key", "") for p in props]
    if len(props) > MAX_METADATA_ENTRIES or len(set(keys)) != len(keys):
        raise AdapterError(f"{source}: metadata_props must hold at most {MAX_METADATA_ENTRIES} distinct keys")
    values = {k: p.get("value", "") for k, p in zip(keys, props, strict=True)}
    if any(len(v) > MAX_METADATA_BYTES for v in values.values()):
        raise AdapterError(f"{source}: a metadata_props value is over the {MAX_METADATA_BYTES}-character limit")
    if METADATA_KEY not in values:
        raise AdapterError(f"{source}: no {METADATA_KEY} metadata; export it with craft-adapter export --onnx")
    return values[METADATA_KEY]


def _check_model(model: dict[str, Any], c: int, d: int | None) -> None:
    if not MIN_IR <= model.get("ir_version", 0) <= MAX_IR:
        raise _Malformed(f"IR version {model.get('ir_version')} is outside {MIN_IR}..{MAX_IR}")
    opsets = [(o.get("domain", ""), o.get("version", 0)) for o in model.get("opset_import", [])]
    if len(opsets) != 1 or opsets[0][0] not in DEFAULT_DOMAINS or not MIN_OPSET <= opsets[0][1] <= MAX_OPSET:
        raise _Malformed(f"it imports opsets {opsets[:4]}; a refiner uses only the default domain, opset "
                         f"{MIN_OPSET}..{MAX_OPSET}")
    graph = model.get("graph", {})
    _check_io(graph, c, d)
    _check_initializers(graph.get("initializer", []), c, d)
    _check_nodes(graph.get("node", []), PATTERN if d is None else HEAD_PATTERN)


def _check_io(graph: dict[str, Any], c: int, d: int | None) -> None:
    inputs, outputs = graph.get("input", []), graph.get("output", [])
    want = [INPUT_NAME] if d is None else [INPUT_NAME, EMBEDDING_NAME]
    if [v.get("name") for v in inputs] != want or [v.get("name") for v in outputs] != list(OUTPUT_NAMES):
        said = "no embedding head" if d is None else f"an embedding head of width {d}"
        raise _Malformed(f"its inputs are {[v.get('name', '')[:40] for v in inputs[:4]]} and outputs "
                         f"{[v.get('name', '')[:40] for v in outputs[:4]]}, expected {want} and {list(OUTPUT_NAMES)} "
                         f"(the metadata says {said})")
    for v in (*inputs, *outputs):
        width = d if v["name"] == EMBEDDING_NAME else c
        tensor = v.get("type", {}).get("tensor_type", {})
        dims = tensor.get("shape", {}).get("dim", [])
        batch_ok = len(dims) == 2 and set(dims[0]) == {"dim_param"} and 0 < len(dims[0]["dim_param"]) <= 64
        if tensor.get("elem_type") != FLOAT32 or not batch_ok or dims[1] != {"dim_value": width}:
            what = f"embedding width {d}" if v["name"] == EMBEDDING_NAME else f"{c} classes"
            raise _Malformed(f"{v['name']} must be float32 [batch, {width}] for the {what} in the metadata")


def _check_initializers(inits: list[dict[str, Any]], c: int, d: int | None) -> None:
    names = [t.get("name", "") for t in inits]
    want = [*REFINER_KEYS, *([] if d is None else [HEAD_WEIGHT])]
    if sorted(names) != sorted(want):
        raise _Malformed(f"its initializers are {[n[:40] for n in names[:8]]}, expected exactly {want}")
    by_name = {t["name"]: t for t in inits}
    fc1 = by_name[REFINER_KEYS[0]].get("dims", [])
    h = fc1[0] if len(fc1) == 2 else 0
    if not 1 <= h <= MAX_HIDDEN:
        raise _Malformed(f"{REFINER_KEYS[0]} has dims {fc1[:4]}, expected [hidden, {c}] with hidden in 1..{MAX_HIDDEN}")
    shapes = [[h, c], [h], [c, h], [c], *([] if d is None else [[d, c]])]
    for name, dims in zip(want, shapes, strict=True):
        t = by_name[name]
        if t.get("dims", []) != dims or t.get("data_type") != FLOAT32:
            raise _Malformed(f"{name} is {t.get('dims', [])[:4]} of type {t.get('data_type')}, expected float32 "
                             f"{dims} for {c} classes and hidden {h}")
        raw, floats = t.get("raw_data"), t.get("float_data")
        if raw is not None and floats is None and len(raw) == 4 * np.prod(dims):
            values = np.frombuffer(raw, "<f4")
        elif raw is None and floats is not None and len(floats) == np.prod(dims):
            values = np.asarray(floats, np.float32)
        else:
            raise _Malformed(f"{name} must hold exactly {int(np.prod(dims))} float32 values, in raw_data or float_data")
        if not bounded(values):
            raise _Malformed(f"{name} is not finite or has huge values")


def _check_nodes(nodes: list[dict[str, Any]], pattern: tuple) -> None:
    ops = [n.get("op_type", "")[:40] for n in nodes]
    if ops != [p[0] for p in pattern]:
        raise _Malformed(f"its nodes are {ops[:8]}, expected {[p[0] for p in pattern]}")
    names = {INPUT_NAME, EMBEDDING_NAME, HEAD_WEIGHT, *OUTPUT_NAMES, *REFINER_KEYS}
    slots: dict[str, str] = {}  # "tN" -> the tensor name this file gives node N's output
    for i, (node, (op, inputs, required, optional, writes)) in enumerate(zip(nodes, pattern, strict=True)):
        if node.get("domain", "") not in DEFAULT_DOMAINS:
            raise _Malformed(f"node {i} ({op}) is in domain {node['domain'][:40]!r}; only the default domain is "
                             "allowed")
        outputs = node.get("output", [])
        new = writes.startswith("t")
        if len(outputs) != 1 or not 0 < len(outputs[0]) <= MAX_NAME_CHARS or (new and outputs[0] in names):
            raise _Malformed(f"node {i} ({op}) must write one new tensor, not {[o[:40] for o in outputs[:4]]}")
        if not new and outputs[0] != writes:  # the graph outputs are written where the pattern says
            raise _Malformed(f"node {i} ({op}) writes {outputs[0][:40]!r}, expected {writes!r}")
        wired = [slots.get(x, x) for x in inputs]
        if node.get("input", []) != wired:
            raise _Malformed(f"node {i} ({op}) reads {[x[:40] for x in node.get('input', [])[:4]]}, expected "
                             f"{wired}: the graph is not x + fc2(relu(fc1(x))) (+ the embedding head) then softmax")
        _check_attributes(node.get("attribute", []), required, optional, f"node {i} ({op})")
        names.add(outputs[0])
        slots[writes] = outputs[0]


def _check_attributes(attrs: list[dict[str, Any]], required: dict[str, tuple[int, Any]],
                      optional: dict[str, tuple[int, Any]], what: str) -> None:
    allowed = {**required, **optional}
    seen: dict[str, Any] = {}
    for a in attrs:
        name, kind = a.get("name", ""), a.get("type")
        if name not in allowed or name in seen or kind != allowed[name][0] or set(a) - {"name", "type", "f", "i",
                                                                                          "doc_string"}:
            raise _Malformed(f"{what} has an unexpected or repeated attribute {name[:40]!r}")
        value = a.get("f" if kind == FLOAT else "i")
        if value != allowed[name][1] or ("i" if kind == FLOAT else "f") in a:
            raise _Malformed(f"{what} has {name}={value!r}, expected {allowed[name][1]!r}")
        seen[name] = value
    missing = sorted(set(required) - set(seen))
    if missing:
        raise _Malformed(f"{what} lacks attributes {missing}")
