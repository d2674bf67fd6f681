"""The adapter file: round trips, determinism, size, and clear rejection of tampered files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from craft_adapter.artifact.adapter_file import FORMAT_VERSION, METADATA_KEY, Adapter, AdapterError, refiner_input


def make(n_classes=3, hidden=8, mode="soft", kind="logits", seed=0) -> Adapter:
    rng = np.random.default_rng(seed)
    r = {"refiner.fc1.weight": rng.normal(size=(hidden, n_classes)), "refiner.fc1.bias": rng.normal(size=hidden),
         "refiner.fc2.weight": rng.normal(size=(n_classes, hidden)), "refiner.fc2.bias": rng.normal(size=n_classes)}
    return Adapter(class_names=[f"class {i}" for i in range(n_classes)], template="a photo of a {}.", mode=mode,
                   logit_kind=kind, logit_scale=50.0, refiner={k: v.astype(np.float32) for k, v in r.items()},
                   backend={"name": "test"}, fit={"shots": 4, "seed": 1},
                   ctx=rng.normal(size=(4, 16)).astype(np.float32) if mode == "soft" else None,
                   prompt_reading="a photo of a")


@pytest.mark.parametrize("mode,kind", [("soft", "logits"), ("text", "probabilities"), ("text", "logits")])
def test_round_trip_every_mode(tmp_path, mode, kind):
    a = make(mode=mode, kind=kind)
    b = Adapter.load(a.save(tmp_path / "a.safetensors"))
    assert b.metadata() == a.metadata()
    assert b.to_bytes() == a.to_bytes()
    x = np.abs(np.random.default_rng(1).normal(size=(5, 3))).astype(np.float32)
    np.testing.assert_array_equal(a.refine(x), b.refine(x))


def test_serialisation_is_deterministic_and_small():
    assert make(seed=2).to_bytes() == make(seed=2).to_bytes()
    big = make(n_classes=100, hidden=256)
    assert len(big.to_bytes()) < 1_000_000


def test_refiner_input_matches_the_logit_kind():
    p = np.array([[0.5, 0.5, 0.0]], np.float32)
    np.testing.assert_array_equal(refiner_input(p, "logits"), p)
    np.testing.assert_allclose(refiner_input(p, "probabilities"), np.log([[0.5, 0.5, 1e-12]]).astype(np.float32))
    with pytest.raises(AdapterError, match="unknown logit kind"):
        refiner_input(p, "odds")


def rewrite(raw: bytes, edit_meta=None, edit_tensors=None) -> bytes:
    """Re-save an adapter's bytes with its metadata or tensors changed."""
    from safetensors.numpy import load

    n = struct.unpack("<Q", raw[:8])[0]
    meta = json.loads(json.loads(raw[8:8 + n])["__metadata__"][METADATA_KEY])
    tensors = load(raw)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    return save(tensors, metadata={METADATA_KEY: json.dumps(meta)})


TAMPERS = {
    "newer version": (lambda m: m.update(format_version=FORMAT_VERSION + 1), None, "newer than this craft-adapter"),
    "missing class names": (lambda m: m.pop("class_names"), None, "class_names"),
    "duplicate classes": (lambda m: m.update(class_names=["a", "a", "b"]), None, "duplicates"),
    "class count": (lambda m: m.update(class_names=["a", "b"]), None, "expected"),
    "template": (lambda m: m["prompt"].update(template="no slot"), None, "exactly one"),
    "mode": (lambda m: m.update(mode="hard"), None, "unknown mode"),
    "kind": (lambda m: m["logits"].update(kind="odds"), None, "unknown logit kind"),
    "wrong shape": (None, lambda t: t.update({"refiner.fc2.bias": np.zeros(7, np.float32)}), "shape"),
    "missing tensor": (None, lambda t: t.pop("refiner.fc1.bias"), "missing refiner tensors"),
    "extra tensor": (None, lambda t: t.update(evil=np.zeros(1, np.float32)), "unexpected tensors"),
    "nan weights": (None, lambda t: t["refiner.fc1.weight"].__setitem__((0, 0), np.nan), "finite"),
    "float64": (None, lambda t: t.update({"refiner.fc1.bias": t["refiner.fc1.bias"].astype(np.float64)}), "float32"),
    "no ctx in soft mode": (None, lambda t: t.pop("prompt.ctx"), "prompt.ctx"),
}


@pytest.mark.parametrize("name", list(TAMPERS))
def test_tampered_files_are_rejected_with_clear_messages(name):
    meta_edit, tensor_edit, message = TAMPERS[name]
    raw = rewrite(make().to_bytes(), meta_edit, tensor_edit)
    with pytest.raises(AdapterError, match=message):
        Adapter.from_bytes(raw)


@pytest.mark.parametrize("raw,message", [
    (b"", "too short"),
    (b"\xff" * 16, "header length"),
    (struct.pack("<Q", 2) + b"{}", "no craft_adapter metadata"),
    (save({"x": np.zeros(1, np.float32)}), "no craft_adapter metadata"),
])
def test_non_adapters_are_rejected(raw, message):
    with pytest.raises(AdapterError, match=message):
        Adapter.from_bytes(raw)


def test_truncated_file_is_rejected(tmp_path):
    raw = make().to_bytes()
    p = tmp_path / "t.safetensors"
    p.write_bytes(raw[:-10])
    with pytest.raises(AdapterError):
        Adapter.load(p)
    with pytest.raises(AdapterError, match="does not exist"):
        Adapter.load(tmp_path / "missing.safetensors")


def test_save_into_a_read_only_folder_is_a_clear_error_and_leaves_nothing(tmp_path) -> None:
    import os

    from craft_adapter.artifact.adapter_file import AdapterWriteError, check_writable
    from craft_adapter.artifact.synthetic import synthetic_adapter

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):  # root ignores permission bits: a missing folder fails the same way
            folder = tmp_path / "missing"
        with pytest.raises(AdapterWriteError, match="cannot write"):
            check_writable(folder / "a.safetensors")
        with pytest.raises(AdapterWriteError, match="cannot write the adapter"):
            synthetic_adapter(3).save(folder / "a.safetensors")
        assert not folder.exists() or list(folder.iterdir()) == []
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_save_on_a_full_disk_leaves_no_partial_file(tmp_path) -> None:
    from craft_adapter.artifact.adapter_file import AdapterWriteError
    from craft_adapter.artifact.synthetic import synthetic_adapter

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    target = tmp_path / "a.safetensors"
    (tmp_path / "a.safetensors.tmp").symlink_to("/dev/full")  # every write to the temporary file fails: ENOSPC
    with pytest.raises(AdapterWriteError, match="No space left"):
        synthetic_adapter(3).save(target)
    assert not target.exists() and not (tmp_path / "a.safetensors.tmp").exists()
