"""Install kinds, as a user gets them: the built wheel in a fresh venv per kind, and each kind's smoke path.

Shared by the CI check (``test_install_kinds.py``) and the measurements (``benchmarks/install_kinds.py``).
The wheel is built from a copy of the checkout's files (tracked and untracked-but-not-ignored), so the checkout
gains no ``build/`` folder. Installs come from the registry as pip is configured on this machine, without the
project's constraints: a user's ``pip install`` does not have them. Every command runs with its working
directory outside the checkout, so nothing can import the source tree instead of the installed package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import venv
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
KINDS = {"runtime": "", "server": "[server]", "fit": "[fit]"}  # kind -> the extra after the wheel's path
# distributions each kind must have, and must not have (names as pip lists them, normalised)
PRESENT = {
    "runtime": {"numpy", "pillow", "safetensors", "onnxruntime", "httpx"},
    "server": {"numpy", "pillow", "safetensors", "onnxruntime", "httpx", "starlette", "uvicorn", "httptools",
               "python-multipart", "aiohttp", "typer", "rich"},
    "fit": {"torch", "open-clip-torch", "cma", "onnx", "onnxruntime", "typer", "rich"},
}
ABSENT = {
    "runtime": {"torch", "torchvision", "open-clip-torch", "onnx", "cma", "typer", "rich", "starlette", "uvicorn",
                "aiohttp", "onnxruntime-gpu"},
    "server": {"torch", "torchvision", "open-clip-torch", "onnx", "cma", "onnxruntime-gpu"},
    "fit": {"starlette", "uvicorn", "onnxruntime-gpu"},
}
QUIET_PIP = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONWARNINGS": "ignore"}


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return name.lower().replace("_", "-").replace(".", "-")


def run(cmd: list[str], cwd: Path, timeout: float = 900, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``cwd``; with ``check``, fail with its output if it exits non-zero."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **QUIET_PIP, **(env or {})})
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-3000:]}")
    return proc


def build_wheel(dest: Path) -> Path:
    """Build the wheel from a copy of the checkout's files; its path."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    src = dest / "src"
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest / "dist"), str(src)], cwd=dest)
    wheels = list((dest / "dist").glob("craft_adapter-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@dataclass
class Venv:
    """A fresh venv holding one install kind."""

    kind: str
    path: Path
    install_s: float = 0.0

    @property
    def bin(self) -> Path:
        """Its scripts folder."""
        return self.path / "bin"

    @property
    def python(self) -> str:
        """Its interpreter."""
        return str(self.bin / "python")

    def cli(self, *args: str) -> list[str]:
        """The ``craft-adapter`` command line of this venv."""
        return [str(self.bin / "craft-adapter"), *args]

    def packages(self) -> dict[str, str]:
        """Installed distributions, normalised name -> version (``pip list``)."""
        out = run([self.python, "-m", "pip", "list", "--format", "json"], cwd=self.path).stdout
        return {normalise(p["name"]): p["version"] for p in json.loads(out)}

    def pip_check(self) -> subprocess.CompletedProcess:
        """``pip check``, unchecked."""
        return run([self.python, "-m", "pip", "check"], cwd=self.path, check=False)

    def size_mb(self) -> int:
        """``du -sm`` of its lib folder."""
        return int(run(["du", "-sm", str(self.path / "lib")], cwd=self.path).stdout.split()[0])


def make_venv(kind: str, wheel: Path, dest: Path, extra: str | None = None) -> Venv:
    """A fresh venv at ``dest`` with ``wheel`` installed as ``kind`` (``extra`` overrides the kind's extra)."""
    venv.EnvBuilder(with_pip=True, clear=True).create(dest)
    v = Venv(kind, dest)
    t0 = time.perf_counter()
    run([v.python, "-m", "pip", "install", "-q", f"{wheel}{KINDS[kind] if extra is None else extra}"], cwd=dest)
    v.install_s = time.perf_counter() - t0
    return v


class Process:
    """A long-running command whose first stdout line names its URL (``craft-adapter vendor`` or ``serve``)."""

    def __init__(self, cmd: list[str], cwd: Path, log: Path, startup_s: float = 120.0) -> None:
        self.t0 = time.perf_counter()
        self.log = log
        self._log = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, "PYTHONWARNINGS": "ignore"})
        line = self.proc.stdout.readline()
        if " at http" not in line:
            self.stop()
            raise RuntimeError(f"{cmd[0]} {cmd[1]} did not start: {line!r}\n{log.read_text()[-3000:]}")
        self.url = line.split(" at ")[1].split()[0].rstrip("/")
        self.first_line_s = time.perf_counter() - self.t0

    def wait_for(self, path: str, timeout: float = 60.0) -> None:
        """Poll ``GET path`` until it answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + path, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"{self.url}{path} never answered\n{self.log.read_text()[-3000:]}")

    def rss_mb(self) -> float:
        """Resident memory of the process, MB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        """Terminate it (kill past 20 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._log.close()


def start_vendor(fit: Venv, workdir: Path) -> Process:
    """``craft-adapter vendor`` (the reference vendor, package data) from the fit venv on a free loopback port."""
    return Process(fit.cli("vendor", "--port", "0", "--device", "cpu"), workdir, workdir / "vendor.log")


def start_server(server: Venv, adapter: Path, vendor_url: str, workdir: Path) -> Process:
    """``craft-adapter serve ADAPTER`` from the server venv on a free loopback port."""
    return Process(server.cli("serve", str(adapter), "--vendor", vendor_url + "/", "--port", "0"), workdir,
                   workdir / "server.log")


def text_fit(fit: Venv, vendor_url: str, out: Path, budget: int = 600) -> Path:
    """A tiny text-mode fit against the vendor over HTTP (2 shots), then ``export --onnx``; the adapter's path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    run(fit.cli("fit", "-o", str(out), "--vendor", vendor_url, "--shots", "2", "--budget", str(budget),
                "--no-cache"), cwd=out.parent)
    run(fit.cli("export", str(out), "--onnx"), cwd=out.parent)
    return out


RUNTIME_SMOKE = """
import json, resource, sys, time
t0 = time.perf_counter()
from PIL import Image
from craft_adapter.serve import HttpZeroShotVendor, load_runtime
adapter, url, *images = sys.argv[1:]
vendor = HttpZeroShotVendor(url)
runtime = load_runtime(adapter, vendor, device="cpu")
first = runtime.predict_one(Image.open(images[0]))
first_s = time.perf_counter() - t0
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
batch = runtime.predict([Image.open(p) for p in images])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "onnx", "open_clip", "cma", "typer",
                                                              "rich", "starlette", "uvicorn", "aiohttp"})
print(json.dumps({"first_s": first_s, "rss_mb": rss, "label": first.label, "labels": batch.labels,
                  "probabilities": batch.probabilities.tolist(), "classes": batch.class_names, "heavy": heavy}))
"""


def runtime_classify(runtime: Venv, adapter: Path, vendor_url: str, images: list[Path], cwd: Path) -> dict:
    """Wrap the vendor with the adapter in the runtime venv (a fresh process) and classify ``images``."""
    out = run([runtime.python, "-c", RUNTIME_SMOKE, str(adapter), vendor_url + "/", *map(str, images)], cwd=cwd,
              env={"PYTHONWARNINGS": "default"})
    return json.loads(out.stdout.strip().splitlines()[-1])
