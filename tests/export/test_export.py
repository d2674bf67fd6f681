"""Refiner -> ONNX: a checked, self-describing graph with a dynamic batch, parity with torch, and refusal on failure."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import typer
from typer.testing import CliRunner

from craft_adapter.artifact.adapter_file import Adapter, refiner_input
from craft_adapter.artifact.synthetic import synthetic_adapter
from craft_adapter.cli.shipping import register

# isort: split
# (export/ and serve/ install as craft_adapter.export and .serve; ruff cannot place them, so they sort apart)
from craft_adapter.artifact.onnx_graph import EMBEDDING_NAME, INPUT_NAME, OUTPUT_NAMES, build_refiner_onnx
from craft_adapter.export import ExportError, RefinerWithSoftmax, export_onnx, onnx_export
from craft_adapter.serve.session import make_session
from craft_adapter.serve.shipped import ShippedAdapter


def _app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    return app


@pytest.fixture
def adapter_file(tmp_path: Path) -> Path:
    return synthetic_adapter(10, seed=1).save(tmp_path / "adapter.safetensors")


def test_export_writes_a_checked_self_describing_onnx(adapter_file: Path) -> None:
    report = export_onnx(adapter_file)
    assert report.path == adapter_file.with_suffix(".onnx") and report.path.is_file()
    model = onnx.load(report.path)
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert [i.name for i in model.graph.input] == [INPUT_NAME]
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    for value in (*model.graph.input, *model.graph.output):
        batch, classes = value.type.tensor_type.shape.dim
        assert batch.dim_param and not batch.dim_value and classes.dim_value == 10
    props = {p.key: p.value for p in model.metadata_props}
    adapter = Adapter.load(adapter_file)
    assert json.loads(props["craft_adapter"]) == json.loads(json.dumps(adapter.metadata()))
    assert json.loads(props["class_names"]) == adapter.class_names
    assert props["prompt_template"] == adapter.template
    assert props["logit_kind"] == adapter.logit_kind and props["format_version"] == "1"


@pytest.mark.parametrize("kind", ["probabilities", "logits"])
def test_parity_with_torch_at_batch_1_and_256(tmp_path: Path, kind: str) -> None:
    adapter = synthetic_adapter(10, logit_kind=kind, seed=2)
    report = export_onnx(adapter, tmp_path / "r.onnx")
    assert set(report.max_abs_diff_torch) == {1, 256}
    assert max(report.max_abs_diff_torch.values()) <= 1e-5
    # independently of the exporter's own check: the written file against torch and the numpy reference
    session = make_session(str(report.path), device="cpu")
    module = RefinerWithSoftmax(adapter)
    rng = np.random.default_rng(0)
    for batch in (1, 7, 256):
        scores = rng.dirichlet(np.ones(10), batch).astype(np.float32) if kind == "probabilities" else \
            rng.normal(5, 3, (batch, 10)).astype(np.float32)
        x = refiner_input(scores, kind)
        refined, probs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        with torch.no_grad():
            want_refined, want_probs = (t.numpy() for t in module(torch.from_numpy(x)))
        assert np.abs(refined - want_refined).max() <= 1e-5 and np.abs(probs - want_probs).max() <= 1e-5
        assert np.abs(refined - adapter.refine(scores)).max() <= 1e-5


def test_exported_graph_and_torch_free_builder_agree(tmp_path: Path) -> None:
    adapter = synthetic_adapter(12, seed=3)
    exported = onnx.load(export_onnx(adapter, tmp_path / "r.onnx").path)
    built = onnx.load_from_string(build_refiner_onnx(adapter))
    assert [n.op_type for n in exported.graph.node] == [n.op_type for n in built.graph.node]
    x = refiner_input(np.random.default_rng(0).dirichlet(np.ones(12), 33).astype(np.float32), adapter.logit_kind)
    a = make_session(exported.SerializeToString(), "cpu").run(None, {INPUT_NAME: x})
    b = make_session(built.SerializeToString(), "cpu").run(None, {INPUT_NAME: x})
    assert all(np.abs(u - v).max() <= 1e-6 for u, v in zip(a, b, strict=True))


def test_refuses_to_write_when_parity_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_trace = onnx_export.trace_refiner

    def broken_trace(adapter: Adapter, opset: int = 18) -> onnx.ModelProto:  # an exporter bug: a shifted bias
        model = real_trace(adapter, opset)
        for init in model.graph.initializer:
            if init.name.endswith("fc2.bias"):
                arr = onnx.numpy_helper.to_array(init) + np.float32(1e-3)
                init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        return model

    monkeypatch.setattr(onnx_export, "trace_refiner", broken_trace)
    out = tmp_path / "r.onnx"
    with pytest.raises(ExportError, match="parity check failed.*nothing was written"):
        export_onnx(synthetic_adapter(10), out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_refuses_an_old_opset(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="opset 16 is too old"):
        export_onnx(synthetic_adapter(10), tmp_path / "r.onnx", opset=16)
    assert not (tmp_path / "r.onnx").exists()


def test_cli_export(adapter_file: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(_app(), ["export", "--onnx", str(adapter_file), "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 0, result.output
    assert "max abs difference from torch" in result.output and (tmp_path / "x.onnx").is_file()
    result = runner.invoke(_app(), ["export", str(adapter_file)])
    assert result.exit_code == 2 and "--onnx" in result.output


def test_cli_export_refuses_a_newer_adapter(tmp_path: Path) -> None:
    adapter = synthetic_adapter(10)
    adapter.format_version = 99  # as written by a future craft-adapter
    path = tmp_path / "future.safetensors"
    path.write_bytes(adapter.to_bytes())
    result = CliRunner().invoke(_app(), ["export", "--onnx", str(path)])
    assert result.exit_code == 2 and "upgrade craft-adapter" in result.output
    assert not path.with_suffix(".onnx").exists()


def head_adapter(n_classes: int = 6, dim: int = 24, seed: int = 2) -> Adapter:
    """A logits adapter with an embedding head (the values a fit gives: deltas small next to unit text embeddings)."""
    base = synthetic_adapter(n_classes, 32, logit_kind="logits", seed=seed)
    head = 0.05 * np.random.default_rng(seed).normal(size=(n_classes, dim))
    return dataclasses.replace(base, head=head.astype(np.float32))


def test_an_adapter_with_a_head_exports_a_two_input_graph_that_onnxruntime_runs_as_numpy_does(tmp_path: Path) -> None:
    adapter = head_adapter()
    path = adapter.save(tmp_path / "head.safetensors")
    report = export_onnx(path)
    assert max(report.max_abs_diff_torch.values()) <= 1e-5 and max(report.max_abs_diff_numpy.values()) <= 1e-5
    model = onnx.load(report.path)
    assert [i.name for i in model.graph.input] == [INPUT_NAME, EMBEDDING_NAME]
    assert model.graph.input[1].type.tensor_type.shape.dim[1].dim_value == 24
    session = make_session(report.path.read_bytes(), device="cpu")
    rng = np.random.default_rng(3)
    scores = (20 * rng.normal(0.2, 0.05, size=(17, 6))).astype(np.float32)
    e = rng.normal(size=(17, 24))
    e = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)
    refined, _ = session.run(list(OUTPUT_NAMES), {INPUT_NAME: scores, EMBEDDING_NAME: e})
    np.testing.assert_allclose(refined, adapter.refine(scores, e), atol=1e-5)
    with torch.no_grad():
        want = RefinerWithSoftmax(adapter)(torch.from_numpy(scores), torch.from_numpy(e))[0].numpy()
    np.testing.assert_allclose(refined, want, atol=1e-5)
    without = adapter.refine(scores, np.zeros_like(e))
    assert np.abs(refined - without).max() > 0.1  # the head is in the graph, not dropped
    shipped = ShippedAdapter.load(report.path)
    assert shipped.head_dim == 24
    np.testing.assert_allclose(shipped.refine(scores, e)[0], refined, atol=1e-6)
