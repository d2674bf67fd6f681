"""The refiner as an ONNX graph: its interface, its metadata, and a torch-free builder.

The exporter (``craft_adapter.export``) traces the torch refiner; this builder writes the same graph with
``onnx.helper`` so a ``.safetensors`` adapter runs on onnxruntime too, with the same numerics as an exported
``.onnx``. Both share the names and the ``metadata_props`` defined here.
"""

from __future__ import annotations

import json

import numpy as np

from craft_adapter.artifact.adapter_file import METADATA_KEY, Adapter

OPSET = 18
IR_VERSION = 9  # onnxruntime >= 1.15 reads it; newer IR versions would shut out older deployments
INPUT_NAME = "refiner_input"  # [batch, n_classes]: refiner_input(vendor scores, logit kind)
OUTPUT_NAMES = ("refined_logits", "probabilities")  # both [batch, n_classes]
BATCH_DIM = "batch"


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
        "io": json.dumps({"input": INPUT_NAME, "outputs": list(OUTPUT_NAMES)}),
    }


def build_refiner_onnx(adapter: Adapter, metadata: dict[str, str] | None = None) -> bytes:
    """The adapter's refiner as serialised ONNX: ``x + fc2(relu(fc1(x)))`` and its softmax, batch dynamic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    r = adapter.refiner
    c = adapter.n_classes
    inits = [numpy_helper.from_array(np.ascontiguousarray(r[k]), k) for k in
             ("refiner.fc1.weight", "refiner.fc1.bias", "refiner.fc2.weight", "refiner.fc2.bias")]
    nodes = [  # Gemm with transB=1 is what torch exports for nn.Linear
        helper.make_node("Gemm", [INPUT_NAME, "refiner.fc1.weight", "refiner.fc1.bias"], ["hidden"], transB=1),
        helper.make_node("Relu", ["hidden"], ["hidden_relu"]),
        helper.make_node("Gemm", ["hidden_relu", "refiner.fc2.weight", "refiner.fc2.bias"], ["delta"], transB=1),
        helper.make_node("Add", [INPUT_NAME, "delta"], [OUTPUT_NAMES[0]]),
        helper.make_node("Softmax", [OUTPUT_NAMES[0]], [OUTPUT_NAMES[1]], axis=-1),
    ]
    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH_DIM, c])
          for name in (INPUT_NAME, *OUTPUT_NAMES)]
    graph = helper.make_graph(nodes, "craft_refiner", io[:1], io[1:], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="craft-adapter", ir_version=IR_VERSION)
    helper.set_model_props(model, metadata_props(adapter) if metadata is None else metadata)
    onnx.checker.check_model(model)
    return model.SerializeToString()
