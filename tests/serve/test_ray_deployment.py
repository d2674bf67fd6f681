"""Ray Serve: a local Ray cluster, 2 replicas, 50 adapters; every answer equals the one-process server's.

Skipped unless ``ray[serve]`` is installed (it is optional). Real Ray, real HTTP through Ray's proxy, a real
stub vendor; the one-process server is the reference.
"""

from __future__ import annotations

import base64
import socket
import time
from pathlib import Path

import httpx
import pytest
from test_multi_adapter import ServerThread, make, png

from craft_adapter.serve.server.adapter_routes import MultiOptions
from craft_adapter.testing.stub_vendor import StubVendor, serve_stub_in_thread

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
N_ADAPTERS = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replicas_answer_fifty_adapters_like_one_process(tmp_path: Path) -> None:
    from craft_adapter.serve.ray_deployment import build

    started = time.monotonic()
    for i in range(N_ADAPTERS):
        make(3 + i % 5, 1000 + i).save(tmp_path / f"task{i:02d}.safetensors")
    stub = StubVendor()
    serve_stub_in_thread(stub)
    single = ServerThread(tmp_path, stub.url, MultiOptions(poll_s=1.0))
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"adapters": str(tmp_path), "vendor_url": stub.url + "/", "replicas": "2",
                         "request_timeout_s": "20"}), name="craft", route_prefix="/")
        replicas = serve.status().applications["craft"].deployments["AdapterReplica"].replica_states
        assert replicas.get("RUNNING") == 2, replicas
        ray_url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=60) as client:
            for round_ in range(2):
                for i in range(N_ADAPTERS):
                    name, image = f"task{i:02d}", png(i + 100 * round_)
                    path = f"/v1/adapters/{name}/classify?top_k=3&vendor_scores=true"
                    got = client.post(ray_url + path, content=image, headers={"Content-Type": "image/png"})
                    want = client.post(single.url + path, content=image, headers={"Content-Type": "image/png"})
                    assert got.status_code == want.status_code == 200, got.text
                    g, w = got.json(), want.json()
                    assert g["adapter"] == w["adapter"] and g["label"] == w["label"]
                    assert [t["label"] for t in g["top"]] == [t["label"] for t in w["top"]]
                    assert [t["probability"] for t in g["top"]] == pytest.approx(
                        [t["probability"] for t in w["top"]], abs=1e-6)
                    assert g["vendor_scores"] == pytest.approx(w["vendor_scores"], abs=1e-7)
            hf = {"inputs": base64.b64encode(png(7)).decode()}
            g, w = (client.post(url + "/v1/adapters/task03", json=hf).json() for url in (ray_url, single.url))
            assert [x["label"] for x in g] == [x["label"] for x in w]
            assert [x["score"] for x in g] == pytest.approx([x["score"] for x in w], abs=1e-6)
            assert client.post(ray_url + "/v1/adapters/nope/classify", content=png(1)).status_code == 404
            seen = client.get(ray_url + "/v1/replicas").json()
        counts = {replica: len(refs) for replica, refs in seen.items()}
        assert set().union(*map(set, seen.values())) == {f"task{i:02d}@" + single.store.resolve(f"task{i:02d}").id
                                                         for i in range(N_ADAPTERS)}
        print(f"\nray test: {time.monotonic() - started:.1f} s; adapters answered per replica: {counts}")
    finally:
        serve.shutdown()
        ray.shutdown()
        single.stop()
        stub.shutdown()
        stub.server_close()
