"""Mutations of safetensors adapter files for the loader fuzz campaign (``fuzz_loaders.py``), as hypothesis draws.

Byte flips, truncation, header-length edits, safetensors header JSON edits (dtype, shape, offsets, huge and negative
numbers, deep nesting, tensor table, metadata map), metadata edits (class count against the tensors, types, huge
strings, deep nesting, NaN), NaN/inf/huge tensor values, and benign edits that keep the adapter valid. The generic
byte mutations and the metadata edits are shared with the ONNX mutations (``fuzz_onnx_mutations.py``).
"""

from __future__ import annotations

import copy
import json
import re
import struct
from typing import Any

import numpy as np
from hypothesis import strategies as st

from craft_adapter.artifact.adapter_file import MAX_HEADER_BYTES, METADATA_KEY

# -- generic mutations ----------------------------------------------------------------------------------------------

SPECIAL_INTS = [0, 1, -1, 3, 4, 7, 2**31, 2**32 + 4, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30]
RAW_TOKENS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9" * 5000, "18446744073709551616", "-0", "1.5",
              "[" * 100_000 + "]" * 100_000, "[" * 40 + "]" * 40, "{" * 50_000, '"\\ud800"', "true", "null"]


def flip_bytes(data: st.DataObject, raw: bytes, head: int) -> tuple[bytes, str]:
    """XOR 1..8 bytes, mostly within the first ``head`` bytes (the header)."""
    b = bytearray(raw)
    hi = min(len(b), head) if data.draw(st.booleans()) else len(b)
    for _ in range(data.draw(st.integers(1, 8))):
        b[data.draw(st.integers(0, hi - 1))] ^= data.draw(st.integers(1, 255))
    return bytes(b), "byte flips"


def truncate(data: st.DataObject, raw: bytes) -> tuple[bytes, str]:
    """Cut the file at any point."""
    at = data.draw(st.integers(0, len(raw) - 1))
    return raw[:at], f"truncated at {at}"


def dump_with_tokens(obj: Any, tokens: dict[str, str]) -> str:
    """``json.dumps`` with placeholder strings replaced by raw JSON text (NaN, 1e400, deep nesting...)."""
    text = json.dumps(obj, separators=(",", ":"))
    for key, token in tokens.items():
        text = text.replace(json.dumps(key), token)
    return text


def odd_value(data: st.DataObject, tokens: dict[str, str]) -> Any:
    """A value of the wrong kind, or a placeholder for raw JSON text."""
    v = data.draw(st.one_of(st.sampled_from([None, True, "", "x" * 2000, [], {}, [1, 2], 1.5, -1, 2**70]),
                            st.sampled_from(RAW_TOKENS), st.integers()))
    if isinstance(v, str) and v in RAW_TOKENS:
        key = f"@@token{len(tokens)}@@"
        tokens[key] = v
        return key
    return v


# -- metadata edits (shared by both formats) ------------------------------------------------------------------------

def edit_metadata(data: st.DataObject, meta: Any, tokens: dict[str, str]) -> tuple[Any, str]:
    """One edit of the craft_adapter metadata object."""
    if not isinstance(meta, dict):
        return meta, "metadata (already broken)"
    meta = copy.deepcopy(meta)
    what = data.draw(st.sampled_from(["class count", "class names", "version", "mode", "kind", "scale", "template",
                                      "prompt", "drop key", "backend", "huge string", "whole", "junk key"]))
    names = meta.get("class_names") if isinstance(meta.get("class_names"), list) else ["a"]
    if what == "class count":
        k = data.draw(st.integers(-len(names), 30_000))
        meta["class_names"] = names[:k] if k < 0 else names + [f"extra {i}" for i in range(k)]
    elif what == "class names":
        meta["class_names"] = data.draw(st.sampled_from([
            [], "abc", [1, 2], names[:1] * len(names), ["\ud800"] * len(names), ["x" * 1001] + names[1:],
            [""] + names[1:], [[]] + names[1:]]))
    elif what in ("version", "mode", "kind", "scale", "backend"):
        key = {"version": "format_version", "backend": data.draw(st.sampled_from(["backend", "fit"]))}.get(what, what)
        picks = {"format_version": [0, -1, 2, 99, 1.0, "1", True, 1], "mode": ["soft", "text", "hard", ""],
                 "kind": ["logits", "probabilities", "odds"], "scale": [0, -1, 1e308, 1.5, "50", 10**400]}
        pick = st.sampled_from(picks.get(key, [[1], "x", {"a": [{"b": None}]}]))
        value = odd_value(data, tokens) if data.draw(st.booleans()) else data.draw(pick)
        target = meta.get("logits") if key in ("kind", "scale") else meta
        if isinstance(target, dict):
            target[key] = value
    elif what == "template" and isinstance(meta.get("prompt"), dict):
        meta["prompt"]["template"] = data.draw(st.sampled_from(["no slot", "{}{}", "{}", "x" * 2000 + "{}", 5]))
    elif what == "prompt":
        meta["prompt"] = data.draw(st.sampled_from([[], "a {}", None, {}, {"template": "{}", "learned_reading": 3}]))
    elif what == "drop key" and meta:
        meta.pop(data.draw(st.sampled_from(sorted(meta))))
    elif what == "huge string":
        meta["fit"] = {"note": "x" * data.draw(st.sampled_from([10_000, 800_000, 2_000_000]))}
    elif what == "whole":
        meta = odd_value(data, tokens)
    else:
        meta[data.draw(st.text(max_size=8))] = odd_value(data, tokens)
    return meta, f"metadata {what}"


# -- safetensors ----------------------------------------------------------------------------------------------------

def split_safetensors(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """A seed's header (parsed) and data section."""
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def pack_safetensors(header_text: str, body: bytes) -> bytes:
    """Header text and data section as a safetensors file, with the right length field."""
    head = header_text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(head)) + head + body


def edit_header(data: st.DataObject, raw: bytes) -> tuple[bytes, str]:
    """One structured edit of the safetensors header JSON (or of its data section), re-packed."""
    header, body = split_safetensors(raw)
    tokens: dict[str, str] = {}
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    what = data.draw(st.sampled_from(["dtype", "shape", "offsets", "number", "nesting", "metadata", "metadata map",
                                      "drop tensor", "extra tensor", "duplicate key", "values", "body length"]))
    if what == "dtype":
        header[name]["dtype"] = data.draw(st.sampled_from(["F64", "F16", "BF16", "I32", "U8", "BOOL", "f32", "", 3,
                                                           None, ["F32"]]))
    elif what == "shape":
        header[name]["shape"] = data.draw(st.one_of(
            st.lists(st.one_of(st.integers(-3, 40), st.sampled_from(SPECIAL_INTS)), max_size=4),
            st.sampled_from(["3", 3, None, {"a": 1}, [True, 3], [1.5, 2]])))
    elif what == "offsets":
        b, e = header[name]["data_offsets"]
        other = header[data.draw(st.sampled_from(names))]["data_offsets"]
        header[name]["data_offsets"] = data.draw(st.one_of(
            st.lists(st.one_of(st.integers(-8, len(body) + 8), st.sampled_from(SPECIAL_INTS)), max_size=3),
            st.sampled_from([[e, b], list(other), [b + 4, e + 4], [b - 4, e], [b, e - 4], [b, e + 4], "0,4", None])))
    elif what == "nesting":
        key = "@@deep@@"
        tokens[key] = data.draw(st.sampled_from(["[" * d + "]" * d for d in (33, 999, 1001, 5000, 100_000)]))
        target = data.draw(st.sampled_from(["shape", "tensor", "metadata"]))
        if target == "metadata":
            header["__metadata__"]["x"] = key
        else:
            header[name] = key if target == "tensor" else {**header[name], "shape": key}
    elif what == "number":
        text = dump_with_tokens(header, tokens)
        spans = [m.span() for m in re.finditer(r"-?\d+", text)]
        s, e = data.draw(st.sampled_from(spans))
        token = data.draw(st.sampled_from(RAW_TOKENS[:9] + ["-4", "0", str(2**64)]))
        return pack_safetensors(text[:s] + token + text[e:], body), f"header number -> {token[:12]}"
    elif what == "metadata":
        meta, what = edit_metadata(data, json.loads(header["__metadata__"][METADATA_KEY]), tokens)
        header["__metadata__"][METADATA_KEY] = dump_with_tokens(meta, tokens)
        tokens = {}
    elif what == "metadata map":
        edit = data.draw(st.sampled_from(["many", "non-string", "drop map", "drop key", "not json", "huge"]))
        m = header["__metadata__"]
        if edit == "many":
            m.update({f"k{i}": "v" for i in range(data.draw(st.integers(16, 200)))})
        elif edit == "non-string":
            m[data.draw(st.sampled_from([METADATA_KEY, "other"]))] = data.draw(st.sampled_from([1, None, {}, ["x"]]))
        elif edit == "drop map":
            header.pop("__metadata__")
        elif edit == "drop key":
            m.pop(METADATA_KEY)
        else:
            size = data.draw(st.sampled_from([800_000, 2 << 20]))
            m[METADATA_KEY] = "{not json" if edit == "not json" else "x" * size
        what = f"metadata map {edit}"
    elif what == "drop tensor":
        header.pop(name)
    elif what == "extra tensor":
        extra = data.draw(st.sampled_from(["evil", "prompt.ctx", "refiner.fc3.weight"] + [f"t{i}" for i in range(9)]))
        header[extra] = {"dtype": "F32", "shape": [1], "data_offsets": [len(body), len(body) + 4]}
        body += b"\0\0\0\0"
    elif what == "duplicate key":
        text = dump_with_tokens(header, tokens)
        entry = f'"{name}":{json.dumps(header[name], separators=(",", ":"))}'
        return pack_safetensors(text.replace(entry, entry + "," + entry, 1), body), "duplicate tensor key"
    elif what == "values":
        b, _ = header[name]["data_offsets"]
        arr = bytearray(body)
        value = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 3e38, 1e5, -1e4, 1e-45]))
        arr[b:b + 4] = struct.pack("<f", value)
        body = bytes(arr)
        what = f"tensor value {value}"
    else:
        body = body[:-data.draw(st.integers(1, 4))] if data.draw(st.booleans()) else body + b"\0" * 4
    return pack_safetensors(dump_with_tokens(header, tokens), body), f"header {what}"


def benign_edit(data: st.DataObject, raw: bytes) -> tuple[bytes, str]:
    """An edit that keeps the adapter valid: tensors laid out in another order, padding, names, extra keys."""
    header, body = split_safetensors(raw)
    meta = json.loads(header["__metadata__"][METADATA_KEY])
    what = data.draw(st.sampled_from(["relayout", "padding", "class name", "template", "junk keys", "values"]))
    if what == "relayout":  # the same tensors in a drawn order, offsets rewritten
        names = data.draw(st.permutations(sorted(k for k in header if k != "__metadata__")))
        chunks = {k: body[header[k]["data_offsets"][0]:header[k]["data_offsets"][1]] for k in names}
        pos, body = 0, b"".join(chunks[k] for k in names)
        for k in names:
            header[k]["data_offsets"] = [pos, pos + len(chunks[k])]
            pos += len(chunks[k])
    elif what == "class name":
        fresh = st.text(min_size=1, max_size=30).filter(lambda t: t not in meta["class_names"])
        meta["class_names"][0] = data.draw(fresh)
    elif what == "template":
        meta["prompt"]["template"] = data.draw(st.sampled_from(["{}", "itap of a {}.", "une photo d'un {} ✓"]))
    elif what == "junk keys":
        meta[data.draw(st.sampled_from(["note", "x"]))] = data.draw(st.sampled_from([None, [1], {"a": "b"}]))
        header["__metadata__"]["other"] = "value"
    elif what == "values":
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        b = header[name]["data_offsets"][0]
        body = body[:b] + struct.pack("<f", data.draw(st.floats(-1e4, 1e4, width=32))) + body[b + 4:]
    header["__metadata__"][METADATA_KEY] = json.dumps(meta)
    text = json.dumps(header) + (" " * data.draw(st.integers(0, 16)) if what == "padding" else "")
    return pack_safetensors(text, body), f"benign {what}"


def mutate_safetensors(data: st.DataObject, raw: bytes) -> tuple[bytes, str]:
    """A structured or benign edit and/or 1..3 byte-level mutations of a safetensors seed."""
    first = data.draw(st.sampled_from(["header", "header", "header", "benign", "bytes"]))
    steps = []
    if first != "bytes":
        raw, what = (edit_header if first == "header" else benign_edit)(data, raw)
        steps.append(what)
    extra = data.draw(st.integers(1, 3)) if first == "bytes" else int(data.draw(st.integers(0, 3)) == 0)
    for _ in range(extra):
        kind = data.draw(st.sampled_from(["flip", "truncate", "length"]))
        if kind == "flip" and raw:
            raw, what = flip_bytes(data, raw, 8 + struct.unpack("<Q", raw[:8])[0] if len(raw) >= 8 else 8)
        elif kind == "truncate" and raw:
            raw, what = truncate(data, raw)
        else:
            n = struct.unpack("<Q", raw[:8])[0] if len(raw) >= 8 else 0
            value = data.draw(st.one_of(st.sampled_from([0, 2, n - 1, n + 1, len(raw), MAX_HEADER_BYTES + 1,
                                                         2**63, 2**64 - 1]), st.integers(0, 2**64 - 1)))
            raw, what = struct.pack("<Q", value % 2**64) + raw[8:], f"header length -> {value % 2**64}"
        steps.append(what)
    return raw, "; ".join(steps)
