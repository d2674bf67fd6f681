"""Size, package count and cold start of each install kind, in fresh venvs from the built wheel.

    .venv/bin/python benchmarks/install_kinds.py [--out benchmarks/results/install_kinds.json] [--no-gpu]

Kinds (issue 12): the floor (a fresh venv with only numpy, pillow, safetensors, httpx and onnxruntime), runtime
(bare ``pip install craft-adapter``), server (``[server]``), fit (``[fit]``), and gpu: the server kind with
onnxruntime-gpu instead of onnxruntime, made as the README says, and on the way the state of both installed,
which must warn with the fix. Installs come from the registry as pip is configured here, without the project's
constraints (on this machine torch comes from local disk).

- size: ``du -sm`` of the venv's lib folder (pip and setuptools included); packages: ``pip list`` rows;
- cold start, runtime: a fresh ``python`` process that loads the text adapter, wraps the local vendor (its own
  process, from the fit venv) and classifies one image: time from process start to the answer, RSS after it;
- cold start, server: ``craft-adapter serve`` started, its first ``POST /v1/classify`` answered, timed from
  process start; RSS of the server process after it;
- cold start, fit: ``craft-adapter vendor`` to its first zero-shot answer; and a tiny soft fit (2 shots,
  budget 50) end to end.

Each cold start is run 3 times (the first with whatever the page cache holds); the JSON keeps every run.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "install"))
from install_venvs import (  # noqa: E402 (the shared install machinery lives beside the CI test)
    KINDS,
    Venv,
    build_wheel,
    make_venv,
    run,
    start_vendor,
    text_fit,
)

FLOOR = ["numpy", "pillow", "safetensors", "httpx", "onnxruntime"]
GOALS_MB = {"runtime": 220, "server": 260}
REPEATS = 3
COLD_RUNTIME = """
import json, sys
from PIL import Image
from craft_adapter.serve import HttpZeroShotVendor, load_runtime
adapter, url, image = sys.argv[1:]
label = load_runtime(adapter, HttpZeroShotVendor(url), device="cpu").predict_one(Image.open(image)).label
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
print(json.dumps({"label": label, "rss_mb": rss}), flush=True)
"""


def describe(v: Venv) -> dict:
    """Size, package count and install time of a venv."""
    packages = v.packages()
    return {"size_mb": v.size_mb(), "packages": len(packages), "install_s": round(v.install_s, 1),
            "distributions": dict(sorted(packages.items()))}


def floor_venv(dest: Path) -> Venv:
    """The floor: a fresh venv with only the five packages the runtime cannot do without."""
    venv.EnvBuilder(with_pip=True, clear=True).create(dest)
    v = Venv("floor", dest)
    t0 = time.perf_counter()
    run([v.python, "-m", "pip", "install", "-q", *FLOOR], cwd=dest)
    v.install_s = time.perf_counter() - t0
    return v


def png(path: Path) -> Path:
    """A test image on disk."""
    Image.new("L", (28, 28), 128).save(path)
    return path


def cold_runtime(v: Venv, adapter: Path, vendor_url: str, image: Path, cwd: Path) -> dict:
    """Process start to first answer, and RSS after it, for the runtime in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([v.python, "-c", COLD_RUNTIME, str(adapter), vendor_url + "/", str(image)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    first_s = time.perf_counter() - t0
    proc.wait(60)
    if not line:
        raise RuntimeError(proc.stderr.read())
    return {"first_answer_s": round(first_s, 3), **json.loads(line)}


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_answer(url: str, request: dict, t0: float, timeout: float = 120.0) -> float:
    """Seconds from ``t0`` until ``POST url`` with ``request`` (httpx arguments) answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.post(url, **request, timeout=30).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"{url} never answered")


def cold_http(cmd: list[str], path: str, request: dict, cwd: Path) -> dict:
    """Process start to the first 200 on ``path`` of a server started by ``cmd``, and its RSS after it."""
    port = free_port()
    t0 = time.perf_counter()
    log = open(cwd / f"cold_{port}.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([*cmd, "--port", str(port)], cwd=cwd, stdout=log, stderr=log,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        first_s = first_answer(f"http://127.0.0.1:{port}{path}", request, t0)
        status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        rss = next(int(s.split()[1]) for s in status if s.startswith("VmRSS:")) / 1024
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    return {"first_answer_s": round(first_s, 3), "rss_mb": round(rss, 1)}


def gpu_kind(wheel: Path, work: Path, adapter: Path) -> dict:
    """The server kind, then onnxruntime-gpu beside onnxruntime (must warn), then swapped as the README says."""
    v = make_venv("server", wheel, work / "venv-gpu")
    before = v.packages()
    run([v.python, "-m", "pip", "install", "-q", "onnxruntime-gpu"], cwd=work)
    load = ("import warnings; warnings.simplefilter('always')\n"
            f"from craft_adapter.serve import ShippedAdapter; ShippedAdapter.load({str(adapter)!r}, device='cpu')\n")
    both = run([v.python, "-c", load], cwd=work, check=False, env={"PYTHONWARNINGS": "default"})
    t0 = time.perf_counter()
    run([v.python, "-m", "pip", "uninstall", "-q", "-y", "onnxruntime", "onnxruntime-gpu"], cwd=work)
    run([v.python, "-m", "pip", "install", "-q", "onnxruntime-gpu"], cwd=work)
    v.install_s = time.perf_counter() - t0
    after = v.packages()
    fixed = run([v.python, "-c", load], cwd=work, check=False, env={"PYTHONWARNINGS": "default"})
    providers = run([v.python, "-c", "import onnxruntime as o; print(o.get_available_providers())"], cwd=work,
                    check=False)
    return {**describe(v), "added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
            "both_installed_warning": [ln for ln in both.stderr.splitlines() if "OnnxruntimeConflictWarning" in ln],
            "after_fix_warning": [ln for ln in fixed.stderr.splitlines() if "OnnxruntimeConflictWarning" in ln],
            "after_fix_loads": fixed.returncode == 0, "providers": providers.stdout.strip(),
            "pip_check": v.pip_check().stdout.strip()}


def main() -> None:
    """Build, install, measure, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "install_kinds.json")
    parser.add_argument("--no-gpu", action="store_true", help="skip the gpu kind (downloads onnxruntime-gpu)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        wheel = build_wheel(work / "wheel")
        result: dict = {"wheel": {"name": wheel.name, "size_mb": round(wheel.stat().st_size / 2**20, 1),
                                  "build_s": round(time.perf_counter() - t0, 1)}, "kinds": {}, "cold_start": {}}
        result["kinds"]["floor"] = describe(floor_venv(work / "venv-floor"))
        venvs = {kind: make_venv(kind, wheel, work / f"venv-{kind}") for kind in KINDS}
        for kind, v in venvs.items():
            result["kinds"][kind] = {**describe(v), "pip_check": v.pip_check().stdout.strip()}
            print(kind, {k: result["kinds"][kind][k] for k in ("size_mb", "packages", "install_s")}, flush=True)
        image = png(work / "image.png")
        buf = io.BytesIO()
        Image.open(image).save(buf, format="PNG")
        classify = {"content": buf.getvalue(), "headers": {"Content-Type": "image/png"}}
        zero_shot = {"json": {"inputs": base64.b64encode(buf.getvalue()).decode(),  # the HF client's request
                              "parameters": {"candidate_labels": ["shirt", "sneaker"]}}}
        vendor = start_vendor(venvs["fit"], work)
        try:
            adapter = text_fit(venvs["fit"], vendor.url, work / "fitted" / "text.safetensors")
            cold = result["cold_start"]
            cold["runtime"] = [cold_runtime(venvs["runtime"], adapter, vendor.url, image, work)
                               for _ in range(REPEATS)]
            serve = venvs["server"].cli("serve", str(adapter), "--vendor", vendor.url + "/")
            cold["server"] = [cold_http(serve, "/v1/classify", classify, work) for _ in range(REPEATS)]
            cold["fit_vendor"] = [cold_http(venvs["fit"].cli("vendor", "--device", "cpu"), "/", zero_shot, work)
                                  for _ in range(REPEATS)]
            t0 = time.perf_counter()
            soft = work / "soft.safetensors"
            run(venvs["fit"].cli("fit", "-o", str(soft), "--shots", "2", "--budget", "50", "--no-cache"), cwd=work)
            cold["fit_tiny_soft_fit_s"] = round(time.perf_counter() - t0, 1)
            if not args.no_gpu:
                result["kinds"]["gpu"] = gpu_kind(wheel, work, adapter)
        finally:
            vendor.stop()
    result["goals_mb"] = GOALS_MB
    result["machine"] = {"cores": os.cpu_count(), "python": platform.python_version(),
                         "load_average": os.getloadavg()}
    for kind, k in result["kinds"].items():
        print(f"{kind:>8}: {k['size_mb']:>5} MB, {k['packages']:>3} packages, installed in {k['install_s']} s")
    for kind, runs in result["cold_start"].items():
        print(f"cold {kind}: {runs}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
