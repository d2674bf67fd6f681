"""Deployment memory: both sides measured in fresh processes, figures consistent, table and JSON written."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import typer
from typer.testing import CliRunner

from craft_adapter.artifact.synthetic import synthetic_adapter
from craft_adapter.cli.shipping import register
from craft_adapter.reference.footprint import FootprintRow, Measurement, footprint_table


def test_synthetic_adapter_is_a_valid_refiner_of_the_asked_size() -> None:
    adapter = synthetic_adapter(1000)
    assert adapter.n_classes == 1000 and adapter.hidden == 256
    assert sum(v.nbytes for v in adapter.refiner.values()) == 4 * (2 * 1000 * 256 + 256 + 1000)


def test_ratios_and_table() -> None:
    a = Measurement(param_bytes=10, framework_rss=50, model_rss=2, model_rss_cold=9, process_rss=60, peak_rss=61)
    w = Measurement(param_bytes=3000, framework_rss=700, model_rss=400, model_rss_cold=420, process_rss=1100,
                    peak_rss=1200)
    row = FootprintRow("ViT-B-16", 1000, a, w)
    assert row.ratios() == {"param_bytes": 300.0, "model_rss": 200.0, "model_rss_cold": 420 / 9,
                            "process_rss": 1100 / 60}
    assert footprint_table([row]).row_count == 3  # adapter, white-box, ratio


def test_footprint_command_measures_both_deployments(tiny_model_dir: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    out = tmp_path / "footprint.json"
    result = CliRunner().invoke(app, ["footprint", "--arch", f"local-dir:{tiny_model_dir}", "--classes", "10",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "ratio" in result.output and "about 1/80" in result.output
    (row,) = json.loads(out.read_text())["rows"]
    adapter, white = row["adapter"], row["white_box"]
    assert adapter["param_bytes"] == 4 * (2 * 10 * 256 + 256 + 10)
    model = open_clip.create_model(f"local-dir:{tiny_model_dir}")
    assert white["param_bytes"] == sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for m in (adapter, white):
        assert 0 <= m["model_rss"] <= m["model_rss_cold"] and m["framework_rss"] < m["process_rss"] <= m["peak_rss"]
    # torch alone outweighs the whole adapter process; the adapter process never imported it (checked in the worker)
    assert white["framework_rss"] > 2 * adapter["process_rss"]
    assert row["ratios_white_box_over_adapter"]["process_rss"] == white["process_rss"] / adapter["process_rss"]
