"""A real ``giris serve`` process for the benchmarks (default engines unless told)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from giris.runtime.client import Client
from giris.runtime.errors import GirisError


class BenchServer:
    def __init__(self, config: str | None = None, log_level: str = "WARNING") -> None:
        self.dir = tempfile.mkdtemp(prefix="giris-bench-")
        os.chmod(self.dir, 0o700)
        self.endpoint = f"ipc://{self.dir}/gw.sock"
        cmd = [sys.executable, "-m", "giris.supervisor.cli", "--log-level", log_level, "serve",
               "--endpoint", self.endpoint]
        if config:
            cmd += ["--config", config]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        self.client = Client(self.endpoint, timeout=120)

    def wait(self, timeout: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                st = self.client.status(timeout=2)
                if st["state"] == "serving":
                    return st
            except GirisError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not start")

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "BenchServer":
        self.wait()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
