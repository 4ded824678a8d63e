"""Feeds the supervisor's events and state into :class:`Metrics` (Prometheus)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from giris.runtime.config import Config
from giris.supervisor.metrics import Metrics

if TYPE_CHECKING:
    from giris.supervisor.process import WorkerHandle
    from giris.supervisor.supervisor import Supervisor


class MetricsHooks:
    """The supervisor calls these from its loop; gauges refresh once a second."""

    def __init__(self, cfg: Config, metrics: Metrics | None = None) -> None:
        self.m = metrics or Metrics()
        self.budgets = dict(cfg.budgets)
        for stage in cfg.stage_names():  # a 0 from the start: rate() and alerts need a first sample
            self.m.stage_restarts.labels(stage=stage)
        self.next_refresh = 0.0
        self._devices: set[str] = set()  # every device a gauge was published for

    def serve(self, host: str, port: int) -> tuple[int, Callable[[], None]]:
        return self.m.serve(host, port)

    def on_heartbeat(self, w: "WorkerHandle", beat: dict[str, Any]) -> None:
        for seconds in beat.get("latencies", ())[:256]:
            self.m.observe_stage_latency(w.stage, float(seconds))

    def on_restart(self, stage: str) -> None:
        self.m.stage_restarted(stage)

    def on_first_frame(self, seconds: float) -> None:
        self.m.observe_first_frame(seconds)

    def on_frame(self) -> None:
        self.m.add_frames(1)

    def on_error(self, code: str) -> None:
        self.m.error(code)

    def tick(self, sup: "Supervisor", now: float) -> None:
        if now < self.next_refresh:
            return
        self.next_refresh = now + 1.0
        self.m.update_fps(now)
        self.m.set_sessions(len(sup.registry))
        out = sup.gateway.outbox
        self.m.set_outbox(len(out.waiting), out.dropped_frames)
        for pool in sup.pools.pools.values():
            self.m.set_pool_in_use(pool.name.rsplit("-", 1)[-1], pool.in_use())
        used = sup.registry.usage()
        # a device nobody holds anything on any more reads 0, not its last figure
        self._devices |= set(used) | set(sup.config.budgets)
        for dev in sorted(self._devices):
            self.m.set_budget(dev, used.get(dev, 0), sup.config.budgets.get(dev))
        self.m.set_workers([(w.stage, w.state) for w in sup.workers])
