"""Refiner -> ONNX with a parity check against the torch refiner (needs torch; the runtime does not)."""

from craft_adapter.export.onnx_export import (
           DEFAULT_OPSET,
           PARITY_ATOL,
           PARITY_BATCHES,
           ExportError,
           ExportReport,
           RefinerWithSoftmax,
           check_parity,
           export_onnx,
           trace_refiner,
)

__all__ = ["DEFAULT_OPSET", "PARITY_ATOL", "PARITY_BATCHES", "ExportError", "ExportReport", "RefinerWithSoftmax",
           "check_parity", "export_onnx", "trace_refiner"]
