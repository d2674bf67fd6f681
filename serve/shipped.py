"""A shipped adapter, loaded for serving: its prompt and class list, and its refiner on onnxruntime.

Both files a user can ship load here. An exported ``.onnx`` carries the adapter's metadata in its
``metadata_props`` and needs only onnxruntime. A ``.safetensors`` adapter is built into the same ONNX graph
in memory (``onnx.helper``, no torch), so both run on the same engine with the same numerics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from craft_adapter.artifact import FORMAT_VERSION, MAX_FILE_BYTES, METADATA_KEY, Adapter, AdapterError, refiner_input

from .onnx_graph import INPUT_NAME, OUTPUT_NAMES, build_refiner_onnx
from .session import make_session


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

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def providers(self) -> list[str]:
        """The onnxruntime execution providers the refiner runs on."""
        return self.session.get_providers()

    def refine(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Refined logits and probabilities, both ``[n, c]``, from finite vendor scores ``[n, c]``."""
        refined, probs = self.session.run(OUTPUT_NAMES, {INPUT_NAME: refiner_input(scores, self.logit_kind)})
        return refined, probs

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> ShippedAdapter:
        """Load a ``.safetensors`` adapter or an exported ``.onnx`` refiner; validate everything."""
        path = Path(path)
        if path.suffix == ".safetensors":
            adapter = Adapter.load(path)
            session = make_session(build_refiner_onnx(adapter), device)
            return cls._from_metadata(adapter.metadata(), session, adapter.ctx, str(path))
        if path.suffix != ".onnx":
            raise AdapterError(f"{path}: an adapter is a .safetensors file or an exported .onnx refiner")
        if not path.is_file():
            raise AdapterError(f"adapter file {path} does not exist")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise AdapterError(f"{path} is over the {MAX_FILE_BYTES}-byte limit for an adapter")
        try:
            session = make_session(str(path), device)
        except Exception as e:  # onnxruntime raises its own types for unreadable models
            raise AdapterError(f"{path}: onnxruntime cannot load it ({e}); re-export with craft-adapter export "
                               "--onnx") from None
        raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if raw is None:
            raise AdapterError(f"{path}: no {METADATA_KEY} metadata; export it with craft-adapter export --onnx")
        try:
            meta = json.loads(raw)
        except ValueError:
            raise AdapterError(f"{path}: its {METADATA_KEY} metadata is not valid JSON") from None
        return cls._from_metadata(meta, session, None, str(path))

    @classmethod
    def _from_metadata(cls, meta: Any, session: ort.InferenceSession, ctx: np.ndarray | None,
                       source: str) -> ShippedAdapter:
        if not isinstance(meta, dict) or not isinstance(meta.get("format_version"), int):
            raise AdapterError(f"{source}: metadata has no integer format_version")
        version = meta["format_version"]
        if version > FORMAT_VERSION:
            raise AdapterError(f"{source}: adapter format_version {version} is newer than this craft-adapter "
                               f"reads ({FORMAT_VERSION}); upgrade craft-adapter")
        try:
            shipped = cls(class_names=list(meta["class_names"]), template=str(meta["prompt"]["template"]),
                          mode=str(meta["mode"]), logit_kind=str(meta["logits"]["kind"]),
                          logit_scale=float(meta["logits"]["scale"]), format_version=version,
                          session=session, ctx=ctx, source=source)
        except (KeyError, TypeError, ValueError) as e:
            raise AdapterError(f"{source}: metadata is missing or has a malformed field ({e})") from None
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
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or not set(OUTPUT_NAMES) <= set(outputs):
            raise AdapterError(f"{self.source}: the refiner graph must take {INPUT_NAME!r} and give "
                               f"{list(OUTPUT_NAMES)}; re-export with craft-adapter export --onnx")
        width = inputs[0].shape[-1]
        if width != self.n_classes:
            raise AdapterError(f"{self.source}: the refiner takes {width} scores but the metadata lists "
                               f"{self.n_classes} classes; the file is inconsistent, re-export it")
