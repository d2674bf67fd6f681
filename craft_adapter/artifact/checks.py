"""Safe reading of adapter files that come from elsewhere: nothing in a file is trusted until it is checked.

A hostile or damaged ``.safetensors`` could exhaust memory (a huge file, header, JSON string or tensor shape), crash the
parser (JSON nested thousands deep, numbers too large for a float, NaN, lone surrogates, duplicate keys), or make
``safetensors`` allocate or read out of bounds (wrong dtypes, shapes that disagree with the class count, overlapping,
gapped or truncated data offsets). Every limit and check on those files lives here and runs before a single tensor is
allocated; each failure is an :class:`AdapterError` naming the problem. ``serve/onnx_check.py`` uses the same JSON,
metadata and value checks for ``.onnx`` refiners. The format's fixed names (version, metadata key, tensor names) are
here too, since the checks need them; :mod:`craft_adapter.artifact.adapter_file` re-exports all of it.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# the format's fixed names (described in craft_adapter.artifact.adapter_file, which re-exports them)
FORMAT_VERSION = 1
METADATA_KEY = "craft_adapter"
REFINER_KEYS = ("refiner.fc1.weight", "refiner.fc1.bias", "refiner.fc2.weight", "refiner.fc2.bias")
CTX_KEY = "prompt.ctx"
HEAD_KEY = "head.delta"  # [c, d]: the optional embedding-access head (craft_adapter.training.embedding_head)
HEAD_META_KEY = "embedding_head"  # its entry in the metadata, present exactly when the tensor is
TENSOR_KEYS = (*REFINER_KEYS, CTX_KEY, HEAD_KEY)
MAX_TENSORS = len(TENSOR_KEYS)

# limits on what a file may hold
MAX_FILE_BYTES = 64 << 20  # a 10,000-class refiner is about 20 MB
MAX_HEADER_BYTES = 1 << 20  # the safetensors JSON header as a whole
MAX_METADATA_BYTES = 768 << 10  # the craft_adapter JSON string (20,000 class names fit)
MAX_METADATA_ENTRIES = 16  # keys in the safetensors __metadata__ map or the ONNX metadata_props
MAX_JSON_DEPTH = 32  # nested objects/arrays in any JSON read from a file
MAX_CLASSES = 20_000
MAX_HIDDEN = 8192  # refiner hidden width
MAX_CTX_TOKENS = 77  # CLIP's context length
MAX_CTX_WIDTH = 8192
MAX_EMBED_DIM = 8192  # the head's image-embedding width (CLIP ViT-B: 512, ViT-L: 768, the largest: 1,024-4,096)
MAX_TEXT_CHARS = 1000  # one class name, the template, the learned reading
MAX_ABS_VALUE = 1e4  # refiner weights and prompt.ctx; trained values are far below, and outputs stay finite


class AdapterError(ValueError):
    """An adapter file is missing, malformed, or does not match what it is used with."""


def read_adapter_bytes(path: Path) -> bytes:
    """The bytes of an adapter file; a missing, non-regular or oversized file is refused before it is read."""
    if not path.exists():
        raise AdapterError(f"adapter file {path} does not exist")
    if not path.is_file():
        raise AdapterError(f"{path} is not a regular file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise AdapterError(f"{path} is {size} bytes, over the {MAX_FILE_BYTES}-byte limit for an adapter")
    with path.open("rb") as f:
        raw = f.read(MAX_FILE_BYTES + 1)  # the file may grow after stat()
    if len(raw) > MAX_FILE_BYTES:
        raise AdapterError(f"{path} is over the {MAX_FILE_BYTES}-byte limit for an adapter")
    return raw


def bounded(a: np.ndarray) -> bool:
    """Whether every value is finite with magnitude at most ``MAX_ABS_VALUE``."""
    return bool(np.isfinite(a).all() and (a.size == 0 or np.abs(a).max() <= MAX_ABS_VALUE))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_text(t: Any) -> bool:
    if not isinstance(t, str) or len(t) > MAX_TEXT_CHARS:
        return False
    try:
        t.encode("utf-8")  # JSON can spell lone surrogates, which no file format can store
    except UnicodeEncodeError:
        return False
    return True


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        counts = Counter(k for k, _ in pairs)
        raise ValueError(f"duplicate keys {sorted(k[:40] for k, n in counts.items() if n > 1)[:5]}")
    return out


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, counted without recursion; stops early past the limit."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            if d > MAX_JSON_DEPTH:
                break
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_json(text: str | bytes | bytearray, what: str, source: str, max_size: int = MAX_METADATA_BYTES) -> Any:
    """JSON from an untrusted file: size-capped, UTF-8, finite numbers, no duplicate keys, depth-capped."""
    if len(text) > max_size:
        raise AdapterError(f"{source}: {what} is {len(text)} long, over the limit of {max_size}")
    try:
        value = json.loads(text if isinstance(text, str) else bytes(text).decode("utf-8"),
                           object_pairs_hook=_no_duplicate_keys, parse_float=_finite_float,
                           parse_constant=_reject_constant)
    except RecursionError:
        raise AdapterError(f"{source}: {what} is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # also UnicodeDecodeError and the hooks above
        raise AdapterError(f"{source}: {what} is not valid JSON ({str(e)[:200]})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise AdapterError(f"{source}: {what} is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def metadata_fields(meta: Any, source: str) -> dict[str, Any]:
    """The :class:`Adapter` fields in ``craft_adapter`` metadata, type- and size-checked (validate does the rest)."""
    if not isinstance(meta, dict):
        raise AdapterError(f"{source}: craft_adapter metadata is not a JSON object")
    version = meta.get("format_version")
    if not _is_int(version):
        raise AdapterError(f"{source}: metadata has no integer format_version")
    if version > FORMAT_VERSION:
        raise AdapterError(f"{source}: adapter format_version {version} is newer than this craft-adapter "
                           f"reads ({FORMAT_VERSION}); upgrade craft-adapter")
    try:
        prompt, logits = meta["prompt"], meta["logits"]
        fields = {"class_names": meta["class_names"], "template": prompt["template"], "mode": meta["mode"],
                  "logit_kind": logits["kind"], "logit_scale": logits["scale"],
                  "prompt_reading": prompt.get("learned_reading", ""), "backend": meta.get("backend", {}),
                  "fit": meta.get("fit", {}), "format_version": version}
    except (KeyError, TypeError, AttributeError) as e:
        raise AdapterError(f"{source}: metadata is missing or has a malformed field ({e})") from None
    names = fields["class_names"]
    if not isinstance(names, list) or not 1 <= len(names) <= MAX_CLASSES:
        raise AdapterError(f"{source}: class_names must be a list of 1 to {MAX_CLASSES} names")
    texts = (*names, fields["template"], fields["prompt_reading"], fields["mode"], fields["logit_kind"])
    if not all(_is_text(t) for t in texts):
        raise AdapterError(f"{source}: class_names, the template, the learned reading, the mode and the logit kind "
                           f"must be valid Unicode strings of at most {MAX_TEXT_CHARS} characters")
    scale = fields["logit_scale"]
    try:
        fields["logit_scale"] = float(scale) if isinstance(scale, int | float) and not isinstance(scale, bool) else None
    except OverflowError:  # an integer too large for a float
        fields["logit_scale"] = None
    if fields["logit_scale"] is None or not math.isfinite(fields["logit_scale"]):
        raise AdapterError(f"{source}: logits.scale must be a finite number, got {str(scale)[:40]}")
    if not isinstance(fields["backend"], dict) or not isinstance(fields["fit"], dict):
        raise AdapterError(f"{source}: metadata backend and fit must be JSON objects")
    return fields


def read_header(raw: bytes, source: str) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    """The ``__metadata__`` map and the tensor table of a safetensors file, checked before any tensor is read."""
    if len(raw) < 8:
        raise AdapterError(f"{source}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES or n > len(raw) - 8:
        raise AdapterError(f"{source}: safetensors header length {n} is invalid or over the {MAX_HEADER_BYTES}-byte "
                           "limit")
    header = parse_json(raw[8:8 + n], "safetensors header", source, MAX_HEADER_BYTES)
    if not isinstance(header, dict):
        raise AdapterError(f"{source}: safetensors header is not a JSON object")
    meta_map = header.pop("__metadata__", None)
    if not isinstance(meta_map, dict) or not isinstance(meta_map.get(METADATA_KEY), str):
        raise AdapterError(f"{source}: no craft_adapter metadata; is this an adapter file?")
    if len(meta_map) > MAX_METADATA_ENTRIES or not all(isinstance(v, str) for v in meta_map.values()):
        raise AdapterError(f"{source}: safetensors __metadata__ must map at most {MAX_METADATA_ENTRIES} keys to "
                           "strings")
    extra = sorted(set(header) - set(TENSOR_KEYS))
    if extra or len(header) > MAX_TENSORS:
        raise AdapterError(f"{source}: unexpected tensors {[e[:40] for e in extra[:8]]}; an adapter holds at most "
                           f"{MAX_TENSORS}: {list(TENSOR_KEYS)}")
    table = {name: _tensor_entry(name, spec, source) for name, spec in header.items()}
    _check_layout(table, len(raw) - 8 - n, source)
    return meta_map, table


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the safetensors header describes it: shape and byte range in the data section."""

    shape: tuple[int, ...]
    begin: int
    end: int


def _tensor_entry(name: str, spec: Any, source: str) -> TensorEntry:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise AdapterError(f"{source}: tensor {name} must be described by dtype, shape and data_offsets only")
    if spec["dtype"] != "F32":
        raise AdapterError(f"{source}: tensor {name} has dtype {str(spec['dtype'])[:20]}; adapter tensors are float32 "
                           "(F32)")
    shape, offsets = spec["shape"], spec["data_offsets"]
    if not isinstance(shape, list) or not 1 <= len(shape) <= 2 or not all(
            _is_int(d) and 0 <= d <= MAX_FILE_BYTES for d in shape):
        raise AdapterError(f"{source}: tensor {name} has shape {str(shape)[:60]}, expected 1 or 2 sizes in range")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise AdapterError(f"{source}: tensor {name} has malformed data_offsets {str(offsets)[:60]}")
    begin, end = offsets
    if not 0 <= begin <= end or end - begin != 4 * math.prod(shape):
        raise AdapterError(f"{source}: tensor {name} data_offsets {offsets} do not hold {math.prod(shape)} float32 "
                           f"values of shape {tuple(shape)}")
    return TensorEntry(tuple(shape), begin, end)


def _check_layout(table: dict[str, TensorEntry], data_len: int, source: str) -> None:
    pos = 0
    for name, t in sorted(table.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != pos:
            raise AdapterError(f"{source}: tensor {name} data starts at byte {t.begin}, expected {pos}: tensor data "
                               "overlaps or leaves a gap")
        pos = t.end
    if pos != data_len:
        raise AdapterError(f"{source}: tensor data covers {pos} bytes but the file holds {data_len} after the header "
                           "(truncated or padded)")


def check_tensor_table(table: dict[str, TensorEntry], n_classes: int, source: str) -> None:
    """Every tensor's shape against the class count and the limits, before anything is allocated."""
    missing = [k for k in REFINER_KEYS if k not in table]
    if missing:
        raise AdapterError(f"{source}: adapter is missing refiner tensors {missing}")
    fc1 = table["refiner.fc1.weight"].shape
    h = fc1[0]
    if len(fc1) != 2 or not 1 <= h <= MAX_HIDDEN:
        raise AdapterError(f"{source}: tensor refiner.fc1.weight has shape {fc1}, expected (hidden, {n_classes}) "
                           f"with hidden in 1..{MAX_HIDDEN}")
    want = {"refiner.fc1.weight": (h, n_classes), "refiner.fc1.bias": (h,),
            "refiner.fc2.weight": (n_classes, h), "refiner.fc2.bias": (n_classes,)}
    for k, shape in want.items():
        if table[k].shape != shape:
            raise AdapterError(f"{source}: tensor {k} has shape {table[k].shape}, expected {shape} for {n_classes} "
                               f"classes and hidden {h}")
    head = table.get(HEAD_KEY)
    if head is not None and (len(head.shape) != 2 or head.shape[0] != n_classes
                             or not 1 <= head.shape[1] <= MAX_EMBED_DIM):
        raise AdapterError(f"{source}: {HEAD_KEY} has shape {head.shape}, expected ({n_classes}, d) for {n_classes} "
                           f"classes and an embedding width d in 1..{MAX_EMBED_DIM}")
    ctx = table.get(CTX_KEY)
    if ctx is not None and (len(ctx.shape) != 2 or not 1 <= ctx.shape[0] <= MAX_CTX_TOKENS
                            or not 1 <= ctx.shape[1] <= MAX_CTX_WIDTH):
        raise AdapterError(f"{source}: prompt.ctx has shape {ctx.shape}, expected [n_ctx, width] with n_ctx in "
                           f"1..{MAX_CTX_TOKENS} and width in 1..{MAX_CTX_WIDTH}")


def head_dim(meta: dict[str, Any], source: str) -> int | None:
    """The image-embedding width ``d`` of the adapter's embedding head as its metadata records it, or None."""
    entry = meta.get(HEAD_META_KEY)
    if entry is None:
        return None
    d = entry.get("dim") if isinstance(entry, dict) else None
    if not _is_int(d) or not 1 <= d <= MAX_EMBED_DIM:
        raise AdapterError(f"{source}: metadata {HEAD_META_KEY} must be an object with an integer dim in "
                           f"1..{MAX_EMBED_DIM}, got {str(entry)[:80]}")
    return d


def check_embeddings(embeddings: np.ndarray | None, n: int, d: int | None) -> np.ndarray:
    """Image embeddings for an adapter's head: float32 ``[n, d]``, finite; :class:`AdapterError` naming the problem."""
    if embeddings is None:
        raise AdapterError("this adapter has an embedding head: it needs the image embeddings the vendor returned "
                           "(an embedding vendor), not scores alone")
    e = np.asarray(embeddings, dtype=np.float32)
    if e.ndim != 2 or e.shape[0] != n:
        raise AdapterError(f"image embeddings have shape {e.shape}, expected ({n}, {d}) for {n} images")
    if e.shape[1] != d:
        raise AdapterError(f"the adapter's embedding head reads {d}-dimensional image embeddings, but the vendor "
                           f"returned {e.shape[1]}-dimensional ones: serve it with the model it was fitted on")
    if not np.isfinite(e).all():
        raise AdapterError("image embeddings are not all finite")
    return e
