"""Prometheus metrics for one runtime, on a private registry.

Why a private ``CollectorRegistry``: the global one refuses a second metric of the same
name, and an embedding product may run several runtimes (or tests many) in one process.
Every metric lives on ``Metrics.registry``, which :meth:`Metrics.serve` exposes over HTTP
and :meth:`Metrics.render` as text.

The supervisor calls the ``record``-style methods from its loop; nothing here blocks.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

#: time to first frame: from say() to the first frame leaving the gateway
FIRST_FRAME_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
#: one stage's time per message
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.0)


class Metrics:
    """The runtime's metrics. Label values are free strings (stage and pool names,
    ``cpu``/``cuda:0``, error codes)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.time_to_first_frame = Histogram(
            "giris_time_to_first_frame_seconds", "Seconds from say() to the first frame sent",
            buckets=FIRST_FRAME_BUCKETS, registry=r)
        self.stage_latency = Histogram(
            "giris_stage_latency_seconds", "Seconds a stage spent on one message",
            ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.frames = Counter("giris_frames", "Frames sent to clients", registry=r)
        self.stage_restarts = Counter(
            "giris_stage_restarts", "Worker restarts after a crash or hang", ["stage"], registry=r)
        self.errors = Counter("giris_errors", "Errors reported to clients, by code", ["code"], registry=r)
        self.sessions = Gauge("giris_sessions", "Open sessions", registry=r)
        self.fps = Gauge("giris_frames_per_second", "Frames sent per second, all sessions", registry=r)
        self.pool_in_use = Gauge(
            "giris_pool_slots_in_use", "Shared-memory pool slots held", ["pool"], registry=r)
        self.budget_used = Gauge(
            "giris_budget_used_bytes", "Bytes admitted sessions hold on a device", ["device"], registry=r)
        self.budget_limit = Gauge(
            "giris_budget_limit_bytes", "The device's session memory budget", ["device"], registry=r)
        self.workers = Gauge(
            "giris_workers", "Workers by stage and state", ["stage", "state"], registry=r)
        self.clients_waiting = Gauge(
            "giris_clients_not_reading", "Clients whose messages wait: they stopped reading", registry=r)
        self.live_dropped = Counter(
            "giris_live_frames_dropped", "Live frames dropped for clients not reading", registry=r)
        self._dropped_seen = 0
        self._lock = threading.Lock()
        self._frames_seen = 0
        self._rate_mark: tuple[float, int] | None = None
        self._worker_labels: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ events
    def observe_first_frame(self, seconds: float) -> None:
        self.time_to_first_frame.observe(seconds)

    def observe_stage_latency(self, stage: str, seconds: float) -> None:
        self.stage_latency.labels(stage=stage).observe(seconds)

    def add_frames(self, n: int = 1) -> None:
        self.frames.inc(n)
        with self._lock:
            self._frames_seen += n

    def stage_restarted(self, stage: str) -> None:
        self.stage_restarts.labels(stage=stage).inc()

    def error(self, code: str) -> None:
        self.errors.labels(code=code).inc()

    # ------------------------------------------------------------------ state
    def set_sessions(self, n: int) -> None:
        self.sessions.set(n)

    def set_fps(self, fps: float) -> None:
        self.fps.set(fps)

    def update_fps(self, now: float | None = None, min_interval: float = 1.0) -> float | None:
        """Set the fps gauge from the frames counted since the last update; call it from
        the loop. Returns the new value, or None if less than ``min_interval`` passed."""
        now = time.monotonic() if now is None else now
        with self._lock:
            seen = self._frames_seen
            mark = self._rate_mark
            if mark is None:
                self._rate_mark = (now, seen)
                return None
            dt = now - mark[0]
            if dt < min_interval:
                return None
            self._rate_mark = (now, seen)
        fps = (seen - mark[1]) / dt
        self.fps.set(fps)
        return fps

    def set_outbox(self, clients_waiting: int, live_frames_dropped: int) -> None:
        """The outbox's state; ``live_frames_dropped`` counted since start (the counter
        takes what is new)."""
        self.clients_waiting.set(clients_waiting)
        if live_frames_dropped > self._dropped_seen:
            self.live_dropped.inc(live_frames_dropped - self._dropped_seen)
            self._dropped_seen = live_frames_dropped

    def set_pool_in_use(self, pool: str, slots: int) -> None:
        self.pool_in_use.labels(pool=pool).set(slots)

    def set_budget(self, device: str, used: int, limit: int | None = None) -> None:
        """``limit`` None or 0 means unlimited: no limit series for that device."""
        self.budget_used.labels(device=device).set(used)
        if limit:
            self.budget_limit.labels(device=device).set(limit)
        else:
            try:
                self.budget_limit.remove(device)
            except KeyError:
                pass

    def set_workers(self, counts: Mapping[tuple[str, str], int] | Iterable[tuple[str, str]]) -> None:
        """Replace the worker gauge: ``{(stage, state): n}``, or an iterable of
        ``(stage, state)`` pairs, one per worker. Series for states no worker is in any
        longer drop to 0 (kept, so rate queries over them stay continuous)."""
        if isinstance(counts, Mapping):
            totals = {(str(s), str(st)): int(n) for (s, st), n in counts.items()}
        else:
            totals = {}
            for s, st in counts:
                totals[(str(s), str(st))] = totals.get((str(s), str(st)), 0) + 1
        with self._lock:
            for key in self._worker_labels - set(totals):
                self.workers.labels(stage=key[0], state=key[1]).set(0)
            for (s, st), n in totals.items():
                self.workers.labels(stage=s, state=st).set(n)
            self._worker_labels |= set(totals)

    # ------------------------------------------------------------------ output
    def render(self) -> str:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry).decode()

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> tuple[int, Callable[[], None]]:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread (port 0: a free one).
        Returns the port actually bound and a ``stop()`` that closes the socket.

        Bind to loopback unless a scraper elsewhere needs it: the metrics carry no secrets
        but the endpoint has no authentication."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return int(server.server_address[1]), stop
