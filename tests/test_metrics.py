"""Metrics on a private registry, scraped over HTTP on loopback."""
from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from giris.supervisor.metrics import Metrics


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def record(m: Metrics) -> None:
    m.observe_first_frame(0.4)
    m.observe_first_frame(1.2)
    m.observe_stage_latency("render", 0.03)
    m.add_frames(3)
    m.add_frames()
    m.stage_restarted("tts")
    m.error("limit_exceeded")
    m.error("limit_exceeded")
    m.set_sessions(2)
    m.set_fps(24.5)
    m.set_pool_in_use("render", 7)
    m.set_budget("cpu", 1000, 4000)
    m.set_budget("cuda:0", 10, None)
    m.set_workers({("tts", "ready"): 1, ("render", "starting"): 1})
    m.set_outbox(1, 5)
    m.set_outbox(2, 7)  # counted since start: the counter takes what is new


def check(s: dict) -> None:
    assert s[("giris_time_to_first_frame_seconds_count", ())] == 2
    assert s[("giris_time_to_first_frame_seconds_sum", ())] == pytest.approx(1.6)
    assert s[("giris_time_to_first_frame_seconds_bucket", (("le", "0.5"),))] == 1
    assert s[("giris_stage_latency_seconds_count", (("stage", "render"),))] == 1
    assert s[("giris_frames_total", ())] == 4
    assert s[("giris_stage_restarts_total", (("stage", "tts"),))] == 1
    assert s[("giris_errors_total", (("code", "limit_exceeded"),))] == 2
    assert s[("giris_sessions", ())] == 2
    assert s[("giris_frames_per_second", ())] == 24.5
    assert s[("giris_pool_slots_in_use", (("pool", "render"),))] == 7
    assert s[("giris_budget_used_bytes", (("device", "cpu"),))] == 1000
    assert s[("giris_budget_limit_bytes", (("device", "cpu"),))] == 4000
    assert s[("giris_budget_used_bytes", (("device", "cuda:0"),))] == 10
    assert ("giris_budget_limit_bytes", (("device", "cuda:0"),)) not in s  # unlimited
    assert s[("giris_workers", (("stage", "tts"), ("state", "ready")))] == 1
    assert s[("giris_workers", (("stage", "render"), ("state", "starting")))] == 1
    assert s[("giris_clients_not_reading", ())] == 2
    assert s[("giris_live_frames_dropped_total", ())] == 7


def test_render() -> None:
    m = Metrics()
    record(m)
    check(samples(m.render()))


def test_private_registries_do_not_collide() -> None:
    a, b = Metrics(), Metrics()
    a.add_frames(5)
    assert samples(a.render())[("giris_frames_total", ())] == 5
    assert samples(b.render())[("giris_frames_total", ())] == 0


def test_scrape_over_http() -> None:
    m = Metrics()
    record(m)
    port, stop = m.serve("127.0.0.1", 0)
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.status == 200
            text = r.read().decode()
        check(samples(text))
        m.add_frames(6)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert samples(r.read().decode())[("giris_frames_total", ())] == 10
    finally:
        stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_workers_replace_and_zero_stale() -> None:
    m = Metrics()
    m.set_workers([("tts", "starting"), ("coeffs", "starting"), ("coeffs", "starting")])
    s = samples(m.render())
    assert s[("giris_workers", (("stage", "coeffs"), ("state", "starting")))] == 2
    m.set_workers([("tts", "ready"), ("coeffs", "ready"), ("coeffs", "ready")])
    s = samples(m.render())
    assert s[("giris_workers", (("stage", "coeffs"), ("state", "starting")))] == 0
    assert s[("giris_workers", (("stage", "coeffs"), ("state", "ready")))] == 2


def test_update_fps() -> None:
    m = Metrics()
    assert m.update_fps(now=100.0) is None  # first call sets the mark
    m.add_frames(50)
    assert m.update_fps(now=100.5) is None  # too soon
    assert m.update_fps(now=102.0) == pytest.approx(25.0)
    assert samples(m.render())[("giris_frames_per_second", ())] == pytest.approx(25.0)
    assert m.update_fps(now=103.0) == 0.0


def test_every_stage_has_a_restart_count_from_the_start() -> None:
    """A counter with no sample until its first increment breaks rate() and absent-data
    alerts: each configured stage shows 0 restarts before any."""
    from prometheus_client import CollectorRegistry

    from giris.runtime.config import default_config
    from giris.supervisor.metrics_hooks import MetricsHooks

    hooks = MetricsHooks(default_config(), Metrics(CollectorRegistry()))
    s = samples(hooks.m.render())
    assert {stage: s[("giris_stage_restarts_total", (("stage", stage),))]
            for stage in ("tts", "coeffs", "motion", "render")} == dict.fromkeys(
        ("tts", "coeffs", "motion", "render"), 0.0)


def test_a_device_nobody_holds_anything_on_reads_zero() -> None:
    """With no budget configured, the gauge kept its last figure after every session had
    gone (3.4 MB, 24.7 MB in an operator's soak)."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from giris.runtime.config import default_config
    from giris.supervisor.metrics_hooks import MetricsHooks

    cfg = default_config()
    hooks = MetricsHooks(cfg, Metrics(CollectorRegistry()))
    held = {"cpu": 3_450_816}

    class Registry(dict):  # the sessions' registry: a length and what they hold
        def usage(self) -> dict[str, int]:
            return dict(held)

    sup = SimpleNamespace(config=cfg, registry=Registry(),
                          gateway=SimpleNamespace(outbox=SimpleNamespace(waiting={}, dropped_frames=0)),
                          pools=SimpleNamespace(pools={}), workers=[])
    hooks.tick(sup, now=1.0)
    assert samples(hooks.m.render())[("giris_budget_used_bytes", (("device", "cpu"),))] == 3_450_816
    held.clear()  # every session gone
    hooks.tick(sup, now=3.0)
    assert samples(hooks.m.render())[("giris_budget_used_bytes", (("device", "cpu"),))] == 0
