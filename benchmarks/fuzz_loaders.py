"""Fuzz the adapter loaders: every mutated or truncated file must end in a clean AdapterError or a correct load.

    .venv/bin/python benchmarks/fuzz_loaders.py [--examples 11000] [--seed 0] [--headroom-mib 768]

Seeds: a soft adapter with a prompt.ctx, a text adapter, and their refiner as ``torch.onnx.export`` writes it (made in a
child process, so torch never loads here) and as ``build_refiner_onnx`` writes it. Mutations (hypothesis;
``fuzz_mutations.py``, ``fuzz_onnx_mutations.py``): byte flips, truncation, header-length edits, safetensors header JSON
edits (dtype, shape, offsets, huge and negative numbers, deep nesting, tensor table, metadata map), metadata edits
(class count against the tensors, types, huge strings, deep nesting, NaN), NaN/inf/huge tensor values; for ONNX,
structured graph edits (extra or swapped nodes, other ops and domains, subgraphs, functions, external data, inputs,
outputs, initializers, attributes, opsets) and protobuf byte flips. A loaded adapter must refine finite scores to finite
``[n, C]`` (an ONNX one: equal to the numpy forward of the initializers ``onnx`` parses from the same bytes). The run
has an address-space limit (RLIMIT_AS = the warmed-up process + headroom), so a loader that tries to allocate gigabytes
fails it.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis
import numpy as np
import onnx
import onnxruntime as ort
from fuzz_mutations import mutate_safetensors
from fuzz_onnx_mutations import mutate_onnx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from onnx import numpy_helper

from craft_adapter.artifact.adapter_file import REFINER_KEYS, Adapter, AdapterError, refiner_input

# isort: split
from craft_adapter.artifact.onnx_graph import build_refiner_onnx
from craft_adapter.serve.shipped import ShippedAdapter

CASE_TIMEOUT_S = 10.0
RESULTS = Path(__file__).parent / "results" / "fuzz_loaders.json"
LOADERS = ("Adapter.from_bytes", "Adapter.load", "ShippedAdapter.load(.safetensors)", "ShippedAdapter.load(.onnx)")
SHARE = {"Adapter.from_bytes": 0.3, "Adapter.load": 0.1, "ShippedAdapter.load(.safetensors)": 0.25,
         "ShippedAdapter.load(.onnx)": 0.35}


class FuzzFailure(AssertionError):
    """A case ended in something other than a clean AdapterError or a correct load."""


# -- seeds ----------------------------------------------------------------------------------------------------------

def seed_adapters() -> list[Adapter]:
    """A soft adapter with a prompt.ctx (logits) and a text adapter (probabilities), small so headers dominate."""
    rng = np.random.default_rng(0)
    out = []
    for c, h, mode, kind in ((5, 8, "soft", "logits"), (7, 16, "text", "probabilities")):
        r = {"refiner.fc1.weight": rng.normal(0, 0.3, (h, c)), "refiner.fc1.bias": rng.normal(0, 0.1, h),
             "refiner.fc2.weight": rng.normal(0, 0.3, (c, h)), "refiner.fc2.bias": rng.normal(0, 0.1, c)}
        out.append(Adapter([f"class {i}" for i in range(c)], "a photo of a {}.", mode, kind, 100.0,
                           {k: v.astype(np.float32) for k, v in r.items()}, backend={"name": "fuzz"},
                           fit={"shots": 4}, ctx=rng.normal(0, 0.02, (4, 16)).astype(np.float32) if c == 5 else None,
                           prompt_reading="a photo of a" if c == 5 else ""))
    return out


EXPORT_CHILD = """
import sys, warnings
warnings.simplefilter("ignore")
from craft_adapter.artifact.adapter_file import Adapter
from craft_adapter.export.onnx_export import trace_refiner
sys.stdout.buffer.write(trace_refiner(Adapter.from_bytes(sys.stdin.buffer.read())).SerializeToString())
"""


def exported_onnx(adapter: Adapter) -> bytes:
    """``adapter``'s refiner as ``torch.onnx.export`` writes it, traced in a child process (torch stays out)."""
    done = subprocess.run([sys.executable, "-c", EXPORT_CHILD], input=adapter.to_bytes(), capture_output=True,
                          timeout=300, check=True)
    return done.stdout


def seeds(exported: bytes | None = None) -> dict[str, list[bytes]]:
    """Seed files per format: safetensors (soft and text) and ONNX (torch-exported and built)."""
    adapters = seed_adapters()
    onnx_seeds = [build_refiner_onnx(adapters[1])] + ([exported] if exported else [])
    return {"safetensors": [a.to_bytes() for a in adapters], "onnx": onnx_seeds}


# -- running cases --------------------------------------------------------------------------------------------------

def _scores(kind: str, c: int, n: int = 4) -> np.ndarray:
    rng = np.random.default_rng(c)
    if kind == "probabilities":
        return rng.dirichlet(np.ones(c), n).astype(np.float32)
    return rng.normal(20, 5, (n, c)).astype(np.float32)


def _onnx_forward(raw: bytes, x: np.ndarray) -> np.ndarray:
    """The refiner computed in numpy from the initializers that ``onnx`` itself parses out of ``raw``, after an
    independent look (with the ``onnx`` package) that the accepted model is the plain refiner graph."""
    m = onnx.ModelProto()
    m.ParseFromString(raw)
    g = m.graph
    plain = (
        [n.op_type for n in g.node] == ["Gemm", "Relu", "Gemm", "Add", "Softmax"]
        and all(n.domain in ("", "ai.onnx") and not any(a.g.node or a.graphs for a in n.attribute) for n in g.node)
        and [o.domain for o in m.opset_import] in ([""], ["ai.onnx"]) and not m.functions and not m.training_info
        and [v.name for v in g.input] == ["refiner_input"] and len(g.output) == 2 and not g.sparse_initializer
        and sorted(t.name for t in g.initializer) == sorted(REFINER_KEYS)
        and not any(t.external_data or t.data_location for t in g.initializer))
    if not plain:
        raise FuzzFailure("accepted an ONNX model that the onnx package does not see as the plain refiner")
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in g.initializer}
    h = np.maximum(x @ w["refiner.fc1.weight"].T + w["refiner.fc1.bias"], 0)
    return x + h @ w["refiner.fc2.weight"].T + w["refiner.fc2.bias"]


def _check_output(out: np.ndarray, c: int, what: str) -> None:
    if out.shape[1:] != (c,) or not np.isfinite(out).all():
        raise FuzzFailure(f"{what}: loaded, but refine gave shape {out.shape} / non-finite values")


def load_case(loader: str, raw: bytes, tmp: Path) -> None:
    """Run one loader on ``raw``; on success check the loaded adapter's output. AdapterError passes through."""
    if loader == "Adapter.from_bytes":
        a = Adapter.from_bytes(raw, "case")
    elif loader == "Adapter.load":
        (tmp / "case.safetensors").write_bytes(raw)
        a = Adapter.load(tmp / "case.safetensors")
    else:
        path = tmp / ("case.onnx" if loader.endswith("(.onnx)") else "case.safetensors")
        path.write_bytes(raw)
        s = ShippedAdapter.load(path, device="cpu")
        scores = _scores(s.logit_kind, s.n_classes)
        refined, probs = s.refine(scores)
        _check_output(refined, s.n_classes, loader)
        _check_output(probs, s.n_classes, loader)
        x = refiner_input(scores, s.logit_kind).astype(np.float64)
        want = _onnx_forward(raw, x) if path.suffix == ".onnx" else Adapter.from_bytes(raw).refine(scores)
        if np.abs(refined - want).max() > 1e-4 * (1 + np.abs(want).max()):
            raise FuzzFailure(f"{loader}: onnxruntime's output differs from the refiner in the file")
        return
    _check_output(a.refine(_scores(a.logit_kind, a.n_classes)), a.n_classes, loader)


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout(f"case ran over {CASE_TIMEOUT_S} s")


class Tally:
    """Outcomes, reasons and timings of a campaign; failures are kept (or raised, when ``strict``)."""

    def __init__(self, tmp: Path, strict: bool = False) -> None:
        self.tmp, self.strict = tmp, strict
        self.outcomes: dict[str, Counter[str]] = {k: Counter() for k in LOADERS}
        self.reasons: dict[str, Counter[str]] = {k: Counter() for k in LOADERS}
        self.failures: list[dict[str, str]] = []
        self.slowest = {"seconds": 0.0, "loader": "", "case": ""}
        self.total = 0

    def run(self, loader: str, raw: bytes, what: str) -> None:
        """One case: load, classify, time; a timeout or a foreign exception is a failure."""
        self.total += 1
        signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
        start = time.perf_counter()
        try:
            load_case(loader, raw, self.tmp)
            outcome = "loaded"
        except AdapterError as e:
            outcome = "rejected"
            if not str(e) or not isinstance(e, ValueError):
                outcome = "failed"
                self._fail(loader, what, raw, f"AdapterError without a message: {e!r}")
            self.reasons[loader][re.sub(r"\d+", "N", str(e).split(": ", 1)[-1])[:70]] += 1
        except BaseException as e:  # noqa: BLE001 (anything else, MemoryError and timeouts included, is a finding)
            if isinstance(e, KeyboardInterrupt):
                raise
            outcome = "failed"
            self._fail(loader, what, raw, f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        seconds = time.perf_counter() - start
        self.outcomes[loader][outcome] += 1
        if seconds > self.slowest["seconds"]:
            self.slowest = {"seconds": seconds, "loader": loader, "case": what[:200]}

    def _fail(self, loader: str, what: str, raw: bytes, error: str) -> None:
        self.failures.append({"loader": loader, "case": what[:300], "error": error, "bytes": len(raw)})
        if self.strict:
            raise FuzzFailure(f"{loader} on [{what[:300]}]: {error}")


def campaign(tally: Tally, loader: str, files: list[bytes], n: int, seed: int | None = None,
             derandomize: bool = False) -> None:
    """``n`` hypothesis-generated cases of ``loader`` mutated from ``files``."""
    mutate: Callable[[st.DataObject, bytes], tuple[bytes, str]] = (
        mutate_onnx if loader.endswith("(.onnx)") else mutate_safetensors)

    @settings(max_examples=n, deadline=None, database=None, derandomize=derandomize, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def case(data: st.DataObject) -> None:
        raw, what = mutate(data, data.draw(st.sampled_from(files)))
        tally.run(loader, raw, what)

    (hypothesis_seed(seed + LOADERS.index(loader))(case) if seed is not None else case)()


# -- the campaign ---------------------------------------------------------------------------------------------------

def _vm_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def main() -> None:
    """Build seeds, limit the address space, fuzz every loader, print and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=11_000, help="total cases over the four loaders")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--headroom-mib", type=int, default=768, help="address space allowed above the warm process")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    files = seeds(exported_onnx(seed_adapters()[1]))
    signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory() as d:
        tally = Tally(Path(d))
        for loader in LOADERS:  # warm-up: every loader once on a valid seed, before the limit
            tally.run(loader, files["onnx" if loader.endswith("(.onnx)") else "safetensors"][0], "warm-up")
        if tally.failures:
            raise SystemExit(f"a valid seed failed: {tally.failures}")
        tally = Tally(Path(d))
        limit = (_vm_kib("VmSize") << 10) + (args.headroom_mib << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        try:  # the limit is really in force: one allocation of its size must fail
            bytearray(limit)
            raise SystemExit("RLIMIT_AS is not enforced here; the memory bound would be unproven")
        except MemoryError:
            pass
        start = time.perf_counter()
        for loader in LOADERS:
            fmt = "onnx" if loader.endswith("(.onnx)") else "safetensors"
            campaign(tally, loader, files[fmt], round(args.examples * SHARE[loader]), seed=args.seed)
            print(f"{loader}: {dict(tally.outcomes[loader])}", flush=True)
        total_s = time.perf_counter() - start
    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/fuzz_loaders.py", *sys.argv[1:]]), "cases": tally.total,
        "outcomes": {k: dict(v) for k, v in tally.outcomes.items()}, "failures": tally.failures,
        "total_seconds": round(total_s, 2), "slowest_case": {**tally.slowest, "seconds": round(tally.slowest["seconds"],
                                                                                               4)},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "address_space_limit_mib": round(limit / (1 << 20), 1), "headroom_mib": args.headroom_mib,
        "limit_verified": "bytearray(limit) raised MemoryError under the limit",
        "case_timeout_s": CASE_TIMEOUT_S, "seed": args.seed, "versions": {
            m.__name__: m.__version__ for m in (np, onnx, ort, hypothesis)} | {"python": sys.version.split()[0]},
        "seed_files": {k: [len(f) for f in v] for k, v in files.items()},
        "top_rejections": {k: dict(v.most_common(12)) for k, v in tally.reasons.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "top_rejections"}, indent=2))
    if tally.failures:
        raise SystemExit(f"{len(tally.failures)} case(s) failed")


if __name__ == "__main__":
    main()
