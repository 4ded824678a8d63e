"""What ``giris serve`` adds around the supervisor: systemd notify, metrics, reload.

The supervisor calls ``notifier.tick`` and ``metrics.tick`` from its loop, so a loop
that hangs stops the watchdog pings, and systemd restarts the service.
"""
from __future__ import annotations

import errno
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from giris.runtime.config import Config
from giris.runtime.errors import GirisError

if TYPE_CHECKING:
    from giris.supervisor.supervisor import Supervisor

log = logging.getLogger("giris.service")


class SystemdHooks:
    """READY=1 once every stage has loaded, STATUS= and WATCHDOG=1 from the loop."""

    def __init__(self, notifier: Any) -> None:
        self.n = notifier
        self.interval = notifier.watchdog_interval()
        self.next_watchdog = 0.0
        self.next_status = 0.0
        self.reload_requested = False
        #: ``reloader(sup, done)`` rereads the config; it calls ``done()`` when it has ended
        self.reloader: Any = None
        self.reloading = False
        #: called once the server is ready (``giris serve`` says where it serves then)
        self.on_ready: Callable[[], None] | None = None

    def ready(self) -> None:
        """Every stage is ready and took the ``[defaults]``: the server serves now."""
        self.n.ready()
        if self.on_ready is not None:
            self.on_ready()

    def stopping(self) -> None:
        self.n.stopping()

    def tick(self, sup: "Supervisor", now: float) -> None:
        if self.interval and now >= self.next_watchdog:
            self.n.watchdog()  # only from the loop: a hung loop stops pinging
            self.next_watchdog = now + self.interval
        if now >= self.next_status:
            self.next_status = now + 2.0
            states: dict[str, int] = {}
            for w in sup.workers:
                states[w.state] = states.get(w.state, 0) + 1
            workers = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
            self.n.status(f"{len(sup.registry)} session(s); workers: {workers}; "
                          f"{sup.delivery.frames_out} frames out")
        # a SIGHUP while the stages load waits for them (RELOADING=1 before READY=1 is no
        # state systemd knows), unless the server is degraded from its start: never ready,
        # it must still take, say, a new failed_retry
        starting = not sup.announced_ready and not sup.failed_stages()
        if self.reload_requested and self.reloader is not None and not self.reloading and not starting:
            self.reload_requested = False  # (another SIGHUP meanwhile: reloaded after this one)
            self.reloading = True
            self.n.reloading()
            try:
                self.reloader(sup, lambda: self._reloaded(sup))
            except BaseException:
                self._reloaded(sup)
                raise

    def _reloaded(self, sup: "Supervisor") -> None:
        """The reload ended, applied or not: systemd hears READY=1 again, if the server
        was ready (a SIGHUP while it starts must not make it ready early)."""
        if self.reloading:
            self.reloading = False
            if sup.announced_ready:
                self.n.ready()


class ServiceHooks:
    def __init__(self) -> None:
        self.notifier: SystemdHooks | None = None
        self.metrics: Any = None
        self.metrics_port = 0
        self._stop_metrics: Any = None
        self.reload_from: Any = None

    @classmethod
    def create(cls, cfg: Config) -> "ServiceHooks":
        from giris.supervisor.notify import Notifier

        hooks = cls()
        hooks.notifier = SystemdHooks(Notifier.from_env())
        hooks.notifier.reloader = hooks.reload
        if cfg.server.metrics_port:
            from giris.supervisor.metrics_hooks import MetricsHooks

            hooks.metrics = MetricsHooks(cfg)
            host, port = cfg.server.metrics_host, cfg.server.metrics_port
            try:
                hooks.metrics_port, hooks._stop_metrics = hooks.metrics.serve(host, port)
            except OSError as e:  # (it said "[Errno 98] Address already in use", no port)
                raise GirisError(f"cannot listen for metrics on {host}:{port}: {e.strerror or e}",
                                 code="endpoint_in_use" if e.errno == errno.EADDRINUSE else "bad_endpoint") from None
        return hooks

    def request_reload(self) -> None:
        """SIGHUP: signal-safe; the loop reloads on its next tick."""
        if self.notifier is not None:
            self.notifier.reload_requested = True

    def reload(self, sup: "Supervisor", done: Callable[[], None]) -> None:
        """Reload what can change without restarting stages: limits, budgets, timeouts,
        restart policy and session defaults. Stage and server settings need a restart.
        New defaults are applied once every stage's engine has judged them (``done()``
        then): one refusing them keeps the running config; a stage not there to judge
        them (failed, restarting) keeps the running defaults, the rest applies."""
        if self.reload_from is None:
            return done()
        args, make = self.reload_from
        try:
            new = make(args)
        except Exception as e:  # noqa: BLE001 - a bad file keeps the old config
            log.error("reload failed, keeping the running config", extra={"error": str(e)})
            return done()

        def judged(refused: str | None, unjudged: list[str]) -> None:
            try:
                if refused:
                    log.error("reload failed, keeping the running config", extra={"error": refused})
                    return
                if unjudged:  # the rest applies: a degraded server must still take a
                    # new restart policy (its failed stage is what cannot judge)
                    log.warning("reload kept the running [defaults]: reload again once every "
                                "stage is ready", extra={"unjudged": ",".join(unjudged)})
                    new.defaults = sup.config.defaults
                _apply(sup, new)
            finally:
                done()

        if new.defaults == sup.config.defaults:
            judged(None, [])  # nothing new for the engines to judge
        else:
            sup.check_defaults(new.defaults, judged)

    def close(self) -> None:
        if self._stop_metrics is not None:
            self._stop_metrics()


def _apply(sup: "Supervisor", new: Config) -> None:
    """Take a reloaded config's limits, budgets, timeouts, restart policy and defaults."""
    cfg = sup.config
    if new.timeouts.worker_heartbeat != cfg.timeouts.worker_heartbeat:
        sup.set_heartbeat(new.timeouts.worker_heartbeat)
    cfg.limits, cfg.timeouts, cfg.restart, cfg.defaults = new.limits, new.timeouts, new.restart, new.defaults
    cfg.budgets = new.budgets
    sup.registry.budgets = dict(new.budgets)
    for w in sup.workers:
        p = w.policy
        p.backoff_initial, p.backoff_max = new.restart.backoff_initial, new.restart.backoff_max
        p.max_restarts, p.window = new.restart.max_restarts, new.restart.window
        if w.state == "failed":  # a retry already scheduled follows the new failed_retry
            sup.schedule_retry(w)
    log.warning("reloaded limits, budgets, timeouts, restart policy and defaults",
                extra={"at": time.time()})
