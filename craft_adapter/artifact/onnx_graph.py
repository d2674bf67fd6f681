"""The refiner as an ONNX graph: its interface, its metadata, and a builder that needs no ``onnx`` package.

The exporter (``craft_adapter.export``) traces the torch refiner; this builder writes the same graph so a
``.safetensors`` adapter runs on onnxruntime too, with the same numerics as an exported ``.onnx``. Both share the
names and the ``metadata_props`` defined here.

The builder writes the protobuf wire format itself, for exactly this graph: the runtime must load either adapter
file kind with numpy, safetensors and onnxruntime only, and the ``onnx`` package (with its protobuf stack) is a
fit-and-export dependency. Its bytes are those ``onnx.helper`` writes for the same graph (fields in field-number
order, proto2 presence as ``helper`` sets it); a test compares them byte for byte, and the strict reader
(:mod:`.onnx_check`) accepts them.
"""

from __future__ import annotations

import json

import numpy as np

from craft_adapter.artifact.adapter_file import METADATA_KEY, REFINER_KEYS, Adapter

OPSET = 18
IR_VERSION = 9  # onnxruntime >= 1.15 reads it; newer IR versions would shut out older deployments
INPUT_NAME = "refiner_input"  # [batch, n_classes]: refiner_input(vendor scores, logit kind)
EMBEDDING_NAME = "image_embedding"  # [batch, d]: the L2-normalised image embedding (adapters with a head only)
HEAD_WEIGHT = "head.weight"  # [d, n_classes] initializer: (logit_scale * head.delta)^T, so the head is one MatMul
OUTPUT_NAMES = ("refined_logits", "probabilities")  # both [batch, n_classes]
BATCH_DIM = "batch"
PRODUCER = "craft-adapter"
GRAPH_NAME = "craft_refiner"
_FLOAT32 = 1  # TensorProto.FLOAT
_ATTR_INT = 2  # AttributeProto.INT
_VARINT, _LEN = 0, 2  # protobuf wire types


def metadata_props(adapter: Adapter) -> dict[str, str]:
    """The ``metadata_props`` that make a refiner ``.onnx`` self-describing.

    ``craft_adapter`` holds the adapter's full JSON metadata (the same as in the ``.safetensors``); the
    other keys repeat the essentials flat, for people and for tools that do not parse JSON.
    """
    meta = adapter.metadata()
    return {
        METADATA_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False),
        "format_version": str(adapter.format_version),
        "class_names": json.dumps(adapter.class_names),
        "prompt_template": adapter.template,
        "mode": adapter.mode,
        "logit_kind": adapter.logit_kind,
        "logit_scale": repr(float(adapter.logit_scale)),
        "refiner_input": meta["logits"]["refiner_input"],
        "io": json.dumps({"input": INPUT_NAME, "outputs": list(OUTPUT_NAMES)} if adapter.head is None else
                         {"input": INPUT_NAME, "embedding_input": EMBEDDING_NAME, "outputs": list(OUTPUT_NAMES)}),
    }


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 values go out as ten bytes, two's complement
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3 | _VARINT) + _varint(value)


def _bytes(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | _LEN) + _varint(len(payload)) + payload


def _str(field: int, text: str) -> bytes:
    return _bytes(field, text.encode("utf-8"))


def _node(op: str, inputs: list[str], outputs: list[str], **ints: int) -> bytes:
    """NodeProto: input(1), output(2), op_type(4), attribute(5) (int attributes, sorted by name like ``helper``)."""
    attrs = [_bytes(5, _str(1, k) + _int(3, v) + _int(20, _ATTR_INT)) for k, v in sorted(ints.items())]
    return b"".join([*(_str(1, x) for x in inputs), *(_str(2, y) for y in outputs), _str(4, op), *attrs])


def _tensor(name: str, array: np.ndarray) -> bytes:
    """TensorProto: dims(1), data_type(2), name(8), raw_data(9), little-endian float32."""
    data = np.ascontiguousarray(array, dtype="<f4")
    return b"".join([*(_int(1, d) for d in data.shape), _int(2, _FLOAT32), _str(8, name), _bytes(9, data.tobytes())])


def _value_info(name: str, width: int) -> bytes:
    """ValueInfoProto of a float32 ``[batch, width]`` tensor."""
    shape = _bytes(1, _str(2, BATCH_DIM)) + _bytes(1, _int(1, width))  # dim_param, then dim_value
    return _str(1, name) + _bytes(2, _bytes(1, _int(1, _FLOAT32) + _bytes(2, shape)))


def build_refiner_onnx(adapter: Adapter, metadata: dict[str, str] | None = None) -> bytes:
    """The adapter's refiner as serialised ONNX: ``x + fc2(relu(fc1(x)))`` and its softmax, batch dynamic; with an
    embedding head, ``+ image_embedding @ head.weight`` before the softmax (a second input)."""
    fc1_w, fc1_b, fc2_w, fc2_b = REFINER_KEYS
    head = adapter.head is not None
    nodes = [  # Gemm with transB=1 is what torch exports for nn.Linear
        _node("Gemm", [INPUT_NAME, fc1_w, fc1_b], ["hidden"], transB=1),
        _node("Relu", ["hidden"], ["hidden_relu"]),
        _node("Gemm", ["hidden_relu", fc2_w, fc2_b], ["delta"], transB=1),
        _node("Add", [INPUT_NAME, "delta"], ["refined_base" if head else OUTPUT_NAMES[0]]),
        *([_node("MatMul", [EMBEDDING_NAME, HEAD_WEIGHT], ["head_logits"]),
           _node("Add", ["refined_base", "head_logits"], [OUTPUT_NAMES[0]])] if head else []),
        _node("Softmax", [OUTPUT_NAMES[0]], [OUTPUT_NAMES[1]], axis=-1),
    ]
    inits = [_tensor(k, adapter.refiner[k]) for k in REFINER_KEYS]
    inputs = [_value_info(INPUT_NAME, adapter.n_classes)]
    if head:
        inits.append(_tensor(HEAD_WEIGHT, adapter.head_weight().T))
        inputs.append(_value_info(EMBEDDING_NAME, adapter.head_dim))
    graph = b"".join([
        *(_bytes(1, n) for n in nodes), _str(2, GRAPH_NAME), *(_bytes(5, t) for t in inits),
        *(_bytes(11, v) for v in inputs), *(_bytes(12, _value_info(name, adapter.n_classes)) for name in OUTPUT_NAMES),
    ])
    props = metadata_props(adapter) if metadata is None else metadata
    return b"".join([
        _int(1, IR_VERSION), _str(2, PRODUCER), _bytes(7, graph),
        _bytes(8, _str(1, "") + _int(2, OPSET)),  # the default domain, set explicitly as helper.make_opsetid does
        *(_bytes(14, _str(1, k) + _str(2, v)) for k, v in props.items()),
    ])
