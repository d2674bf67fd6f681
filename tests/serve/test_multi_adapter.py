"""Many adapters behind one server: routes by name, versions, hot reload, memory-bounded LRU, per-adapter metrics.

A real uvicorn server on 127.0.0.1 (in a thread, so the test can look at its store), a real stub vendor, real
onnxruntime; every expected answer is computed independently (stub scores, the adapter's numpy forward).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from huggingface_hub import InferenceClient
from PIL import Image

from craft_adapter.artifact.adapter_file import Adapter
from craft_adapter.artifact.onnx_graph import build_refiner_onnx, metadata_props
from craft_adapter.artifact.synthetic import synthetic_adapter

# isort: split
from craft_adapter.serve.server.adapter_routes import MultiOptions
from craft_adapter.serve.server.http_app import create_app
from craft_adapter.serve.server.logs import SERVER_LOGGER
from craft_adapter.serve.server.settings import ServerConfig
from craft_adapter.testing.stub_vendor import StubVendor, running_stub, stub_probabilities


def png(seed: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(
        buf, format="PNG")
    return buf.getvalue()


def make(n: int, seed: int, names: list[str] | None = None) -> Adapter:
    a = synthetic_adapter(n, seed=seed)
    if names:
        a.class_names = list(names)
    a.template = f"a photo of a {{}}, seed {seed}."
    return a


def want(adapter: Adapter, image: bytes) -> np.ndarray:
    """The refined probabilities the server must answer for ``image``."""
    scores = stub_probabilities(base64.b64encode(image).decode(), adapter.class_names).astype(np.float32)
    z = adapter.refine(scores[None])[0]
    p = np.exp(z - z.max())
    return p / p.sum()


class ServerThread:
    """``create_app`` on uvicorn in a daemon thread, on a free loopback port."""

    def __init__(self, folder: Path, vendor: str, options: MultiOptions) -> None:
        config = ServerConfig(adapter=str(folder), vendor_url=vendor + "/", request_timeout_s=10, log_level="info",
                              access_log=False)
        self.app = create_app(config, adapters=folder, options=options)
        self.records: list[logging.LogRecord] = []
        catcher = logging.Handler()
        catcher.emit = self.records.append  # type: ignore[method-assign]
        logging.getLogger(SERVER_LOGGER).addHandler(catcher)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_config=None,
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.store = self.app.state.store

    def logged(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


@pytest.fixture(scope="module")
def stub() -> Iterator[StubVendor]:
    with running_stub() as s:
        yield s


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict[str, Adapter]]:
    adapters = {"shoes": make(4, 1, ["boot", "sandal", "sneaker", "heel"]), "bags": make(3, 2),
                "big": make(40, 3)}
    for name, a in adapters.items():
        a.save(tmp_path / f"{name}.safetensors")
    onnx = make(5, 4)
    (tmp_path / "exported.onnx").write_bytes(build_refiner_onnx(onnx, metadata_props(onnx)))
    adapters["exported"] = onnx
    (tmp_path / "notes.txt").write_text("not an adapter")
    return tmp_path, adapters


def serve(folder: Path, stub: StubVendor, **options: object) -> ServerThread:
    return ServerThread(folder, stub.url, MultiOptions(**{"poll_s": 0.1, **options}))


def classify(url: str, ref: str, image: bytes, **kw: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/adapters/{ref}/classify", content=image, headers={"Content-Type": "image/png"},
                      timeout=20, **kw)


def check(answer: dict, adapter: Adapter, image: bytes) -> None:
    p = want(adapter, image)
    assert answer["label"] == adapter.class_names[int(p.argmax())]
    assert answer["probability"] == pytest.approx(float(p.max()), abs=1e-5)


def test_every_adapter_answers_by_name_with_its_own_labels(folder, stub: StubVendor) -> None:
    path, adapters = folder
    srv = serve(path, stub)
    try:
        for i, (name, a) in enumerate(adapters.items()):
            image = png(i)
            r = classify(srv.url, name, image)
            assert r.status_code == 200, r.text
            check(r.json(), a, image)
            version = r.json()["adapter"]["version"]
            assert r.json()["adapter"]["name"] == name and r.headers["x-adapter-version"] == f"{name}@{version}"
            r = httpx.post(f"{srv.url}/v1/adapters/{name}/classify/batch", timeout=20,
                           json={"images": [base64.b64encode(png(s)).decode() for s in (7, 8)]})
            assert r.status_code == 200, r.text
            for s, got in zip((7, 8), r.json()["results"], strict=True):
                check(got, a, png(s))
        listing = httpx.get(srv.url + "/v1/adapters").json()["adapters"]
        assert [(x["name"], x["classes"], x["loaded"]) for x in listing] == [
            ("bags", 3, True), ("big", 40, True), ("exported", 5, True), ("shoes", 4, True)]
        one = httpx.get(srv.url + "/v1/adapters/shoes").json()
        assert one["classes"] == ["boot", "sandal", "sneaker", "heel"] and one["template"] == adapters["shoes"].template
    finally:
        srv.stop()


def test_hugging_face_client_per_adapter(folder, stub: StubVendor) -> None:
    path, adapters = folder
    srv = serve(path, stub)
    try:
        image = png(3)
        p = want(adapters["shoes"], image)
        answer = InferenceClient(model=f"{srv.url}/v1/adapters/shoes").zero_shot_image_classification(
            image, candidate_labels=["boot", "sandal", "sneaker", "heel"])
        assert [e.label for e in answer] == [adapters["shoes"].class_names[i] for i in np.argsort(-p, kind="stable")]
        assert [e.score for e in answer] == pytest.approx(sorted(p, reverse=True), abs=1e-5)
        r = httpx.post(f"{srv.url}/v1/adapters/bags/zero-shot-image-classification", timeout=20,
                       json={"inputs": base64.b64encode(image).decode(), "parameters": {"candidate_labels": ["boot"]}})
        assert r.status_code == 400 and "not classes of adapter bags" in r.json()["error"]
    finally:
        srv.stop()


def test_unknown_names_bad_pins_and_single_adapter_routes_are_refused(folder, stub: StubVendor) -> None:
    path, _ = folder
    srv = serve(path, stub)
    try:
        image = png(1)
        assert classify(srv.url, "nope", image).json()["type"] == "unknown_adapter"
        assert classify(srv.url, "shoes@zz", image).status_code == 400
        assert classify(srv.url, "shoes@0000", image).json()["type"] == "unknown_version"
        assert classify(srv.url, "notes", image).status_code == 404  # .txt is not an adapter
        assert httpx.post(srv.url + "/v1/classify", content=image).status_code == 404
        assert httpx.get(srv.url + "/readyz").status_code == 200
    finally:
        srv.stop()


def test_hot_reload_is_atomic_pins_old_versions_and_refuses_bad_files(folder, stub: StubVendor) -> None:
    path, adapters = folder
    srv = serve(path, stub)
    try:
        image = png(5)
        old = classify(srv.url, "shoes", image).json()["adapter"]["version"]
        stub.latency_s = 1.0
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(classify, srv.url, "shoes", image)  # started on the old version
            time.sleep(0.3)
            new_adapter = make(4, 99, ["boot", "sandal", "sneaker", "heel"])
            new_adapter.save(path / "shoes.safetensors")
            deadline = time.monotonic() + 10
            while srv.store.resolve("shoes").id == old and time.monotonic() < deadline:
                time.sleep(0.05)
            stub.latency_s = 0.0
            finished = in_flight.result()
        assert finished.json()["adapter"]["version"] == old
        check(finished.json(), adapters["shoes"], image)
        now = classify(srv.url, "shoes", image).json()
        assert now["adapter"]["version"] != old
        check(now, new_adapter, image)
        pinned = classify(srv.url, f"shoes@{old[:6]}", image).json()  # the old version stays pinnable
        assert pinned["adapter"]["version"] == old
        check(pinned, adapters["shoes"], image)

        current = now["adapter"]["version"]
        (path / "shoes.safetensors").write_bytes(b"not an adapter at all")
        time.sleep(0.5)
        assert "adapter shoes refused" in srv.logged() and f"version {current} keeps serving" in srv.logged()
        still = classify(srv.url, "shoes", image).json()
        assert still["adapter"]["version"] == current
        check(still, new_adapter, image)

        make(3, 5).save(path / "fresh.safetensors")
        (path / "bags.safetensors").unlink()
        time.sleep(0.5)
        assert classify(srv.url, "fresh", image).status_code == 200
        assert classify(srv.url, "bags", image).status_code == 404
    finally:
        srv.stop()


def test_memory_budget_evicts_least_recently_used(folder, stub: StubVendor) -> None:
    path, adapters = folder
    small = srv_cost = None
    srv = serve(path, stub, memory_budget_mb=0.2)  # room for one small adapter (about 0.12 MB) at a time
    try:
        for name in ("shoes", "bags", "shoes", "exported"):
            image = png(len(name))
            r = classify(srv.url, name, image)
            assert r.status_code == 200
            check(r.json(), adapters[name], image)
        small = srv.store.loaded_count()
        srv_cost = srv.store.loaded_bytes
        loaded = {x["name"] for x in httpx.get(srv.url + "/v1/adapters").json()["adapters"] if x["loaded"]}
    finally:
        srv.stop()
    assert small == 1 and srv_cost <= 0.2 * 2**20 and loaded == {"exported"}


def test_per_adapter_metrics_have_bounded_labels(folder, stub: StubVendor) -> None:
    path, _ = folder
    srv = serve(path, stub, metrics_top_n=2)
    try:
        for name in ("shoes", "bags", "big", "exported", "nope"):
            classify(srv.url, name, png(2))
        text = httpx.get(srv.url + "/metrics").text
    finally:
        srv.stop()
    adapters = {line.split('adapter="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("craft_adapter_adapter_requests_total{")}
    assert adapters == {"shoes", "bags", "other"}
    assert 'craft_adapter_adapter_requests_total{adapter="other",outcome="unknown_adapter"} 1' in text
    assert 'craft_adapter_adapter_requests_total{adapter="other",outcome="ok"} 2' in text
    assert "craft_adapter_adapters_known 4" in text and "craft_adapter_adapters_loaded 4" in text


def test_a_registry_file_names_adapters_anywhere_and_bad_ones_are_refused(tmp_path: Path, stub: StubVendor,
                                                                          capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "models").mkdir()
    a, b = make(3, 21), make(6, 22)
    a.save(tmp_path / "models" / "v7.safetensors")
    b.save(tmp_path / "other.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 64)
    registry = tmp_path / "registry.json"
    registry.write_text('{"adapters": {"alpha": "models/v7.safetensors", "beta": "other.safetensors", '
                        '"gamma": "broken.safetensors", "bad/name": "other.safetensors"}}')
    srv = ServerThread(registry, stub.url, MultiOptions(poll_s=0.1))
    try:
        assert [x["name"] for x in httpx.get(srv.url + "/v1/adapters").json()["adapters"]] == ["alpha", "beta"]
        startup_log = capsys.readouterr().err  # the first scan runs in create_app, before the test's log catcher
        assert "adapter gamma refused" in startup_log and "a name is [A-Za-z0-9._-]" in startup_log
        for name, adapter in (("alpha", a), ("beta", b)):
            check(classify(srv.url, name, png(4)).json(), adapter, png(4))
    finally:
        srv.stop()
    registry.write_text("[1, 2]")
    from craft_adapter.artifact.adapter_file import AdapterError

    with pytest.raises(AdapterError, match="a registry is JSON"):
        ServerThread(registry, stub.url, MultiOptions())


def test_the_cli_serves_a_folder_and_survives_idle_sockets(folder, stub: StubVendor, tmp_path: Path) -> None:
    import socket

    from server_process import ServerProcess

    root, adapters = folder
    srv = ServerProcess(["--vendor", stub.url, "--adapters", str(root), "--adapters-poll", "0.2", "--port", "0"],
                        tmp_path / "serve.log")
    try:
        image = png(7)
        r = classify(srv.url, "shoes", image)
        assert r.status_code == 200, r.text
        check(r.json(), adapters["shoes"], image)
        host, port = srv.url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(1100)]  # past uvicorn's old 1,024
        try:
            assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200
            assert classify(srv.url, "bags", image).status_code == 200
        finally:
            for s in idle:
                s.close()
    finally:
        assert srv.stop() in (0, -15)  # uvicorn re-raises SIGTERM once its graceful shutdown is done
