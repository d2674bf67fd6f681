"""Fault benchmark: the adapter server in front of a vendor that fails 20% of its calls.

    .venv/bin/python benchmarks/server_faults.py [--duration 30] [--clients 32] [--fault-rate 0.2]
        [--retries 2,0] [--out benchmarks/results/server_faults.json]

The stub vendor fails each call with probability ``--fault-rate``, the fault drawn evenly from: a timeout (it
answers after 2 s; the server's vendor timeout is 0.5 s), HTTP 500, HTTP 429 with ``Retry-After: 1``, malformed
JSON (a 200 cut in half), and a well-formed answer with a wrong label set. Clients send single images (raw
PNG, 60%), Hugging Face requests (20%) and batches of 4 (20%) for ``--duration`` seconds, once per retry
setting. Every reply is sorted into:

- ``correct``: 200, and every label and probability equals the independently computed refined answer;
- ``clear_error``: 502, 503 or 504 with a JSON ``{"error", "type"}`` naming a vendor failure;
- ``wrong``: anything else, above all a 200 whose answer differs. The goal is zero.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import tempfile
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from serve_common import closed_loop, make_adapter, sample_images, start_server, start_stub, stub_expected

VENDOR_TYPES = {"vendor_unreachable", "vendor_rate_limited", "vendor_busy", "vendor_timeout", "vendor_error",
                "vendor_bad_reply", "vendor_rejected"}
FAULTS = "timeout,500,429,malformed,wrong_labels"


def verdict(r: httpx.Response, want: list[np.ndarray], names: list[str], hf: bool) -> str:
    """``correct``, ``clear_error:<type>`` or ``wrong:<why>`` for one reply."""
    if r.status_code in (502, 503, 504):
        try:
            doc = r.json()
        except ValueError:
            return "wrong:error_not_json"
        ok = isinstance(doc, dict) and doc.get("type") in VENDOR_TYPES and doc.get("error")
        return f"clear_error:{doc['type']}" if ok else "wrong:unclear_error"
    if r.status_code != 200:
        return f"wrong:http_{r.status_code}"
    doc = r.json()
    if hf:
        got = {e["label"]: e["score"] for e in doc}
        good = set(got) == set(names) and all(abs(got[c] - p) <= 1e-4 for c, p in zip(names, want[0], strict=True))
        return "correct" if good else "wrong:answer"
    answers = doc["results"] if "results" in doc else [doc]
    if len(answers) != len(want):
        return "wrong:count"
    for answer, p in zip(answers, want, strict=True):
        if answer["label"] != names[int(p.argmax())] or abs(answer["probability"] - float(p.max())) > 1e-4:
            return "wrong:answer"
        if any(abs(e["probability"] - float(p[names.index(e["label"])])) > 1e-4 for e in answer["top"]):
            return "wrong:answer"
    return "correct"


async def run_setting(retries: int, args: argparse.Namespace, tmp: Path) -> dict:
    """One retry setting: a fresh stub and server, ``duration`` seconds of mixed requests."""
    adapter_path = tmp / "adapter.safetensors"
    adapter = make_adapter(adapter_path, seed=3)
    names = adapter.class_names
    images = sample_images(128, seed=2)
    expected = [stub_expected(adapter, im) for im in images]
    stub = start_stub(tmp / f"stub-{retries}.log", args.stub_latency,
                      ["--fault-rate", str(args.fault_rate), "--faults", FAULTS, "--hang", "2", "--retry-after", "1",
                       "--seed", str(retries)])
    server = None
    try:
        server = start_server(adapter_path, stub.url + "/", tmp / f"server-{retries}.log", "--retries", str(retries),
                              "--vendor-timeout", "0.5", "--request-timeout", "10", "--backoff", "0.05")
        verdicts: Counter[str] = Counter()
        kinds: Counter[str] = Counter()
        failures: list[str] = []
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=args.clients)) as http:

            async def one(i: int) -> str:
                try:
                    kind, v = await send(i)
                except Exception as e:  # no reply, or one that cannot be read, is not a clear error either
                    kind, v = "unknown", f"wrong:exception_{type(e).__name__}"
                    if len(failures) < 5:
                        failures.append(f"{type(e).__name__}: {e}")
                verdicts[v] += 1
                kinds[f"{kind}:{v.split(':')[0]}"] += 1
                return "ok"

            async def send(i: int) -> tuple[str, str]:
                k, roll = i % len(images), (i * 7919) % 10
                if roll < 6:
                    kind, want, hf = "single", [expected[k]], False
                    r = await http.post(server.url + "/v1/classify?top_k=10", content=images[k],
                                        headers={"Content-Type": "image/png"})
                elif roll < 8:
                    kind, want, hf = "hugging_face", [expected[k]], True
                    r = await http.post(server.url + "/", json={"inputs": base64.b64encode(images[k]).decode(),
                                                                "parameters": {"candidate_labels": names}})
                else:
                    idx = [(k + j) % len(images) for j in range(4)]
                    kind, want, hf = "batch_of_4", [expected[j] for j in idx], False
                    r = await http.post(server.url + "/v1/classify/batch?top_k=10", json={
                        "images": [base64.b64encode(images[j]).decode() for j in idx]})
                return kind, verdict(r, want, names, hf)

            print(f"[retries {retries}] {args.clients} clients for {args.duration:g} s ...", flush=True)
            await closed_loop(args.clients, args.duration, one)
            injected = (await http.get(stub.url + "/stats")).json()["calls"]
            metrics = (await http.get(server.url + "/metrics")).text
    finally:
        if server is not None:
            server.stop()
        stub.stop()
    totals = Counter({k.split(":")[0]: 0 for k in ("correct", "clear_error", "wrong")})
    for v, n in verdicts.items():
        totals[v.split(":")[0]] += n
    retried = [ln for ln in metrics.splitlines() if ln.startswith("craft_adapter_vendor_retries_total ")]
    outcomes = {ln.split('"')[1]: float(ln.split()[-1]) for ln in metrics.splitlines()
                if ln.startswith("craft_adapter_vendor_calls_total{")}
    return {"retries": retries, "requests": sum(verdicts.values()), "totals": dict(totals),
            "verdicts": dict(verdicts), "by_request_kind": dict(sorted(kinds.items())),
            "vendor_calls_by_behaviour": injected,
            "injected_fault_share": 1 - injected.get("ok", 0) / max(sum(injected.values()), 1),
            "server_retries": float(retried[0].split()[-1]) if retried else 0.0, "server_vendor_calls": outcomes,
            "first_failures": failures}


def main() -> None:
    """Parse flags, run each retry setting, print and save."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--fault-rate", type=float, default=0.2)
    ap.add_argument("--stub-latency", type=float, default=0.005)
    ap.add_argument("--retries", default="2,0", help="comma-separated retry settings to run")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/server_faults.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for retries in (int(x) for x in args.retries.split(",")):
            row = asyncio.run(run_setting(retries, args, Path(tmp)))
            t = row["totals"]
            print(f"retries {retries}: {row['requests']} requests: {t['correct']} correct, {t['clear_error']} clear "
                  f"errors, {t['wrong']} wrong; vendor calls {row['vendor_calls_by_behaviour']} "
                  f"({100 * row['injected_fault_share']:.1f}% faulty), {row['server_retries']:.0f} retries")
            print(f"  verdicts {row['verdicts']}")
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"fault_rate": args.fault_rate, "faults": FAULTS.split(","),
                                    "clients": args.clients, "duration_s": args.duration, "results": rows},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
