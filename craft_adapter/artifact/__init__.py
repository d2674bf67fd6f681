"""The adapter file format and its checks: safetensors with JSON metadata, the ONNX refiner graph, no pickle.

The lowest layer: it imports nothing else of craft_adapter, so the runtime, the server and training all read
and write adapters through the same code.
"""

from craft_adapter.artifact.adapter_file import Adapter, AdapterError

__all__ = ["Adapter", "AdapterError"]
