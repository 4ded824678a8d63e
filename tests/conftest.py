"""Shared fixtures: real servers (``giris serve`` processes) on private ipc sockets."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from giris.runtime.client import Client
from giris.runtime.errors import GirisError

ROOT = Path(__file__).resolve().parent.parent


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def write_toml(path: Path, data: dict) -> Path:
    lines: list[str] = []

    def emit(prefix: str, table: dict) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) or k == "options"}
        subs = {k: v for k, v in table.items() if isinstance(v, dict) and k != "options"}
        if prefix and scalars:
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f'"{k}" = {toml_value(v)}' if ":" in k else f"{k} = {toml_value(v)}")
        for k, v in subs.items():
            emit(f"{prefix}.{k}" if prefix else k, v)

    emit("", data)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory) -> Iterator[None]:
    """The run's caches (the voices' optimized graphs) in a directory of its own, shared by
    every engine and server the tests start, and gone with the run."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


def small_stages(render_s: float = 0.0, **over: dict) -> dict:
    """The small test pipeline; ``over`` maps a stage name to extra keys for it."""
    stages = {
        "tts": {"engine": "test-source", "options": {"word_s": 0.2}},
        "coeffs": {"engine": "test-relay"},
        "motion": {"engine": "test-relay"},
        "render": {"engine": "test-frames", "pool_slots": 16, "pool_slot_bytes": 64 * 64 * 3,
                   "options": {"render_s": render_s}},
    }
    for name, extra in over.items():
        stages[name] = {**stages[name], **extra}
    return stages


class Server:
    """A ``giris serve`` process with its own config and private ipc endpoint."""

    def __init__(self, tmp: Path, config: dict, env: dict | None = None) -> None:
        self.tmp = tmp
        self.endpoint = f"ipc://{tmp}/gw.sock"
        cfg = {"server": {"endpoint": self.endpoint}, "defaults": {"size": 64},
               "timeouts": {"worker_heartbeat": 0.2, "worker_timeout": 3.0, "client_idle": 30.0,
                            "lost_after": 2.0},
               "limits": {"min_size": 32},
               "restart": {"backoff_initial": 0.1, "backoff_max": 0.5, "max_restarts": 5, "window": 60.0},
               "stages": small_stages()}
        for k, v in config.items():
            cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) and k != "stages" else v
        self.config_path = write_toml(tmp / "giris.toml", cfg)
        self.log = open(tmp / "server.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "giris.supervisor.cli", "--log-level", "INFO", "serve",
             "--config", str(self.config_path)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.clients: list[Client] = []

    def client(self, **kw: Any) -> Client:
        c = Client(self.endpoint, timeout=kw.pop("timeout", 20.0), **kw)
        self.clients.append(c)
        return c

    def wait_serving(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        c = self.client(timeout=2.0)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.logs()}")
            try:
                st = c.status(timeout=1.0)
                # serving: ready, and its engines took its [defaults] (a moment after the
                # stages are ready: an open before it is told the server is starting)
                if st["state"] == "serving" or st["state"] == "degraded" and all(
                        w["state"] in ("ready", "failed") for w in st["workers"]):
                    return st
            except GirisError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not serving in {timeout} s: {self.logs()}")

    def status(self) -> dict:
        return self.clients[0].status(timeout=5)

    def logs(self) -> str:
        self.log.flush()
        return (self.tmp / "server.log").read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        for c in self.clients:
            c.close()
        self.clients.clear()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator:
    servers: list[Server] = []

    def make(config: dict | None = None, wait: bool = True, env: dict | None = None) -> Server:
        d = tmp_path / f"srv{len(servers)}"
        d.mkdir()
        s = Server(d, config or {}, env)
        servers.append(s)
        if wait:
            s.wait_serving()
        return s

    yield make
    for s in servers:
        s.stop()


def shm_segments(pid: int) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"giris-{pid}-*"))


def collect(session: Any, text: str, **kw: Any) -> dict[str, list]:
    """Say ``text`` and sort what streams back by kind."""
    from giris.runtime.client import AudioChunk, Coefficients, Event, Frame

    out: dict[str, list] = {"audio": [], "frames": [], "coeffs": [], "events": []}
    for item in session.say(text, **kw):
        if isinstance(item, AudioChunk):
            out["audio"].append(item)
        elif isinstance(item, Frame):
            out["frames"].append((item.index, item.image.copy(), item.final))
            item.release()
        elif isinstance(item, Coefficients):
            out["coeffs"].append(item)
        elif isinstance(item, Event):
            out["events"].append(item)
    return out
