"""The command line through typer's CliRunner: help, error exits, and a real tiny fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from craft_adapter.artifact.adapter_file import Adapter
from craft_adapter.cli import app

runner = CliRunner()
WIDE = {"COLUMNS": "300", "TERMINAL_WIDTH": "300"}  # one help line per option


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_commands_and_fit_defaults():
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("fit", "eval", "inspect", "demo"):
        assert cmd in r.output
    r = invoke("fit", "--help")
    assert r.exit_code == 0
    for text in ("--popsize", "40", "--sigma", "--proj-std", "0.2", "--kl-decay-n", "--holdout-shots"):
        assert text in r.output


def test_no_command_shows_help_and_unknown_command_fails():
    assert invoke("nope").exit_code == 2
    r = invoke()
    assert "fit" in r.output


def test_missing_data_folder_is_a_clean_error(tmp_path):
    r = invoke("eval", "--data", tmp_path / "nothing", "--model", f"local-dir:{tmp_path}")
    assert r.exit_code == 2
    assert "does not exist" in r.output and "Traceback" not in r.output


def test_bad_template_and_bad_model(tmp_path):
    r = invoke("eval", "--template", "no placeholder")
    assert r.exit_code == 2 and "exactly one '{}'" in r.output
    (tmp_path / "c").mkdir()
    r = invoke("eval", "--model", "ViT-B-32", "--data", tmp_path)
    assert r.exit_code == 2


def test_inspect_rejects_a_non_adapter(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"garbage")
    r = invoke("inspect", p)
    assert r.exit_code == 2 and "not a safetensors file" in r.output


def test_fit_refuses_to_overwrite_and_bad_settings(tmp_path):
    out = tmp_path / "a.safetensors"
    out.write_bytes(b"keep me")
    r = invoke("fit", "-o", out)
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert out.read_bytes() == b"keep me"
    r = invoke("fit", "-o", tmp_path / "b.safetensors", "--popsize", "1")
    assert r.exit_code == 2 and "popsize" in r.output


def write_folder(root, images, labels, names):
    for i, (im, y) in enumerate(zip(images, labels, strict=True)):
        d = root / names[y]
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{i}.png")
    return root


@pytest.mark.slow
def test_tiny_cli_fit_improves_over_zero_shot_and_loads(reference_vendor_dir, tmp_path):
    from craft_adapter.reference.task import reference_task

    train, _ = reference_task(shots=8, seed=2)
    data = write_folder(tmp_path / "shots", train.images, train.labels, train.class_names)
    out = tmp_path / "adapter.safetensors"
    r = invoke("fit", "--data", data, "--shots", 8, "--budget", 1200, "--seed", 2, "-o", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    adapter = Adapter.load(out)
    assert adapter.fit["queries"] <= 1200 and adapter.class_names == sorted(train.class_names)
    assert json.loads(out.with_name(out.name + ".fitlog.json").read_text())["wall_time_s"] > 0
    r = invoke("eval", out, "--data", data, "--device", "cpu", "--json", tmp_path / "e.json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["adapted_accuracy"] > res["zero_shot_accuracy"] + 0.1
    r = invoke("inspect", out)
    assert r.exit_code == 0 and "reads as" in r.output and "8" in r.output
    assert np.isfinite(adapter.ctx).all()


def test_fit_options_are_generated_from_every_setting_with_its_help_and_panel():
    from dataclasses import fields

    from craft_adapter.cli.fitting import HP, RUN
    from craft_adapter.training.config import FitConfig, operational_settings

    r = runner.invoke(app, ["fit", "--help"], env=WIDE)
    assert r.exit_code == 0
    lines = r.output.splitlines()
    panel_of, panel = {}, None
    for line in lines:
        if line.startswith("╭─"):
            panel = line.strip("╭─ ").rstrip("─╮ ").strip()
        panel_of.update({w: panel for w in line.split() if w.startswith("--")})
    for f in fields(FitConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in panel_of, flag
        assert panel_of[flag] == (RUN if f.name in operational_settings() else HP), flag
        help_words = " ".join(f.metadata["help"].split()[:3])
        assert any(flag in ln and help_words in ln for ln in lines) or f.name == "prompt", (flag, help_words)
        if f.default is not None and f.type != "bool" and f.name != "prompt":
            assert any(flag in ln and f"[default: {f.default}]" in ln for ln in lines), flag
    assert "--train-prompt" in panel_of and "--no-train-prompt" in panel_of and "[default: auto]" in r.output


def test_serve_options_are_generated_from_every_server_setting():
    from dataclasses import fields

    from craft_adapter.serve.server.settings import ServerConfig

    r = runner.invoke(app, ["serve", "--help"], env=WIDE)
    assert r.exit_code == 0
    for f in fields(ServerConfig):
        assert f"CRAFT_SERVE_{f.name.upper()}" in r.output, f.name
        assert " ".join(f.metadata["help"].split()[:3]) in r.output, f.name
    for flag in ("--vendor ", "--vendor-timeout", "--retries", "--backoff ", "--key-env", "--access-log",
                 "[default: (8000)]", "[default: (10.0)]"):
        assert flag in r.output, flag


def test_bad_prompt_and_step_scale_are_clean_errors(tmp_path):
    r = invoke("fit", "-o", tmp_path / "a.safetensors", "--prompt", "poem")
    assert r.exit_code == 2 and "--prompt must be auto, soft or text" in r.output
    r = invoke("fit", "-o", tmp_path / "a.safetensors", "--step-scale", "huge")
    assert r.exit_code == 2 and "Traceback" not in r.output


HOSTILE_NAMES = ["[red]cat", "[link=http://evil.example]dog[/link]", "\x1b[2Jwipe", "bell\x07", "[/]", "rtl\u202eevil"]


def test_inspect_shows_hostile_class_names_as_text(tmp_path) -> None:
    from craft_adapter.artifact.adapter_file import Adapter
    from craft_adapter.artifact.synthetic import synthetic_adapter

    a = synthetic_adapter(len(HOSTILE_NAMES))
    path = Adapter(HOSTILE_NAMES, "[bold]{}[/] \x1b]8;;http://x\x1b\\", a.mode, a.logit_kind, a.logit_scale,
                   a.refiner).save(tmp_path / "hostile.safetensors")
    result = CliRunner().invoke(app, ["inspect", str(path)], terminal_width=400)
    assert result.exit_code == 0, result.output
    text = result.output
    for shown_as in ("[red]cat", "[link=http://evil.example]dog[/link]", "\\x1b[2Jwipe", "bell\\x07", "[/]",
                     "rtl\\u202eevil", "[bold]{}[/]"):
        assert shown_as in text
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text


def test_an_error_quoting_markup_is_printed_not_parsed(tmp_path) -> None:
    data = tmp_path / "d"
    (data / "[bold]cat").mkdir(parents=True)  # a class folder with no images: the error message quotes its name
    result = CliRunner().invoke(app, ["fit", "--data", str(data), "-o", str(tmp_path / "a.safetensors")])
    assert result.exit_code == 2 and "[bold]cat" in result.output and "Traceback" not in result.output


def test_fit_with_an_embedding_head_against_a_scoring_only_vendor_stops_before_any_call(tmp_path) -> None:
    from conftest import random_images

    from craft_adapter.testing.stub_vendor import running_stub

    images = random_images(6, seed=3)
    data = write_folder(tmp_path / "shots", images, [0, 0, 0, 1, 1, 1], ["cat", "dog"])
    out = tmp_path / "a.safetensors"
    with running_stub() as stub:
        r = invoke("fit", "--data", data, "--shots", 3, "--vendor", stub.url, "--embedding-head", "--no-cache",
                   "-o", out)
        assert sum(stub.calls.values()) == 0
    assert r.exit_code == 2, r.output
    assert "returns only scores" in r.output and "drop --embedding-head" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_inspect_shows_an_embedding_head(tmp_path) -> None:
    import dataclasses

    from craft_adapter.artifact.synthetic import synthetic_adapter

    plain = synthetic_adapter(3, 8, logit_kind="logits")
    head = dataclasses.replace(plain, head=np.zeros((3, 16), np.float32),
                               refiner={k: np.zeros_like(v) for k, v in plain.refiner.items()})
    r = CliRunner().invoke(app, ["inspect", str(head.save(tmp_path / "h.safetensors"))], terminal_width=300)
    assert r.exit_code == 0 and "3 x 16 on the image embedding" in r.output and "(the identity)" in r.output
    r = CliRunner().invoke(app, ["inspect", str(plain.save(tmp_path / "p.safetensors"))], terminal_width=300)
    assert r.exit_code == 0 and "embedding head" not in r.output and "identity" not in r.output


@pytest.mark.parametrize("first", [1, 7])
def test_the_progress_bar_says_when_a_fit_continues_from_its_checkpoint(first: int) -> None:
    from craft_adapter.cli.fit_runs import FitProgress
    from craft_adapter.cli.shared import err
    from craft_adapter.training.config import FitConfig
    from craft_adapter.training.loop import FitState

    meter = {"unit": "queries", "queries": 40 * first, "vendor_calls": first, "paid_calls": first, "cached_calls": 0,
             "failed_calls": 0}
    with err.capture() as captured, FitProgress(FitConfig()) as show:
        show(FitState(first, 40 * first, first, 8000, 1.0, 0.5, None, meter=meter))
    said = "continuing from the resume checkpoint after generation 6" in captured.get()
    assert said == (first == 7)
