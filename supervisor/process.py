"""One worker OS process: spawn (pinned, dying with us), watch, stop."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from giris.supervisor.launcher import die_with_parent
from giris.supervisor.restart import RestartPolicy

log = logging.getLogger("giris.supervisor")

STARTING, READY, BACKOFF, FAILED, STOPPED = "starting", "ready", "backoff", "failed", "stopped"


def _child_setup(cpus: list[int] | None) -> Any:
    def setup() -> None:
        die_with_parent()
        if cpus:
            try:
                os.sched_setaffinity(0, cpus)
            except OSError:
                pass
    return setup


def visible_device(device: str, inherited: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a stage on ``device`` (``cuda:N``).

    ``N`` counts the GPUs the server itself sees: where the server was given
    ``CUDA_VISIBLE_DEVICES=2,3`` (or UUIDs, or MIG instances), ``cuda:1`` is the second
    entry of that list, not physical GPU 1."""
    kind, _, index = device.partition(":")
    index = index or "0"
    if kind != "cuda" or not index.isdigit():
        raise ValueError(f"bad device {device!r}: expected cpu or cuda:N")
    if inherited is None:
        return index
    seen = [d.strip() for d in inherited.split(",") if d.strip()]
    if seen and seen[0].lstrip("-").isdigit() and int(seen[0]) < 0:
        seen = []  # CUDA reads no further than an invalid index: "-1" hides every GPU
    if int(index) >= len(seen):
        raise ValueError(f"{device}: this server sees only {len(seen)} GPU(s) "
                         f"(CUDA_VISIBLE_DEVICES={inherited})")
    return seen[int(index)]


@dataclass
class WorkerHandle:
    """A stage replica: its spec, its current process, its restart history."""

    stage: str
    index: int
    spec: dict[str, Any]
    cpus: list[int] | None
    device: str
    policy: RestartPolicy
    proc: Any = None  # subprocess.Popen, or launcher.LaunchedProcess (the same calls)
    state: str = STOPPED
    restarts: int = 0
    started_at: float = 0.0
    last_beat: float = 0.0
    restart_at: float = 0.0
    #: when it was marked failed, and when it is tried again (monotonic; None: never, as
    #: when its engine refused its configuration)
    failed_at: float = 0.0
    retry_at: float | None = None
    refused: bool = False
    beat: dict[str, Any] = field(default_factory=dict)
    identity: bytes = b""
    last_exit: int | None = None
    #: what the engine is ("tts", "coeffs", "motion", "render"), as the worker said when ready
    kind: str = ""
    #: forks workers with the engines preloaded (None, or gone: a fresh interpreter each)
    launcher: Any = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def spawn(self, env_extra: dict[str, str] | None = None) -> None:
        env = dict(os.environ)
        if self.device.startswith("cuda"):
            # Before the child imports torch: the stage sees only its own GPU, as cuda:0.
            env["CUDA_VISIBLE_DEVICES"] = visible_device(self.device, os.environ.get("CUDA_VISIBLE_DEVICES"))
        self.identity = f"{self.stage}.{self.index}.{time.monotonic_ns()}".encode()
        spec = dict(self.spec, identity=self.identity.decode())
        if self.device.startswith("cuda"):
            spec["device"] = "cuda:0"
        env["GIRIS_WORKER"] = json.dumps(spec)
        env.update(env_extra or {})
        self.proc = None

        def fresh() -> subprocess.Popen:
            return subprocess.Popen(
                [sys.executable, "-m", "giris.workers.stage"], env=env, stdin=subprocess.DEVNULL,
                preexec_fn=_child_setup(self.cpus), close_fds=True)

        if self.launcher is not None and self.launcher.alive and self.launcher.forking:
            try:
                self.proc = self.launcher.spawn(env, self.cpus, {"engine": self.spec["engine"],
                                                                  "options": self.spec.get("options") or {}},
                                                fresh)
            except OSError as e:
                log.warning("launcher failed, starting a fresh interpreter",
                            extra={"stage": self.stage, "error": str(e)})
        if self.proc is None:
            self.proc = fresh()
        self.state = STARTING
        self.started_at = self.last_beat = time.monotonic()
        self.beat = {}

    def host_devices(self, per_device: dict[str, Any]) -> dict[str, Any]:
        """Bytes per device as the worker reports them, keyed by the host's device names.

        A stage on ``cuda:N`` sees only that GPU, as ``cuda:0`` (``CUDA_VISIBLE_DEVICES``
        is set before it starts): its estimates must be charged to the budget of
        ``cuda:N``, not to GPU 0's."""
        if not self.device.startswith("cuda"):
            return per_device
        host = self.device if ":" in self.device else "cuda:0"
        out: dict[str, Any] = {}
        for dev, n in per_device.items():
            key = host if str(dev).startswith("cuda") else dev
            out[key] = out.get(key, 0) + n
        return out

    def poll(self) -> int | None:
        """Exit code if the process has ended (reaped), else None."""
        if self.proc is None:
            return None
        return self.proc.poll()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def ask_to_end(self) -> None:
        """SIGTERM; SIGKILL while it is still loading: it serves nothing yet and holds
        nothing a kill loses (the graph cache is written atomically), and a model's load
        does not stop for a signal (an interrupted `giris say` waited seconds for it)."""
        if self.proc is not None and self.proc.poll() is None:
            (self.proc.kill if self.state == STARTING else self.proc.terminate)()

    def reap(self, timeout: float, then_kill: bool = True) -> None:
        """Wait ``timeout`` s for it to end (:meth:`ask_to_end`), then kill it (or not:
        its launcher's end will, see ``Supervisor.shutdown``)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                if not then_kill:
                    return
                self.kill()
        self.state = STOPPED

    def describe(self) -> dict[str, Any]:
        return {"stage": self.stage, "replica": self.index, "pid": self.pid, "state": self.state,
                "restarts": self.restarts, "cpus": self.cpus, "device": self.device,
                "engine": self.spec.get("engine"), "kind": self.kind, "sessions": self.beat.get("sessions", 0),
                "queued": self.beat.get("queued", 0), "processed": self.beat.get("processed", 0),
                "dropped": self.beat.get("dropped", 0), "held": self.beat.get("held", {}),
                "last_exit": self.last_exit,
                "retry_in_s": None if (left := self.retry_in()) is None else round(left, 1)}

    def retry_in(self) -> float | None:
        """Seconds until a failed stage is tried again (None: not failed, or never)."""
        if self.state != FAILED or self.retry_at is None:
            return None
        return max(0.0, self.retry_at - time.monotonic())

    def retry_note(self) -> str:
        """What happens to a failed stage next, in words (errors and logs say it alike)."""
        left = self.retry_in()
        return "not restarted" if left is None else f"tried again in {left:.0f} s"
