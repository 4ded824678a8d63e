"""The supervisor: owns the pools, the sockets, the workers and the session registry.

One thread runs one loop over three sockets (clients' ROUTER, workers' control ROUTER,
the results sink PULL) plus timers (heartbeats, restarts, idle sessions, pacing). Client
requests are handled by :mod:`gateway`, results on their way out by :mod:`delivery`.
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from giris.runtime import protocol as P
from giris.runtime.config import Config
from giris.runtime.errors import GirisError
from giris.runtime.shm_pool import SlotPool, clean_stale
from giris.runtime.transport import PoolSet, clean_stale_dirs, private_dir, recv, send, socket
from giris.supervisor.delivery import Delivery
from giris.supervisor.gateway import Gateway
from giris.supervisor.process import BACKOFF, FAILED, READY, STARTING, STOPPED, WorkerHandle, visible_device
from giris.supervisor.restart import RestartPolicy
from giris.supervisor.launcher import Launcher
from giris.supervisor.sessions import SessionRegistry
from giris.workers.registry import known_engines

log = logging.getLogger("giris.supervisor")
#: what a stage's engine may be (``Engine.stage`` of the four base classes)
STAGE_KINDS = frozenset({"tts", "coeffs", "motion", "render"})
#: launcher deaths within a minute after which no new one is started
LAUNCHER_DEATHS = 3


@dataclass
class Pending:
    """A request fanned out to every worker, waiting for all their replies."""

    waiting: set[bytes]
    on_done: Callable[[dict[str, dict]], None]
    deadline: float
    replies: dict[str, dict] = field(default_factory=dict)


def exit_reason(code: int | None, hung: bool, refused: bool) -> str:
    """Why a worker ended, in words for the log (its own log says more)."""
    if hung:
        return "hung: killed"
    if refused:
        return "its engine refused its configuration"
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == 1:
        return "failed (see the worker's log line before this)"
    return f"exited with status {code}"


class Supervisor:
    def __init__(self, config: Config, context: zmq.Context | None = None,
                 notifier: Any = None, metrics: Any = None, log_level: str = "WARNING",
                 log_json: bool = False) -> None:
        self.config = config
        self.ctx = context or zmq.Context.instance()
        self.notifier = notifier
        self.metrics = metrics
        self.log_level, self.log_json = log_level, log_json
        self.registry = SessionRegistry(config.budgets)
        self.pools = PoolSet()
        self.workers: list[WorkerHandle] = []
        self.launcher: Launcher | None = None
        self._launcher_deaths: list[float] = []  #: when it died, within the last minute
        self.pending: dict[int, Pending] = {}
        self._req = itertools.count(1)
        self._stop = threading.Event()
        self.stopping = False
        self.started_at = time.monotonic()
        self.loop_beat = time.monotonic()
        self.run_dir = ""
        self.endpoint = ""
        self._own_run_dir = False
        self.gateway = Gateway(self)
        self.delivery = Delivery(self)
        self.announced_ready = False
        #: why the server stopped itself (a config only the ready stages could judge)
        self.fatal: GirisError | None = None
        #: the stages' engines are judging ``[defaults]`` at start (see ``_judge_defaults``)
        self._judging = False
        self._poller: zmq.Poller | None = None

    # ------------------------------------------------------------------ start-up
    def start(self, wait: bool = True) -> None:
        cfg = self.config
        if not cfg.stages:
            raise GirisError("no stages configured", code="bad_config")
        known = known_engines()
        for name, sc in cfg.stages.items():  # before anything is made that would need undoing
            if sc.engine not in known:  # (a worker that cannot load it left a server
                # "degraded" for good, never ready for systemd)
                raise GirisError(f"stages.{name}.engine: unknown engine {sc.engine!r}; known: "
                                 f"{', '.join(known)}", code="bad_config")
            if sc.device != "cpu":
                try:
                    visible_device(sc.device, os.environ.get("CUDA_VISIBLE_DEVICES"))
                except ValueError as e:
                    raise GirisError(f"stages.{name}.device: {e}", code="bad_config") from None
        self.run_dir = cfg.server.run_dir or private_dir()
        self._own_run_dir = not cfg.server.run_dir
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        removed = clean_stale()
        if removed:
            log.info("removed stale pools", extra={"pools": removed})
        if self._own_run_dir:  # beside it, those of supervisors that were killed
            gone = clean_stale_dirs(os.path.dirname(self.run_dir))
            if gone:
                log.info("removed stale socket directories", extra={"dirs": gone})
        run_id = os.urandom(3).hex()
        self.pool_prefix = f"giris-{os.getpid()}-{run_id}"
        self.control = socket(self.ctx, zmq.ROUTER, router_mandatory=0)
        self.control.bind(f"ipc://{self.run_dir}/control.sock")
        self.sink = socket(self.ctx, zmq.PULL, rcvhwm=0)
        self.sink.bind(f"ipc://{self.run_dir}/sink.sock")
        self.endpoint = cfg.server.endpoint or f"ipc://{self.run_dir}/gateway.sock"
        self.gateway.bind(self.endpoint)
        names = cfg.stage_names()
        cpus = sorted(os.sched_getaffinity(0))
        for i, name in enumerate(names):
            sc = cfg.stages[name]
            pool_name = None
            if sc.pool_slots > 0:
                pool = SlotPool.create(f"{self.pool_prefix}-{name}", sc.pool_slot_bytes, sc.pool_slots)
                self.pools.add(pool)
                pool_name = pool.name
            last = i == len(names) - 1
            spec = {
                "stage": name, "index": 0, "engine": sc.engine, "options": sc.options,
                "device": sc.device, "control": f"ipc://{self.run_dir}/control.sock",
                "input": f"ipc://{self.run_dir}/stage-{name}.sock",
                "output": None if last else f"ipc://{self.run_dir}/stage-{names[i + 1]}.sock",
                "sink": f"ipc://{self.run_dir}/sink.sock", "pool": pool_name, "last": last,
                "backpressure": sc.backpressure, "block_timeout": sc.block_timeout,
                "session_slots": sc.session_slots or max(4, sc.pool_slots // 4),
                "heartbeat": cfg.timeouts.worker_heartbeat, "log_level": self.log_level,
                "log_json": self.log_json,
            }
            pin = sc.cpus if sc.cpus is not None else [cpus[i % len(cpus)]]
            rc = cfg.restart
            self.workers.append(WorkerHandle(
                stage=name, index=0, spec=spec, cpus=pin or None, device=sc.device,
                policy=RestartPolicy(rc.backoff_initial, rc.backoff_max, rc.max_restarts, rc.window)))
        self.launcher = self._start_launcher()
        for w in self.workers:
            w.launcher = self.launcher
            w.spawn()
        log.info("starting", extra={"endpoint": self.endpoint, "stages": ",".join(names)})
        if wait:
            self.wait_ready(cfg.timeouts.worker_start)

    def _start_launcher(self) -> Launcher | None:
        """The process workers are forked from, its engines preloaded; None (a fresh
        interpreter per worker) when configured so or when it cannot start."""
        if self.config.server.launcher != "fork":
            return None
        try:
            return Launcher(log_level=self.log_level, log_json=self.log_json)
        except (OSError, RuntimeError) as e:
            log.warning("no launcher: each worker starts a fresh interpreter", extra={"error": str(e)})
            return None

    def check_launcher(self, now: float) -> None:
        """A launcher that died (and its workers with it) is replaced, so the restarted
        workers are forked again (~0.75 s) and not fresh interpreters (~3.8 s, torch and
        dlib loaded anew). One that keeps dying (say an engine's preload crashes it) is
        given up after ``LAUNCHER_DEATHS`` in a minute: workers start fresh from then on."""
        old = self.launcher
        if old is None or old.alive or self.stopping:
            return
        code = old.proc.poll()
        old.close()
        self._launcher_deaths = [t for t in self._launcher_deaths if now - t < 60.0] + [now]
        if len(self._launcher_deaths) >= LAUNCHER_DEATHS:
            log.error("launcher keeps dying: workers start as fresh interpreters from now on",
                      extra={"code": code, "deaths": len(self._launcher_deaths)})
            new = None
        else:
            log.warning("launcher died, starting a new one", extra={"code": code, "pid": old.proc.pid})
            try:
                new = Launcher(wait=False, log_level=self.log_level, log_json=self.log_json)
            except (OSError, RuntimeError) as e:
                log.error("no new launcher: workers start as fresh interpreters", extra={"error": str(e)})
                new = None
        self.launcher = new
        for w in self.workers:
            w.launcher = new

    def wait_ready(self, timeout: float) -> bool:
        """Run the loop until the server is ready (every stage, and its engine took the
        ``[defaults]``) or a stage failed (so start-up is observable). ``request_stop()``
        from another thread ends the wait at once (``not_started``): an interrupted start
        does not wait for the models to load."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.fatal is not None:
                raise self.fatal
            if self._stop.is_set():
                raise GirisError("the server was stopped while it started", code="not_started")
            if self.announced_ready:
                return True
            if all(w.state in (READY, FAILED) for w in self.workers) and self.failed_stages():
                return False
            self.step(0.05)
        waiting = [w.stage for w in self.workers if w.state != READY]
        what = (f"not ready: {', '.join(waiting)}" if waiting else
                "its stages are ready, their engines still judging its [defaults]")
        raise GirisError(f"the server did not start in {timeout:g} s ({what})", code="start_timeout")

    # ------------------------------------------------------------------ loop
    def serve_forever(self) -> None:
        try:
            while not self._stop.is_set():
                self.step(0.05)
        finally:
            self.shutdown()

    def request_stop(self) -> None:
        """Signal-safe: the loop notices within one tick."""
        self._stop.set()

    def step(self, max_wait: float) -> None:
        wait = min(max_wait, self.delivery.next_due(), self.gateway.outbox.next_due())
        poller = self._poller
        if poller is None:  # the sockets never change once bound: register them once
            poller = self._poller = zmq.Poller()
            for s in (self.control, self.sink, self.gateway.sock):
                poller.register(s, zmq.POLLIN)
        ready = dict(poller.poll(max(0, int(wait * 1000))))
        if self.control in ready:
            self._drain(self.control, self.on_control, raw=True)
        if self.sink in ready:
            self._drain(self.sink, self.delivery.on_result)
        if self.gateway.sock in ready:
            self.gateway.drain()
        self.tick()

    def _drain(self, sock: zmq.Socket, handler: Callable, raw: bool = False, limit: int = 256) -> None:
        for _ in range(limit):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                if raw:
                    handler(frames[0].bytes, P.decode(frames[1:]))
                else:
                    handler(P.decode(frames))
            except GirisError as e:
                log.warning("dropped bad internal message", extra={"error": str(e)})
            except Exception:  # noqa: BLE001 - the loop must survive any one message
                log.exception("handler failed")

    def tick(self) -> None:
        now = time.monotonic()
        self.loop_beat = now
        self.check_launcher(now)
        self.check_workers(now)
        self._judge_defaults()
        self.gateway.tick(now)
        self.gateway.outbox.flush()  # what waits for a client goes before anything newer
        self.delivery.tick(now)
        for req, p in list(self.pending.items()):
            if now > p.deadline:
                del self.pending[req]
                p.on_done({"__timeout__": {"ok": False, "error": GirisError(
                    "stages did not answer in time", code="timeout").to_wire()}})
        if self.notifier is not None:
            self.notifier.tick(self, now)
        if self.metrics is not None:
            self.metrics.tick(self, now)

    # ------------------------------------------------------------------ workers
    def worker_by_identity(self, identity: bytes) -> WorkerHandle | None:
        for w in self.workers:
            if w.identity == identity:
                return w
        return None

    def on_control(self, identity: bytes, msg: P.Message) -> None:
        w = self.worker_by_identity(identity)
        if w is None:
            return
        now = time.monotonic()
        w.last_beat = now
        for key in ("held", "estimate"):  # the worker's device names, in the host's
            if isinstance(msg.meta.get(key), dict):
                msg.meta[key] = w.host_devices(msg.meta[key])
        if msg.type == P.READY:
            self.on_worker_ready(w, msg)
        elif msg.type == P.HEARTBEAT:
            w.beat = msg.meta
            if self.metrics is not None:
                self.metrics.on_heartbeat(w, msg.meta)
        elif msg.type == P.REPLY:
            p = self.pending.get(msg.meta.get("req"))
            if p is not None and identity in p.waiting:
                p.waiting.discard(identity)
                p.replies[w.stage] = msg.meta
                if not p.waiting:
                    del self.pending[msg.meta["req"]]
                    p.on_done(p.replies)

    def on_worker_ready(self, w: WorkerHandle, msg: P.Message) -> None:
        restarted = w.restarts > 0 and w.state == STARTING
        # (its spec's heartbeat may predate a reload that changed it)
        reply = P.Message(P.REPLY, meta={"sessions": [], "heartbeat": w.spec["heartbeat"]})
        for rec in self.registry:
            entry = {"token": rec.token, "tag": rec.tag,
                     "spec": dict(rec.spec, resume_sample=rec.audio_end,
                                          resume_chunk=rec.audio_chunks)}
            if rec.avatar is not None:
                reply.buffers.append(rec.avatar)
                entry["avatar_buffer"] = len(reply.buffers) - 1
            reply.meta["sessions"].append(entry)
        self.control.send_multipart([w.identity, *P.encode(reply)])
        w.state = READY
        w.kind = str(msg.meta.get("kind") or "")
        log.info("stage ready", extra={"stage": w.stage, "pid": w.pid,
                                        "load_s": round(msg.meta.get("load_s", 0), 3)})
        if restarted:
            self.delivery.stage_restarted(w)

    def _judge_defaults(self) -> None:
        """Once every stage is ready at start: the server is ready when their engines take
        its ``[defaults]``; a refusal stops it (every session open would have failed)."""
        if self.announced_ready or self._judging or self.fatal is not None or \
                not all(w.state == READY for w in self.workers):
            return
        self._judging = True

        def judged(refused: str | None, unjudged: list[str]) -> None:
            self._judging = False
            if refused:  # every session open would fail: stop now, saying why
                self.fatal = GirisError(refused, code="bad_config")
                log.error("bad session defaults, stopping", extra={"error": refused})
                self.request_stop()
            elif unjudged:  # a stage died (or hung) meanwhile: again once all are ready
                log.warning("[defaults] not judged yet", extra={"stages": ",".join(unjudged)})
            else:
                self.announced_ready = True
                if self.notifier is not None:
                    self.notifier.ready()

        self.check_defaults(self.config.defaults, judged)

    def check_defaults(self, defaults: dict[str, Any],
                       on_done: Callable[[str | None, list[str]], None]) -> None:
        """Ask every ready stage's engine whether sessions with ``defaults`` would open
        (``Engine.check``); ``on_done(refused, unjudged)``: why not, in a line naming the
        stages that refused (None: none did), and the stages that did not judge them (not
        ready, or they died or did not answer in time)."""
        asked = [w for w in self.workers if w.state == READY]
        unready = [w.stage for w in self.workers if w.state != READY]

        def answered(replies: dict[str, dict]) -> None:
            why, unjudged = [], list(unready)
            for w in asked:
                r = replies.get(w.stage) or {}
                if "refused" not in r:
                    unjudged.append(w.stage)
                elif r["refused"]:
                    why.append(f"the {w.stage} stage's engine ({w.spec.get('engine')}) refuses it: "
                               f"{r['refused'].get('message')}")
            on_done(f"[defaults] {'; '.join(why)}" if why else None, unjudged)

        self.fan_out(P.Message(P.CHECK, meta={"spec": dict(defaults)}), answered)

    def check_workers(self, now: float) -> None:
        for w in self.workers:
            if w.state in (STARTING, READY):
                code = w.poll()
                if code is not None:
                    self.on_worker_exit(w, code, now)
                elif w.state == READY and now - w.last_beat > self._hang_limit(w):
                    log.warning("stage hung, killing", extra={"stage": w.stage, "pid": w.pid})
                    w.kill()
                    self.on_worker_exit(w, w.poll(), now, hung=True)
                elif w.state == STARTING and now - w.started_at > self.config.timeouts.worker_start:
                    w.kill()
                    self.on_worker_exit(w, w.poll(), now, hung=True)
            elif w.state == BACKOFF and now >= w.restart_at and not self.stopping:
                w.restarts += 1
                w.spawn()
            elif w.state == FAILED and self._retry_due(w, now):
                log.warning("retrying failed stage", extra={"stage": w.stage, "failed_s": round(now - w.failed_at, 1)})
                w.policy.reset()  # a fresh series of restarts before it is failed again
                w.restarts += 1
                if self.metrics is not None:  # (status counts it: so does the metric)
                    self.metrics.on_restart(w.stage)
                w.spawn()

    def _hang_limit(self, w: WorkerHandle) -> float:
        """How long ``w`` may be silent: ``worker_timeout``, plus the interval it beats at
        while that is no shorter (a reload lowered both, and the new interval is on its
        way to it: every stage was killed as hung, in a loop)."""
        timeout = self.config.timeouts.worker_timeout
        every = float(w.beat.get("every") or w.spec["heartbeat"])
        return timeout if every < timeout else every + timeout

    def set_heartbeat(self, every: float) -> None:
        """Workers beat every ``every`` s from now on: those running are told (a
        ``heartbeat`` control message), those starting hear it with their READY's answer,
        those started later have it in their spec."""
        for w in self.workers:
            w.spec["heartbeat"] = every
        self.tell_workers(P.Message(P.HEARTBEAT, meta={"every": every}))

    def schedule_retry(self, w: WorkerHandle) -> None:
        """When a failed stage is tried again, by ``restart.failed_retry`` (again after a
        reload changes it); never for one whose engine refused its configuration."""
        retry = self.config.restart.failed_retry
        w.retry_at = w.failed_at + retry if retry > 0 and not w.refused else None

    def _retry_due(self, w: WorkerHandle, now: float) -> bool:
        """A failed stage is started again ``restart.failed_retry`` s after it failed: a
        server left degraded for good served nobody until someone restarted it by hand."""
        return w.retry_at is not None and now >= w.retry_at and not self.stopping

    def on_worker_exit(self, w: WorkerHandle, code: int | None, now: float, hung: bool = False) -> None:
        pid = w.pid
        w.last_exit = code
        if pid is not None:  # (None: never forked; reclaim(holder=None) would free every slot)
            for pool in self.pools.pools.values():
                pool.reclaim(holder=pid)
        for req, p in list(self.pending.items()):
            if w.identity in p.waiting:
                p.waiting.discard(w.identity)
                p.replies[w.stage] = {"ok": False, "error": GirisError(
                    f"stage {w.stage} died", code="stage_restarted").to_wire()}
                if not p.waiting:
                    del self.pending[req]
                    p.on_done(p.replies)
        if self.stopping:
            w.state = STOPPED
            return
        if getattr(w.proc, "orphaned", False):
            # its launcher died and took it along: not a crash of its own (three launcher
            # deaths failed every stage at max_restarts = 2)
            delay = w.policy.backoff_initial
        else:
            delay = w.policy.record_crash(now)
        refused = code == os.EX_CONFIG and not w.kind  # never started: its engine refuses
        if refused:                                    # its configuration, which retries
            delay = None                               # will not change
        log.warning("stage exited", extra={"stage": w.stage, "pid": pid, "code": code, "hung": hung,
                                            "why": exit_reason(code, hung, refused), "restart_in": delay})
        if self.metrics is not None and delay is not None:  # a restart is what it counts
            self.metrics.on_restart(w.stage)
        if delay is None:
            w.refused = refused
            w.failed_at = now
            w.state = FAILED
            self.schedule_retry(w)
            log.error(f"stage failed, the server is degraded: {w.retry_note()}",
                      extra={"stage": w.stage, "restarts": w.restarts, "code": code})
            self.delivery.stage_failed(w)
        else:
            w.state = BACKOFF
            w.restart_at = now + delay
            self.delivery.stage_down(w)

    def failed_stages(self) -> list[str]:
        return [w.stage for w in self.workers if w.state == FAILED]

    def fan_out(self, msg: P.Message, on_done: Callable[[dict[str, dict]], None],
                timeout: float | None = None) -> None:
        """Send ``msg`` to every worker; ``on_done(replies by stage)`` once all answered."""
        req = next(self._req)
        msg.meta["req"] = req
        targets = {w.identity for w in self.workers if w.state == READY}
        self.pending[req] = Pending(targets, on_done,
                                    time.monotonic() + (timeout or self.config.timeouts.request))
        frames = P.encode(msg)
        for ident in targets:
            self.control.send_multipart([ident, *frames])
        if not targets:
            p = self.pending.pop(req)
            p.on_done({})

    def tell_workers(self, msg: P.Message) -> None:
        frames = P.encode(msg)
        for w in self.workers:
            if w.state == READY:
                self.control.send_multipart([w.identity, *frames])

    def first_stage_socket(self) -> zmq.Socket:
        if not hasattr(self, "_first"):
            self._first = socket(self.ctx, zmq.PUSH, linger=0, sndhwm=0)
            self._first.connect(self.workers[0].spec["input"])
        return self._first

    # ------------------------------------------------------------------ status
    def state(self) -> str:
        """``starting`` until every stage was ready once and took the ``[defaults]``, then
        ``serving``; ``recovering`` while a stage is being restarted (new sessions get
        ``stage_unavailable``: retry shortly; it read ``serving`` while they were refused);
        ``degraded`` while a stage is marked failed (its sessions cannot be served);
        ``stopping``."""
        if self.stopping:
            return "stopping"
        if any(w.state == FAILED for w in self.workers):
            return "degraded"
        if not self.announced_ready:
            return "starting"
        return "serving" if all(w.state == READY for w in self.workers) else "recovering"

    def offers(self) -> list[str] | None:
        """The streams this pipeline makes for clients (``audio``, ``coeffs``, ``frames``),
        from what its stages' engines are; None until every stage has said (or when one is
        not of the four known kinds)."""
        kinds = [w.kind for w in self.workers]
        if not kinds or not all(k in STAGE_KINDS for k in kinds):
            return None
        out = ["audio"] if "tts" in kinds else []
        if "coeffs" in kinds or "motion" in kinds:
            out.append("coeffs")
        if kinds[-1] == "render":
            out.append("frames")
        return out

    def status(self) -> dict[str, Any]:
        used = self.registry.usage()
        devices = sorted(set(used) | set(self.config.budgets))
        return {
            "state": self.state(),
            "endpoint": self.endpoint, "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "workers": [w.describe() for w in self.workers],
            "sessions": len(self.registry),
            "pipeline": {"stages": self.config.stage_names(), "kinds": [w.kind or None for w in self.workers],
                         "offers": self.offers()},
            "budgets": {d: {"used": used.get(d, 0), "limit": self.config.budgets.get(d)} for d in devices},
            "pools": {p.name: {"slots": p.n_slots, "in_use": p.in_use(), "slot_bytes": p.slot_bytes}
                      for p in self.pools.pools.values()},
            "frames_out": self.delivery.frames_out,
            # clients not reading: what waits for them, and live frames dropped for them
            "outbox": self.gateway.outbox.describe(),
            "live": {"load": round(self.registry.live_load(), 4),
                     "capacity": self.config.limits.live_capacity or None},
        }

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        if getattr(self, "_down", False):
            return
        self._down = True
        self.stopping = True
        if self.notifier is not None:
            self.notifier.stopping()
        for rec in list(self.registry):
            self.gateway.close_session(rec, reason="shutdown")
        for w in self.workers:
            if w.state in (READY, STARTING):
                try:
                    self.control.send_multipart([w.identity, *P.encode(P.Message(P.STOP))])
                except zmq.ZMQError:
                    pass
        deadline = time.monotonic() + self.config.timeouts.shutdown
        loading = [w for w in self.workers if w.state == STARTING]
        for w in self.workers:  # all at once: each one's wait overlaps the others'
            w.ask_to_end()
        if loading and self.launcher is not None:
            # a start cut short: the launcher, busy preloading an engine (torch: seconds),
            # neither passes a signal on nor reports an exit meanwhile (an interrupted
            # `giris say` waited for it); the ready ones have had STOP: a moment to take
            # it, then the launcher goes, and its forks with it
            deadline = min(deadline, time.monotonic() + 0.5)
            for w in self.workers:
                if w not in loading:
                    w.reap(max(0.05, deadline - time.monotonic()), then_kill=False)
            self.launcher.close(timeout=0.2)
        for w in self.workers:
            w.reap(max(0.1, deadline - time.monotonic()))
        for w in self.workers:
            w.kill()
        if self.launcher is not None:
            self.launcher.close()
        self.delivery.flush()
        for pool in list(self.pools.pools.values()):
            pool.unlink()
        self.pools.close()
        self.gateway.close()
        for s in (getattr(self, "control", None), getattr(self, "sink", None), getattr(self, "_first", None)):
            if s is not None:
                s.close(0)
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        log.info("stopped")
