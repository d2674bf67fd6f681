"""A shipped adapter, loaded for serving: its prompt and class list, and its refiner on onnxruntime.

Both files a user can ship load here. An exported ``.onnx`` carries the adapter's metadata in its
``metadata_props`` and needs only onnxruntime; it is verified to be exactly the exported refiner graph
(:mod:`.onnx_check`) before onnxruntime reads those same bytes. A ``.safetensors`` adapter is written into the
same ONNX graph in memory (:func:`~craft_adapter.artifact.onnx_graph.build_refiner_onnx`: protobuf bytes written
directly, no ``onnx`` package, no torch), so both run on the same engine with the same numerics. onnxruntime stays
the engine because it measured faster than numpy for this refiner (``benchmarks/refiner_engine.py``). An adapter
with an embedding head (``head_dim`` set) runs a graph with a second input, the L2-normalised image embeddings its
embedding vendor returned; :meth:`ShippedAdapter.refine` refuses to run it without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from craft_adapter.artifact.adapter_file import (
    Adapter,
    AdapterError,
    check_embeddings,
    metadata_fields,
    read_adapter_bytes,
    refiner_input,
)
from craft_adapter.artifact.onnx_check import check_refiner_onnx
from craft_adapter.artifact.onnx_graph import EMBEDDING_NAME, INPUT_NAME, OUTPUT_NAMES, build_refiner_onnx
from craft_adapter.serve.session import make_session


@dataclass
class ShippedAdapter:
    """What serving needs from an adapter: class names, learned prompt, logit kind, and a refiner session."""

    class_names: list[str]
    template: str
    mode: str
    logit_kind: str
    logit_scale: float
    format_version: int
    session: ort.InferenceSession
    ctx: np.ndarray | None = None  # [n_ctx, width], soft mode only (from a .safetensors file)
    source: str = "adapter"
    head_dim: int | None = None  # the image-embedding width of the adapter's embedding head; None: no head

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def providers(self) -> list[str]:
        """The onnxruntime execution providers the refiner runs on."""
        return self.session.get_providers()

    def refine(self, scores: np.ndarray, embeddings: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Refined logits and probabilities, both ``[n, c]``, from finite vendor scores ``[n, c]`` (and, for an
        adapter with an embedding head, the L2-normalised image ``embeddings [n, d]``; ignored without one)."""
        feed = {INPUT_NAME: refiner_input(scores, self.logit_kind)}
        if self.head_dim is not None:
            feed[EMBEDDING_NAME] = check_embeddings(embeddings, len(scores), self.head_dim)
        refined, probs = self.session.run(OUTPUT_NAMES, feed)
        return refined, probs

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> ShippedAdapter:
        """Load a ``.safetensors`` adapter or an exported ``.onnx`` refiner; validate everything."""
        path = Path(path)
        if path.suffix == ".safetensors":
            adapter = Adapter.load(path)
            session = make_session(build_refiner_onnx(adapter), device)
            fields = metadata_fields(adapter.metadata(), str(path)) | {"head_dim": adapter.head_dim}
            return cls._from_fields(fields, session, adapter.ctx, str(path))
        if path.suffix != ".onnx":
            raise AdapterError(f"{path}: an adapter is a .safetensors file or an exported .onnx refiner")
        raw = read_adapter_bytes(path)
        fields = check_refiner_onnx(raw, str(path))  # onnxruntime sees only a verified refiner graph
        try:
            session = make_session(raw, device)
        except Exception as e:  # onnxruntime raises its own types for unreadable models
            raise AdapterError(f"{path}: onnxruntime cannot load it ({str(e)[:300]}); re-export with craft-adapter "
                               "export --onnx") from None
        return cls._from_fields(fields, session, None, str(path))

    @classmethod
    def _from_fields(cls, fields: dict[str, Any], session: ort.InferenceSession, ctx: np.ndarray | None,
                     source: str) -> ShippedAdapter:
        shipped = cls(class_names=list(fields["class_names"]), template=fields["template"], mode=fields["mode"],
                      logit_kind=fields["logit_kind"], logit_scale=fields["logit_scale"],
                      format_version=fields["format_version"], session=session, ctx=ctx, source=source,
                      head_dim=fields["head_dim"])
        shipped._validate()
        return shipped

    def _validate(self) -> None:
        names = self.class_names
        if not names or not all(isinstance(c, str) and c for c in names) or len(set(names)) != len(names):
            raise AdapterError(f"{self.source}: class_names must be distinct non-empty strings")
        if self.template.count("{}") != 1:
            raise AdapterError(f"{self.source}: prompt template must contain exactly one '{{}}': {self.template!r}")
        if self.mode not in ("soft", "text"):
            raise AdapterError(f"{self.source}: unknown mode {self.mode!r}")
        refiner_input(np.zeros(1), self.logit_kind)  # raises on an unknown kind
        inputs, outputs = self.session.get_inputs(), [o.name for o in self.session.get_outputs()]
        want = [INPUT_NAME] if self.head_dim is None else [INPUT_NAME, EMBEDDING_NAME]
        if [i.name for i in inputs] != want or not set(OUTPUT_NAMES) <= set(outputs):
            raise AdapterError(f"{self.source}: the refiner graph must take {want} and give "
                               f"{list(OUTPUT_NAMES)}; re-export with craft-adapter export --onnx")
        if self.head_dim is not None and inputs[1].shape[-1] != self.head_dim:
            raise AdapterError(f"{self.source}: the graph's {EMBEDDING_NAME} is {inputs[1].shape[-1]} wide but the "
                               f"metadata's head reads {self.head_dim}; the file is inconsistent, re-export it")
        width = inputs[0].shape[-1]
        if width != self.n_classes:
            raise AdapterError(f"{self.source}: the refiner takes {width} scores but the metadata lists "
                               f"{self.n_classes} classes; the file is inconsistent, re-export it")
