"""Text-mode fit speed against a slow vendor: a Hugging Face-protocol stub on loopback that answers every call
after a fixed latency (default 50 ms), in its own process. A fit of 20,000 vendor calls at concurrency 32
is compared with the ideal ``calls * latency / concurrency``.

    .venv/bin/python benchmarks/text_speed.py
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
RESULTS = Path(__file__).resolve().parent / "results"


def serve_stub(latency: float) -> None:
    """Run the stub vendor forever, printing its URL first."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            labels = body["parameters"]["candidate_labels"]
            key = hashlib.sha256(base64.b64decode(body["inputs"]) + body["parameters"]["hypothesis_template"]
                                 .encode()).digest()
            p = np.random.default_rng(int.from_bytes(key[:8], "little")).dirichlet(np.ones(len(labels)))
            time.sleep(latency)
            out = json.dumps([{"label": c, "score": float(s)} for c, s in zip(labels, p, strict=True)]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args) -> None:
            pass

    ThreadingHTTPServer.request_queue_size = 256  # the default backlog of 5 resets bursts of 32 connections
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


def main() -> None:
    """Start the stub, run one text-mode fit, compare with the ideal."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--stub", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stub:
        serve_stub(args.latency)
        return
    from craft_adapter.reference.task import reference_train
    from craft_adapter.serve import HttpZeroShotVendor
    from craft_adapter.training.api import fit_adapter, use_passive_omp_wait
    from craft_adapter.training.config import FitConfig

    use_passive_omp_wait()  # before torch loads

    proc = subprocess.Popen([sys.executable, __file__, "--stub", "--latency", str(args.latency)],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        cfg = FitConfig(shots=16, seed=1, prompt="text", budget=args.calls, concurrency=args.concurrency)
        train = reference_train(16, 1)
        t0 = time.perf_counter()
        calls = fit_adapter(train, HttpZeroShotVendor(url), cfg).record.meter["vendor_calls"]
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ideal = calls * args.latency / args.concurrency
    print(f"{calls} vendor calls at {1000 * args.latency:.0f} ms, concurrency {args.concurrency}: "
          f"{wall:.1f}s against an ideal {ideal:.1f}s ({wall / ideal:.2f}x)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "text_speed.json").write_text(json.dumps({
        "vendor_calls": calls, "latency_s": args.latency, "concurrency": args.concurrency,
        "wall_s": wall, "ideal_s": ideal, "ratio": wall / ideal, "command": "python benchmarks/text_speed.py"},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
