"""``giris serve`` as systemd and Prometheus see it."""
from __future__ import annotations

import re
import signal
import socket
import time
import urllib.request
from pathlib import Path

from giris.runtime.client import Frame
from tests.conftest import small_stages


def _datagrams(sock: socket.socket, seconds: float) -> list[tuple[float, str]]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            out.append((time.monotonic(), sock.recv(4096).decode()))
        except socket.timeout:
            break
    return out


def test_notify_ready_after_models_watchdog_from_the_loop_and_stopping(make_server, tmp_path: Path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    load_s = 1.5
    t0 = time.monotonic()
    srv = make_server({"stages": small_stages(render={"options": {"load_s": load_s}})}, wait=False,
                      env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000", "GIRIS_TEST_HOOKS": "1"})
    ready_at = None
    seen: list[tuple[float, str]] = []
    while ready_at is None and time.monotonic() - t0 < 60:
        for t, msg in _datagrams(sock, 0.5):
            seen.append((t, msg))
            if "READY=1" in msg.split("\n"):
                ready_at = t
                break
    assert ready_at is not None, seen
    assert ready_at - t0 >= load_s  # not before the slowest stage loaded its model
    st = srv.client().status()
    assert all(w["state"] == "ready" for w in st["workers"])
    # watchdog pings every WATCHDOG_USEC/2 while the loop turns
    beats = [t for t, m in _datagrams(sock, 1.5) if "WATCHDOG=1" in m]
    assert len(beats) >= 3
    # a loop that hangs (3 s, threads still alive) sends none
    srv.proc.send_signal(signal.SIGUSR2)
    time.sleep(0.3)
    _datagrams(sock, 0.05)  # drop what was in flight
    quiet = [m for _, m in _datagrams(sock, 2.0) if "WATCHDOG=1" in m]
    assert quiet == []
    time.sleep(1.5)
    assert [m for _, m in _datagrams(sock, 1.0) if "WATCHDOG=1" in m]  # back once it turns
    assert any("STATUS=" in m for _, m in seen + _datagrams(sock, 2.5))
    assert srv.stop(signal.SIGTERM) == 0
    rest = [m for _, m in _datagrams(sock, 1.0)]
    assert any("STOPPING=1" in m for m in rest), rest
    sock.close()


def test_metrics_endpoint_shows_frames_and_sessions_while_streaming(make_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = make_server({"server": {"metrics_port": port},
                       "stages": small_stages(render={"options": {"render_s": 0.01}}),
                       "budgets": {"cpu": "1GiB"}})
    session = srv.client().open_session()
    scraped = None
    for item in session.say(" ".join(["word"] * 20)):
        if isinstance(item, Frame) and item.index == 60:
            time.sleep(1.2)  # gauges refresh once a second
            scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert scraped is not None

    def value(name: str) -> float:
        m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", scraped, re.M)
        assert m, name
        return float(m.group(1))

    assert value("giris_frames_total") > 0
    assert value("giris_sessions") == 1
    assert value("giris_frames_per_second") > 0
    assert 'giris_budget_limit_bytes{device="cpu"} 1.073741824e+09' in scraped
    assert "giris_stage_latency_seconds_bucket" in scraped
    assert 'giris_workers{stage="render",state="ready"} 1.0' in scraped


def test_a_reload_while_the_server_starts_does_not_make_it_ready_early(make_server, tmp_path: Path):
    """A SIGHUP while the stages load: its reload ended with READY=1, so systemd took the
    server as ready (and started what waits for it) before any stage could serve. The
    reload now waits for the server to be ready, then runs."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    load_s = 3.0
    srv = make_server({"stages": small_stages(render={"options": {"load_s": load_s}})}, wait=False,
                      env={"NOTIFY_SOCKET": path})
    deadline = time.monotonic() + 30
    while "starting" not in srv.logs() and time.monotonic() < deadline:  # its handlers are set
        time.sleep(0.05)
    srv.proc.send_signal(signal.SIGHUP)
    hup_at = time.monotonic()
    seen: list[tuple[float, str]] = []
    while not any("READY=1" in m.split("\n") for _, m in seen) and time.monotonic() < deadline:
        seen += _datagrams(sock, 0.5)
    ready_at = next(t for t, m in seen if "READY=1" in m.split("\n"))
    assert srv.client().status()["state"] == "serving"
    assert ready_at - hup_at > 1.0, seen  # the stages were still loading: not at the reload's end
    # the reload waited for the server to be ready (no RELOADING=1 before it), then ran
    said = [m for _, m in seen + _datagrams(sock, 2.0)]
    first_ready = next(i for i, m in enumerate(said) if "READY=1" in m.split("\n"))
    reloading = [i for i, m in enumerate(said) if "RELOADING=1" in m]
    assert reloading and reloading[0] > first_ready, said
    assert any("READY=1" in m.split("\n") for m in said[reloading[0] + 1:]), said
    sock.close()
