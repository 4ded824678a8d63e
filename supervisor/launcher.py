"""The launcher: one process that has imported the engines, forking stage workers.

A worker started from scratch spends seconds before its first frame: importing torch
(~2.4 s here) and loading dlib's face model (~1.5 s) for the renderer, importing ONNX
Runtime and Piper for the voice. That is the gap a session sees when a stage crashes and
is restarted. The launcher does that work once per engine, before its first worker
(:meth:`Engine.preload`: imports and read-only model data, never threads, never a GPU),
then forks a worker per request (the workers forked first start while it preloads the
next engine, so a server starts about as fast as with fresh interpreters): a restarted renderer is ready in ~0.5 s instead of ~4.5 s, and the pages the
workers share stay shared.

What a fork must not inherit, it does not get: the launcher is single-threaded and never
opens a ZeroMQ context or touches CUDA; each child sets its own environment (the stage's
``CUDA_VISIBLE_DEVICES`` before torch first asks for a GPU), its CPU affinity, a fresh
numpy seed and default signal handlers, and dies with the launcher, which dies with the
supervisor (``PR_SET_PDEATHSIG``). The launcher reaps its children and reports each exit
to the supervisor, so :class:`LaunchedProcess` answers like ``subprocess.Popen``.

Protocol on a ``SOCK_SEQPACKET`` socket pair, one JSON object per packet: supervisor →
launcher ``{"spawn": id, "env": {...}, "cpus": [...] | null, "engine": {"engine": name,
"options": {...}}}`` (the engine preloaded before the first fork of it); launcher →
supervisor ``{"ready": true}`` once started, ``{"spawned": id, "pid": n}`` (or ``"error"``;
or ``"fresh": true`` once it stopped forking: the supervisor starts that worker itself), and
``{"exit": id, "pid": n, "code": n}`` (``-signal`` when killed, as ``Popen.returncode``);
supervisor → launcher ``{"signal": id, "sig": n}`` (sent only to a child not yet reaped).
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable

log = logging.getLogger("giris.launcher")
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PACKET = 1 << 20  # a spawn request carries the worker's environment


def _prctl(*args: Any) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(*args)
    except OSError:
        pass  # not Linux: no such call


def die_with_parent() -> None:
    """SIGKILL this process when its parent ends, whatever ends it (no orphan may hold a
    GPU or a pool slot)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _name(name: str) -> None:
    """What ``top`` and ``ps -o comm`` show (the command line stays the launcher's)."""
    _prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


# ---------------------------------------------------------------------- supervisor side
class Launcher:
    """The supervisor's handle on the launcher process."""

    def __init__(self, timeout: float = 60.0, wait: bool = True, log_level: str = "WARNING",
                 log_json: bool = False) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ, GIRIS_LAUNCHER_FD=str(theirs.fileno()),
                   GIRIS_LAUNCHER_LOG=json.dumps([log_level, log_json]))
        # OpenBLAS sizes its (spinning) thread pool when numpy is imported, from the CPUs
        # it may use then: the launcher's, all of them. A worker pinned to one CPU after
        # the fork would run that many spinning threads on it (frames 5x slower, measured).
        # Pinned workers started fresh got one thread each; so do forked ones.
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, "1")
        # torch.cuda.is_available() in an engine's import or preload asks NVML, not the
        # CUDA driver, which would be initialised in the launcher and break every fork
        env.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        self.proc = subprocess.Popen([sys.executable, "-m", "giris.supervisor.launcher"], env=env,
                                     stdin=subprocess.DEVNULL, pass_fds=[theirs.fileno()],
                                     preexec_fn=die_with_parent, close_fds=True)
        theirs.close()
        self.sock = ours
        #: by request id: the pid forked for it (None: the fork failed), and how it ended
        self.pids: dict[int, int | None] = {}
        self.exits: dict[int, int] = {}
        #: requests the launcher declined: their workers start as fresh interpreters
        self.fresh: set[int] = set()
        #: False once the launcher stopped forking (an engine's preload initialised CUDA)
        self.forking = True
        self._next = 0
        self._ready = False
        # (not waiting: spawn requests queue on the socket until it reads them; a
        # replacement started from the supervisor's loop must not hold the loop up)
        if wait and not self._await(lambda: self._ready, timeout):
            self.close()
            raise RuntimeError("the launcher did not start")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def spawn(self, env: dict[str, str], cpus: list[int] | None, engine: dict[str, Any],
              fresh: Callable[[], Any]) -> "LaunchedProcess":
        """Ask for a worker; ``engine`` (``{"engine": name, "options": {...}}``) is preloaded
        first if it was not yet. Returns at once: the supervisor's loop goes on (heartbeats,
        clients, the watchdog) while the launcher preloads and forks; the pid comes later.
        Should the launcher decline (it stopped forking), ``fresh()`` starts the worker as
        a fresh interpreter instead (a ``Popen``)."""
        self._next += 1
        rid = self._next
        self.sock.send(json.dumps({"spawn": rid, "env": env, "cpus": cpus, "engine": engine}).encode())
        return LaunchedProcess(rid, self, fresh)

    def pump(self, timeout: float = 0.0) -> None:
        """Read what the launcher said (exits, replies), waiting up to ``timeout`` s."""
        if self.sock.fileno() < 0:  # closed: it died and was replaced
            return
        try:
            self.sock.settimeout(timeout if timeout > 0 else 0.0)
            while True:
                data = self.sock.recv(PACKET)
                if not data:  # the launcher is gone
                    return
                msg = json.loads(data)
                if "exit" in msg:
                    self.exits[int(msg["exit"])] = int(msg["code"])
                elif "spawned" in msg and msg.get("fresh"):
                    self.fresh.add(int(msg["spawned"]))
                    self.forking = False
                elif "spawned" in msg:
                    self.pids[int(msg["spawned"])] = msg.get("pid")
                elif msg.get("ready"):
                    self._ready = True
                self.sock.settimeout(0.0)
        except (BlockingIOError, socket.timeout, InterruptedError):
            return
        except (OSError, ValueError, TypeError, KeyError):
            return

    def _await(self, done: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or not self.alive:
                self.pump(0.0)
                return bool(done())
            self.pump(min(left, 0.1))
        return True

    def close(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()


class LaunchedProcess:
    """A worker asked of the launcher, answering like ``subprocess.Popen`` (``pid`` is None
    until the launcher has forked it)."""

    def __init__(self, rid: int, launcher: Launcher, fresh: Callable[[], Any]) -> None:
        self.rid = rid
        self.launcher = launcher
        self.returncode: int | None = None
        #: it ended because its launcher died (not a crash of its own)
        self.orphaned = False
        self._fresh = fresh
        self._popen: Any = None  # the fresh interpreter, where the launcher declined

    def _declined(self) -> Any:
        """The fresh interpreter started in the launcher's stead, once it declined."""
        if self._popen is None and self.rid in self.launcher.fresh:
            self.launcher.fresh.discard(self.rid)
            self._popen = self._fresh()
        return self._popen

    @property
    def pid(self) -> int | None:
        if self.rid not in self.launcher.pids:
            self.launcher.pump(0.0)
        if self._declined() is not None:
            return self._popen.pid
        return self.launcher.pids.get(self.rid)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.launcher.pump(0.0)
            if self._declined() is not None:
                self.returncode = self._popen.poll()
                return self.returncode
            code = self.launcher.exits.pop(self.rid, None)
            if code is None and self.rid in self.launcher.pids and self.launcher.pids[self.rid] is None:
                code = 1  # the fork failed
            if code is None and not self.launcher.alive:
                code = -signal.SIGKILL  # the launcher is gone, and its children with it
                self.orphaned = True
            self.returncode = code
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker {self.rid}", timeout or 0)
            self.launcher.pump(0.05)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        """Through the launcher, which signals the worker only while it is its unreaped
        child (a pid freed by an exit we have not heard of yet may be someone else's)."""
        if self.poll() is None:
            if self._popen is not None:
                self._popen.send_signal(sig)
                return
            try:
                self.launcher.sock.send(json.dumps({"signal": self.rid, "sig": int(sig)}).encode())
            except OSError:
                pass  # the launcher is gone, and its children with it

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# ---------------------------------------------------------------------- launcher side
def _preload(entry: dict[str, Any]) -> None:
    from giris.workers.registry import engine_class

    try:
        engine_class(entry["engine"]).preload(entry.get("options") or {})
    except Exception as e:  # noqa: BLE001 - the worker itself will say what is wrong
        log.warning("preloading an engine failed", extra={"engine": entry.get("engine"),
                                                          "error": f"{type(e).__name__}: {e}"})


def _cuda_initialised() -> bool:
    """Whether this process holds a CUDA context (through torch): an engine's preload
    broke the rule. CUDA cannot be used in a child forked after that."""
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:  # noqa: BLE001 - a torch without CUDA support
        return False


def _child(sock: socket.socket, env: dict[str, str], cpus: list[int] | None, launcher: int) -> None:
    code = 1
    try:
        sock.close()
        die_with_parent()
        if os.getppid() != launcher:  # the launcher died between fork and prctl
            os._exit(1)
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(env)
        _name("giris-" + str(json.loads(env.get("GIRIS_WORKER", "{}")).get("stage", "worker")))
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        if cpus:
            try:
                os.sched_setaffinity(0, cpus)
            except OSError:
                pass
        if "numpy" in sys.modules:  # every fork would otherwise draw the same numbers
            sys.modules["numpy"].random.seed()
        from giris.workers.stage import main

        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001
        log.critical("worker failed", exc_info=True)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    die_with_parent()
    _name("giris-launcher")
    from giris.runtime.logs import setup_logging

    level, as_json = json.loads(os.environ.pop("GIRIS_LAUNCHER_LOG", '["WARNING", false]'))
    setup_logging(level, as_json)
    sock = socket.socket(fileno=int(os.environ.pop("GIRIS_LAUNCHER_FD")))
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import giris.workers.stage  # noqa: F401 - numpy, zmq, msgpack and the worker loop

    sock.send(b'{"ready": true}')
    me = os.getpid()
    preloaded: set[str] = set()
    forking = True
    children: dict[int, int] = {}  # pid -> request id, until reaped
    by_request: dict[int, int] = {}  # request id -> pid
    sock.settimeout(0.1)
    while not stopping:
        try:
            data = sock.recv(PACKET)
            if not data:
                break  # the supervisor is gone
            req = json.loads(data)
            if "signal" in req:
                pid = by_request.get(req["signal"])
                if pid in children:
                    os.kill(pid, req["sig"])
                continue
            key = json.dumps(req.get("engine"), sort_keys=True)
            if forking and req.get("engine") and key not in preloaded:
                _preload(req["engine"])
                preloaded.add(key)
                if _cuda_initialised():  # a child would inherit a CUDA context it cannot use
                    log.warning("an engine's preload initialised CUDA: new workers start as "
                                "fresh interpreters", extra={"engine": req["engine"].get("engine")})
                    forking = False  # those forked already run on; this one and the next not
            if not forking:
                sock.send(json.dumps({"spawned": req["spawn"], "fresh": True}).encode())
                continue
            try:
                pid = os.fork()
            except OSError as e:
                sock.send(json.dumps({"spawned": req["spawn"], "error": str(e)}).encode())
                continue
            if pid == 0:
                _child(sock, req["env"], req.get("cpus"), me)
            children[pid] = req["spawn"]
            by_request[req["spawn"]] = pid
            sock.send(json.dumps({"spawned": req["spawn"], "pid": pid}).encode())
        except (socket.timeout, InterruptedError):
            pass
        except (OSError, ValueError):
            break
        while True:  # reap, and say who ended how
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            rid = children.pop(pid, None)
            by_request.pop(rid, None)
            if rid is None:
                continue
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            try:
                sock.send(json.dumps({"exit": rid, "pid": pid, "code": code}).encode())
            except OSError:
                break
    # leaving: the workers die with us (their PR_SET_PDEATHSIG)


if __name__ == "__main__":
    main()
