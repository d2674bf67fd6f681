"""Start ``craft-adapter serve`` as a real subprocess on a loopback port, for the server tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


class ServerProcess:
    """A running ``craft-adapter serve``; its JSON log goes to ``log_path``."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 startup_s: float = 30.0) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-m", "craft_adapter.cli", "serve", *args],
                                     stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, **(env or {})})
        line = self.proc.stdout.readline()
        if not line.startswith("serving "):
            self.stop()
            raise RuntimeError(f"the server did not start: {line!r}\n{log_path.read_text()}")
        self.url = line.split(" at ")[1].split()[0]
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:  # the socket is bound before the app's startup has run
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the server never answered /healthz\n{log_path.read_text()}")

    def log(self) -> str:
        """Everything the server logged so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def terminate(self) -> None:
        """Send SIGTERM (graceful shutdown)."""
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> int:
        """Stop gracefully (SIGTERM, then SIGKILL past ``timeout``); the exit code."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode
