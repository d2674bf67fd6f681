"""The adapter server's parts without a server: backoff, config, metrics, torch-free (the vendor rules it shares
with fit are tested in tests/vendors)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

# isort: split
# (serve/ installs as craft_adapter.serve; ruff cannot place it, so it sorts apart)
from craft_adapter.serve.server.metrics import ServerMetrics
from craft_adapter.serve.server.settings import ServerConfig
from craft_adapter.serve.server.vendor_pool import ZeroShotVendorClient
from craft_adapter.vendors.credentials import Secret, redact_url

LABELS = ["a", "b", "c"]


def test_backoff_is_jittered_exponential_and_honours_retry_after() -> None:
    config = ServerConfig(adapter="a.onnx", vendor_url="http://127.0.0.1:1/", backoff_base_s=0.1, backoff_max_s=0.3)
    client = ZeroShotVendorClient(config, LABELS, "{}", ServerMetrics())
    waits = {attempt: [client._backoff(attempt, None) for _ in range(300)] for attempt in range(4)}
    for attempt, ws in waits.items():
        cap = min(0.3, 0.1 * 2 ** attempt)
        assert 0 <= min(ws) and max(ws) <= cap and np.std(ws) > cap / 10  # full jitter, not a fixed sleep
    assert all(2.0 <= client._backoff(0, 2.0) <= 2.1 for _ in range(50))


def test_config_from_env_round_trips_and_validates() -> None:
    config = ServerConfig(adapter="a.onnx", vendor_url="https://vendor.example/zs", port=9000, vendor_retries=0,
                          access_log=False, request_timeout_s=2.5)
    assert ServerConfig.from_env(config.to_env()) == config
    assert ServerConfig.from_env({"CRAFT_SERVE_ADAPTER": "x.onnx", "CRAFT_SERVE_VENDOR_URL": "http://h/",
                                  "CRAFT_SERVE_WORKERS": "3"}).workers == 3
    with pytest.raises(ValueError, match="CRAFT_SERVE_VENDOR_URL"):
        ServerConfig.from_env({"CRAFT_SERVE_ADAPTER": "x.onnx"})
    with pytest.raises(ValueError, match="not a valid int"):
        ServerConfig.from_env({**config.to_env(), "CRAFT_SERVE_PORT": "eighty"})
    with pytest.raises(ValueError, match="not in the vendor URL"):
        ServerConfig(adapter="a", vendor_url="http://user:hunter2@h/")
    with pytest.raises(ValueError, match="vendor_timeout_s must be positive"):
        ServerConfig(adapter="a", vendor_url="http://h/", vendor_timeout_s=0)


def test_key_from_file_or_env_and_never_printed(tmp_path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("  s3cret-from-file\n")
    config = ServerConfig(adapter="a", vendor_url="http://h/", vendor_key_file=str(key_file))
    key = config.vendor_key()
    assert key.reveal() == "s3cret-from-file" and "s3cret" not in f"{key} {key!r} {[key]}"
    assert key.scrub("header Bearer s3cret-from-file!") == "header Bearer ***!"
    env_config = ServerConfig(adapter="a", vendor_url="http://h/", vendor_key_env="MY_KEY")
    assert env_config.vendor_key({"MY_KEY": "k2"}).reveal() == "k2" and env_config.vendor_key({}) is None
    with pytest.raises(ValueError, match="cannot read the vendor key file"):
        ServerConfig(adapter="a", vendor_url="http://h/", vendor_key_file=str(tmp_path / "none")).vendor_key()
    assert Secret("").scrub("text") == "text"


def test_redact_url_drops_credentials_and_query() -> None:
    assert redact_url("https://u:p@api.example:8443/v1/zs?api_key=abc") == "https://api.example:8443/v1/zs"


def test_metrics_text_format() -> None:
    m = ServerMetrics()
    m.requests.inc("classify", "200")
    m.requests.inc("classify", "200")
    m.latency.observe(0.003, "classify")
    m.latency.observe(0.7, "classify")
    m.vendor_in_flight.add(1)
    text = m.render()
    assert 'craft_adapter_requests_total{endpoint="classify",status="200"} 2' in text
    assert 'craft_adapter_request_duration_seconds_bucket{endpoint="classify",le="0.0025"} 0' in text
    assert 'craft_adapter_request_duration_seconds_bucket{endpoint="classify",le="0.005"} 1' in text
    assert 'craft_adapter_request_duration_seconds_bucket{endpoint="classify",le="+Inf"} 2' in text
    assert 'craft_adapter_request_duration_seconds_count{endpoint="classify"} 2' in text
    assert "craft_adapter_vendor_calls_in_flight 1" in text and "craft_adapter_images_classified_total 0" in text
    assert text.endswith("\n") and all(line.startswith(("#", "craft_adapter_")) for line in text.splitlines())


TORCH_FREE = r"""
import importlib.abc, json, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "torchvision", "open_clip", "open_clip_train"}:
            raise ImportError(f"{name} is blocked: the server must not need it")
        return None

sys.meta_path.insert(0, Blocked())
from craft_adapter.artifact.synthetic import synthetic_adapter
from craft_adapter.serve.server.http_app import create_app
from craft_adapter.serve.server.settings import ServerConfig
import craft_adapter.cli.serving

synthetic_adapter(3).save(sys.argv[1])
app = create_app(ServerConfig(adapter=sys.argv[1], vendor_url="http://127.0.0.1:9/"))
from craft_adapter.testing.import_guard import heavy_modules
print(json.dumps(heavy_modules(sys.modules)))
"""


def test_server_imports_without_torch(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-c", TORCH_FREE, str(tmp_path / "a.safetensors")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


@pytest.mark.parametrize("make, extra, message", [
    ("probabilities", ["--vendor", "ftp://h/"], "vendor URL must be http"),
    ("probabilities", ["--vendor", "http://h/", "--key-file", "/nonexistent/key"], "cannot read the vendor key file"),
    ("probabilities", ["--vendor", "http://h/", "--workers", "2", "--port", "0"], "needs a fixed --port"),
    ("probabilities", ["--vendor", "http://h/", "--retries", "-1"], "must not be negative"),
    ("logits", ["--vendor", "http://h/", "--port", "0"], "fitted on vendor logits"),
    ("missing", ["--vendor", "http://h/", "--port", "0"], "does not exist"),
])
def test_serve_command_refuses_bad_setups_clearly(tmp_path, make: str, extra: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from craft_adapter.artifact.synthetic import synthetic_adapter
    from craft_adapter.cli import app

    path = tmp_path / "a.safetensors"
    if make != "missing":
        synthetic_adapter(3, logit_kind=make).save(path)
    r = CliRunner().invoke(app, ["serve", str(path), *extra])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
