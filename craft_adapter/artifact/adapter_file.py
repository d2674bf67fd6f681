"""The adapter file: one ``.safetensors`` holding the refiner, the learned prompt and JSON metadata.

Tensors are data only (safetensors, no pickle). Metadata is JSON under the ``craft_adapter`` key of the
safetensors string map. This module needs numpy and safetensors only, so the torch-free runtime uses it.

Adapter files travel between teams, so loading trusts nothing: the file size, the safetensors header (its
length, JSON, nesting, tensor table, dtypes, shapes against the class count, and data offsets) and the metadata
(types and sizes) are all checked before ``safetensors`` allocates a single tensor. Every failure is an
:class:`AdapterError` naming the problem. Those checks, the limits and the format's fixed names live in
:mod:`craft_adapter.artifact.checks`; this module re-exports them, so importers need only ``artifact``.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from craft_adapter.artifact.checks import (
    CTX_KEY,
    FORMAT_VERSION,
    HEAD_KEY,
    HEAD_META_KEY,
    MAX_ABS_VALUE,
    MAX_CLASSES,
    MAX_CTX_TOKENS,
    MAX_CTX_WIDTH,
    MAX_EMBED_DIM,
    MAX_FILE_BYTES,
    MAX_HEADER_BYTES,
    MAX_HIDDEN,
    MAX_JSON_DEPTH,
    MAX_METADATA_BYTES,
    MAX_METADATA_ENTRIES,
    MAX_TENSORS,
    MAX_TEXT_CHARS,
    METADATA_KEY,
    REFINER_KEYS,
    TENSOR_KEYS,
    AdapterError,
    TensorEntry,
    bounded,
    check_embeddings,
    check_tensor_table,
    head_dim,
    metadata_fields,
    parse_json,
    read_adapter_bytes,
    read_header,
)

__all__ = [  # the checks' names are re-exported: modules import them from here
    "CTX_KEY", "FORMAT_VERSION", "HEAD_KEY", "HEAD_META_KEY", "LOG_FLOOR", "MAX_ABS_VALUE", "MAX_CLASSES",
    "MAX_CTX_TOKENS", "MAX_CTX_WIDTH", "MAX_EMBED_DIM", "MAX_FILE_BYTES", "MAX_HEADER_BYTES", "MAX_HIDDEN",
    "MAX_JSON_DEPTH", "MAX_METADATA_BYTES", "MAX_METADATA_ENTRIES", "MAX_TENSORS", "MAX_TEXT_CHARS", "METADATA_KEY",
    "REFINER_KEYS", "TENSOR_KEYS", "Adapter", "AdapterError", "AdapterWriteError", "LOGIT_KINDS", "LogitKind", "Mode",
    "TensorEntry", "bounded", "check_embeddings", "check_tensor_table", "check_writable", "head_dim",
    "metadata_fields", "parse_json", "read_adapter_bytes", "read_header", "refiner_input",
]

LOG_FLOOR = np.float32(1e-12)


class AdapterWriteError(OSError):
    """An adapter file could not be written (full disk, read-only folder); nothing partial is left behind."""


def _temporary(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def check_writable(path: str | Path) -> None:
    """Raise :class:`AdapterWriteError` unless a file can be created beside ``path`` (before anything is paid)."""
    path = Path(path)
    probe = _temporary(path)
    try:
        with open(probe, "xb"):
            pass
        probe.unlink()
    except FileExistsError:
        raise AdapterWriteError(f"{probe} exists (left by another write?); remove it, or write elsewhere") from None
    except OSError as e:
        raise AdapterWriteError(f"cannot write to {path.parent} ({e.strerror or e}); fix the folder's "
                                "permissions or choose another output path") from None

Mode = Literal["soft", "text"]
# what the vendor's scores are: raw logits, a softmax over the classes ("probabilities", summing to 1), or one
# sigmoid per class ("independent_probabilities", SigLIP-style). Recorded at fit; the runtime and the server accept
# only a vendor of the same kind. Adapters written before the third kind existed read unchanged.
LogitKind = Literal["logits", "probabilities", "independent_probabilities"]
LOGIT_KINDS = ("logits", "probabilities", "independent_probabilities")


def refiner_input(scores: np.ndarray, kind: str) -> np.ndarray:
    """What the refiner sees: raw logits as they are, probabilities of either kind as ``log(max(p, 1e-12))``."""
    scores = np.asarray(scores, dtype=np.float32)
    if kind == "logits":
        return scores
    if kind in ("probabilities", "independent_probabilities"):
        return np.log(np.maximum(scores, LOG_FLOOR))
    raise AdapterError(f"unknown logit kind {str(kind)[:40]!r}; expected one of {list(LOGIT_KINDS)}")


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
    head: np.ndarray | None = None  # [c, d] float32: the embedding-access head's delta, if the fit learned one

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
        if len(names) > MAX_CLASSES:
            raise AdapterError(f"{len(names)} classes, over the limit of {MAX_CLASSES}")
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
        if not 1 <= h <= MAX_HIDDEN:
            raise AdapterError(f"refiner hidden width {h} is outside 1..{MAX_HIDDEN}")
        want = {"refiner.fc1.weight": (h, c), "refiner.fc1.bias": (h,),
                "refiner.fc2.weight": (c, h), "refiner.fc2.bias": (c,)}
        for k, shape in want.items():
            t = self.refiner[k]
            if t.shape != shape:
                raise AdapterError(f"tensor {k} has shape {tuple(t.shape)}, expected {shape} "
                                   f"for {c} classes and hidden {h}")
            if t.dtype != np.float32 or not bounded(t):
                raise AdapterError(f"tensor {k} must be finite float32 with |values| <= {MAX_ABS_VALUE:g}")
        if self.mode == "soft" and (self.ctx is None or self.ctx.ndim != 2 or self.ctx.dtype != np.float32):
            raise AdapterError("a soft-mode adapter needs a float32 prompt.ctx tensor [n_ctx, width]")
        if self.ctx is not None and not bounded(self.ctx):
            raise AdapterError(f"prompt.ctx is not finite or has |values| > {MAX_ABS_VALUE:g}")
        if self.head is not None:
            self._validate_head()

    def _validate_head(self) -> None:
        head, c = self.head, self.n_classes
        if not isinstance(head, np.ndarray) or head.dtype != np.float32 or head.ndim != 2:
            raise AdapterError(f"{HEAD_KEY} must be a 2-D float32 array [classes, embedding width]")
        if head.shape[0] != c or not 1 <= head.shape[1] <= MAX_EMBED_DIM:
            raise AdapterError(f"{HEAD_KEY} has shape {head.shape}, expected ({c}, d) for {c} classes and d in "
                               f"1..{MAX_EMBED_DIM}")
        if not bounded(head) or not bounded(self.head_weight()):
            raise AdapterError(f"{HEAD_KEY} is not finite or has |values| (times the logit scale) > {MAX_ABS_VALUE:g}")
        if self.logit_kind != "logits":  # the head reads embeddings, which only an embedding vendor returns
            raise AdapterError(f"an embedding head needs an adapter fitted on vendor logits (an embedding vendor), "
                               f"not {self.logit_kind}")

    @property
    def head_dim(self) -> int | None:
        """The image-embedding width the head reads, or None for an adapter without a head."""
        return None if self.head is None else int(self.head.shape[1])

    def head_weight(self) -> np.ndarray:
        """The head in logit units, ``logit_scale * delta`` ``[c, d]`` float32: what every forward multiplies by."""
        return np.float32(self.logit_scale) * self.head

    def metadata(self) -> dict[str, Any]:
        """The JSON metadata stored in the file."""
        return {
            "format_version": self.format_version, "mode": self.mode, "class_names": self.class_names,
            "prompt": {"template": self.template, "learned_reading": self.prompt_reading},
            "logits": {"kind": self.logit_kind, "scale": self.logit_scale,
                       "refiner_input": "raw logits" if self.logit_kind == "logits" else "log(max(p, 1e-12))"},
            "refiner": {"hidden": self.hidden, "activation": "relu", "residual": True},
            "backend": self.backend, "fit": self.fit,
        } | ({} if self.head is None else {HEAD_META_KEY: {
            "dim": self.head_dim, "input": "the L2-normalised image embedding [n, dim]",
            "refined": "refiner(x) + logit_scale * embedding @ head.delta^T"}})

    def to_bytes(self) -> bytes:
        """Serialise deterministically: same adapter, same bytes."""
        tensors = {k: np.ascontiguousarray(v) for k, v in self.refiner.items()}
        if self.ctx is not None:
            tensors[CTX_KEY] = np.ascontiguousarray(self.ctx)
        if self.head is not None:
            tensors[HEAD_KEY] = np.ascontiguousarray(self.head)
        meta = json.dumps(self.metadata(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return st_save(tensors, metadata={METADATA_KEY: meta})

    def save(self, path: str | Path) -> Path:
        """Write the adapter atomically to ``path``: whole, or not at all (:class:`AdapterWriteError`)."""
        path = Path(path)
        tmp = _temporary(path)
        data = self.to_bytes()
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise AdapterWriteError(f"cannot write the adapter to {path} ({e.strerror or e}); free some space or "
                                    "choose another output path") from None
        return path

    def refine(self, scores: np.ndarray, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Refined logits ``[n, c]`` from vendor scores ``[n, c]`` with numpy (the reference forward); an adapter
        with an embedding head also needs the L2-normalised image ``embeddings [n, d]`` the vendor returned."""
        x = refiner_input(scores, self.logit_kind)
        r = self.refiner
        h = np.maximum(x @ r["refiner.fc1.weight"].T + r["refiner.fc1.bias"], 0)
        refined = x + h @ r["refiner.fc2.weight"].T + r["refiner.fc2.bias"]
        if self.head is None:
            return refined
        e = check_embeddings(embeddings, len(x), self.head_dim)
        return refined + e @ self.head_weight().T

    @classmethod
    def from_bytes(cls, raw: bytes, source: str = "adapter") -> Adapter:
        """Parse and validate an adapter from bytes; every check before allocation comes first."""
        if len(raw) > MAX_FILE_BYTES:
            raise AdapterError(f"{source} is {len(raw)} bytes, over the {MAX_FILE_BYTES}-byte limit for an adapter")
        meta_map, table = read_header(raw, source)
        meta = parse_json(meta_map[METADATA_KEY], "craft_adapter metadata", source)
        fields = metadata_fields(meta, source)
        check_tensor_table(table, len(fields["class_names"]), source)
        try:
            tensors = st_load(raw)
        except Exception as e:  # safetensors raises its own error types for corrupt payloads
            raise AdapterError(f"{source}: corrupt tensor data ({e})") from None
        got = {k: (v.dtype, v.shape) for k, v in tensors.items()}
        if got != {k: (np.dtype(np.float32), t.shape) for k, t in table.items()}:  # never expected: belt and braces
            raise AdapterError(f"{source}: safetensors read {got}, which disagrees with the checked header")
        recorded, head = head_dim(meta, source), tensors.get(HEAD_KEY)
        if recorded != (None if head is None else head.shape[1]):
            raise AdapterError(f"{source}: the metadata's {HEAD_META_KEY} ({recorded}) disagrees with the "
                               f"{HEAD_KEY} tensor ({None if head is None else head.shape}); the file is inconsistent")
        return cls(refiner={k: tensors[k] for k in REFINER_KEYS}, ctx=tensors.get(CTX_KEY), head=head, **fields)

    @classmethod
    def load(cls, path: str | Path) -> Adapter:
        """Read and validate an adapter file."""
        path = Path(path)
        return cls.from_bytes(read_adapter_bytes(path), str(path))
