"""The adapter file: one ``.safetensors`` holding the refiner, the learned prompt and JSON metadata.

Tensors are data only (safetensors, no pickle). Metadata is JSON under the ``craft_adapter`` key of the
safetensors string map. This module needs numpy and safetensors only, so the torch-free runtime uses it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

FORMAT_VERSION = 1
METADATA_KEY = "craft_adapter"
MAX_FILE_BYTES = 64 << 20  # a 10,000-class refiner is about 20 MB
MAX_HEADER_BYTES = 1 << 20
LOG_FLOOR = np.float32(1e-12)
REFINER_KEYS = ("refiner.fc1.weight", "refiner.fc1.bias", "refiner.fc2.weight", "refiner.fc2.bias")
CTX_KEY = "prompt.ctx"

Mode = Literal["soft", "text"]
LogitKind = Literal["logits", "probabilities"]


class AdapterError(ValueError):
    """An adapter file is missing, malformed, or does not match what it is used with."""


def refiner_input(scores: np.ndarray, kind: str) -> np.ndarray:
    """What the refiner sees: raw logits as they are, probabilities as ``log(max(p, 1e-12))``, float32."""
    scores = np.asarray(scores, dtype=np.float32)
    if kind == "logits":
        return scores
    if kind == "probabilities":
        return np.log(np.maximum(scores, LOG_FLOOR))
    raise AdapterError(f"unknown logit kind {kind!r}; expected 'logits' or 'probabilities'")


@dataclass
class Adapter:
    """A fitted adapter: everything the runtime needs to repeat the fit's predictions."""

    class_names: list[str]
    template: str  # sent to the vendor, "{}" marks the class name
    mode: Mode
    logit_kind: LogitKind
    logit_scale: float
    refiner: dict[str, np.ndarray]  # REFINER_KEYS -> float32 arrays
    backend: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    ctx: np.ndarray | None = None  # [n_ctx, width], soft mode only
    prompt_reading: str = ""  # nearest-token reading of ctx, for people
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.validate()

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def hidden(self) -> int:
        """Hidden width of the refiner."""
        return int(self.refiner["refiner.fc1.weight"].shape[0])

    def validate(self) -> None:
        """Check every field against the others; raise :class:`AdapterError` naming the problem."""
        if self.format_version > FORMAT_VERSION:
            raise AdapterError(f"adapter format_version {self.format_version} is newer than this craft-adapter "
                               f"reads ({FORMAT_VERSION}); upgrade craft-adapter")
        if self.format_version < 1:
            raise AdapterError(f"invalid format_version {self.format_version}")
        names = self.class_names
        if not isinstance(names, list) or not names or not all(isinstance(c, str) and c for c in names):
            raise AdapterError("class_names must be a non-empty list of non-empty strings")
        if len(set(names)) != len(names):
            raise AdapterError("class_names contains duplicates")
        if not isinstance(self.template, str) or self.template.count("{}") != 1:
            raise AdapterError(f"prompt template must contain exactly one '{{}}': {self.template!r}")
        if self.mode not in ("soft", "text"):
            raise AdapterError(f"unknown mode {self.mode!r}")
        refiner_input(np.zeros(1), self.logit_kind)
        if not np.isfinite(self.logit_scale):
            raise AdapterError("logit_scale is not finite")
        missing = [k for k in REFINER_KEYS if k not in self.refiner]
        if missing:
            raise AdapterError(f"adapter is missing refiner tensors {missing}")
        c, h = self.n_classes, self.refiner["refiner.fc1.weight"].shape[0]
        want = {"refiner.fc1.weight": (h, c), "refiner.fc1.bias": (h,),
                "refiner.fc2.weight": (c, h), "refiner.fc2.bias": (c,)}
        for k, shape in want.items():
            t = self.refiner[k]
            if t.shape != shape:
                raise AdapterError(f"tensor {k} has shape {tuple(t.shape)}, expected {shape} "
                                   f"for {c} classes and hidden {h}")
            if t.dtype != np.float32 or not np.isfinite(t).all():
                raise AdapterError(f"tensor {k} must be finite float32")
        if self.mode == "soft":
            if self.ctx is None or self.ctx.ndim != 2 or self.ctx.dtype != np.float32:
                raise AdapterError("a soft-mode adapter needs a float32 prompt.ctx tensor [n_ctx, width]")
            if not np.isfinite(self.ctx).all():
                raise AdapterError("prompt.ctx is not finite")

    def metadata(self) -> dict[str, Any]:
        """The JSON metadata stored in the file."""
        return {
            "format_version": self.format_version, "mode": self.mode, "class_names": self.class_names,
            "prompt": {"template": self.template, "learned_reading": self.prompt_reading},
            "logits": {"kind": self.logit_kind, "scale": self.logit_scale,
                       "refiner_input": "raw logits" if self.logit_kind == "logits" else "log(max(p, 1e-12))"},
            "refiner": {"hidden": self.hidden, "activation": "relu", "residual": True},
            "backend": self.backend, "fit": self.fit,
        }

    def to_bytes(self) -> bytes:
        """Serialise deterministically: same adapter, same bytes."""
        tensors = {k: np.ascontiguousarray(v) for k, v in self.refiner.items()}
        if self.ctx is not None:
            tensors[CTX_KEY] = np.ascontiguousarray(self.ctx)
        meta = json.dumps(self.metadata(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return st_save(tensors, metadata={METADATA_KEY: meta})

    def save(self, path: str | Path) -> Path:
        """Write the adapter atomically to ``path``."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)
        return path

    def refine(self, scores: np.ndarray) -> np.ndarray:
        """Refined logits ``[n, c]`` from vendor scores ``[n, c]`` with numpy (the reference forward)."""
        x = refiner_input(scores, self.logit_kind)
        r = self.refiner
        h = np.maximum(x @ r["refiner.fc1.weight"].T + r["refiner.fc1.bias"], 0)
        return x + h @ r["refiner.fc2.weight"].T + r["refiner.fc2.bias"]

    @classmethod
    def from_bytes(cls, raw: bytes, source: str = "adapter") -> Adapter:
        """Parse and validate an adapter from bytes."""
        meta = _read_metadata(raw, source)
        try:
            tensors = st_load(raw)
        except Exception as e:  # safetensors raises its own error types for corrupt payloads
            raise AdapterError(f"{source}: corrupt tensor data ({e})") from None
        try:
            prompt, logits = meta["prompt"], meta["logits"]
            adapter = cls(
                class_names=meta["class_names"], template=prompt["template"], mode=meta["mode"],
                logit_kind=logits["kind"], logit_scale=float(logits["scale"]),
                refiner={k: tensors[k] for k in REFINER_KEYS if k in tensors},
                backend=dict(meta.get("backend", {})), fit=dict(meta.get("fit", {})),
                ctx=tensors.get(CTX_KEY), prompt_reading=str(prompt.get("learned_reading", "")),
                format_version=int(meta["format_version"]),
            )
        except (KeyError, TypeError) as e:
            raise AdapterError(f"{source}: metadata is missing or has a malformed field ({e})") from None
        extra = set(tensors) - set(REFINER_KEYS) - {CTX_KEY}
        if extra:
            raise AdapterError(f"{source}: unexpected tensors {sorted(extra)}")
        return adapter

    @classmethod
    def load(cls, path: str | Path) -> Adapter:
        """Read and validate an adapter file."""
        path = Path(path)
        if not path.is_file():
            raise AdapterError(f"adapter file {path} does not exist")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise AdapterError(f"{path} is {size} bytes, over the {MAX_FILE_BYTES}-byte limit for an adapter")
        return cls.from_bytes(path.read_bytes(), str(path))


def _read_metadata(raw: bytes, source: str) -> dict[str, Any]:
    """The craft_adapter JSON from a safetensors header, read before any tensor is touched."""
    if len(raw) < 8:
        raise AdapterError(f"{source}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES or n > len(raw) - 8:
        raise AdapterError(f"{source}: safetensors header length {n} is invalid or over the limit")
    try:
        header = json.loads(raw[8:8 + n])
        meta = json.loads(header["__metadata__"][METADATA_KEY])
    except (ValueError, KeyError, TypeError):
        raise AdapterError(f"{source}: no craft_adapter metadata; is this an adapter file?") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{source}: craft_adapter metadata is not a JSON object")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise AdapterError(f"{source}: metadata has no integer format_version")
    if version > FORMAT_VERSION:
        raise AdapterError(f"{source}: adapter format_version {version} is newer than this craft-adapter "
                           f"reads ({FORMAT_VERSION}); upgrade craft-adapter")
    return meta
