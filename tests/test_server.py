"""The runtime as a user meets it: a real server, real workers, real sockets.

These use the small test engines (fast, and able to crash or hang on cue); the default
engines are tested end to end in test_say_e2e.py.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import psutil
import pytest
import zmq

from giris.runtime import protocol as P
from giris.runtime.client import Event, Frame
from giris.runtime.errors import (BadInput, BudgetExceeded, GirisError, LimitExceeded,
                                  SessionNotFound, StageFailed)
from tests.conftest import collect, shm_segments, small_stages

WORD_S = 0.2


def eventually(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True  # test-source speaks each word for 0.2 s of tone


def test_say_streams_audio_then_frames_with_one_clock(make_server):
    srv = make_server()
    s = srv.client().open_session(want=["audio", "frames", "coeffs"])
    out = collect(s, "one two three")
    audio = out["audio"]
    assert [a.seq for a in audio] == [0, 1, 2]
    samples = sum(len(a.pcm) for a in audio)
    assert samples == 3 * int(WORD_S * 16000)
    n = math.ceil(samples / 16000 * 25)
    assert [f[0] for f in out["frames"]] == list(range(n))
    assert out["frames"][-1][2] is True
    assert sum(c.values.shape[0] for c in out["coeffs"]) == n
    done = out["events"][-1]
    assert done.kind == "utterance_done" and done.meta["complete"] and done.meta["frames"] == n
    # a second utterance continues the session clock: no frame index repeats
    out2 = collect(s, "four")
    assert out2["audio"][0].start_sample == samples
    assert out2["frames"][0][0] == n


def test_utterance_ends_after_every_stream_it_sends_the_client(make_server):
    """Coefficients leave the motion stage for the client on a connection of their own, and
    may reach the server after the frames they led to: the utterance is not done (and the
    client does not stop reading) before they are in."""
    srv = make_server({"stages": small_stages(motion={"options": {"client_late_s": 0.3}})})
    s = srv.client().open_session(want=["audio", "frames", "coeffs"])
    out = collect(s, "one two")
    n = len(out["frames"])
    assert n == math.ceil(2 * WORD_S * 25) and out["frames"][-1][2] is True
    assert sum(c.values.shape[0] for c in out["coeffs"]) == n
    assert out["events"][-1].kind == "utterance_done" and out["events"][-1].meta["complete"]



@pytest.mark.parametrize("stages, offers", [
    (["tts"], ["audio"]),                         # a voice service
    (["tts", "coeffs", "motion"], ["audio", "coeffs"]),  # clients that drive their own 3D rig
])
def test_a_pipeline_without_a_renderer_serves_what_it_makes(make_server, stages, offers):
    """A server whose pipeline stops short of rendering ends each utterance after its last
    stage's output (it waited forever before), and a session asking for a stream the
    pipeline cannot make is refused at open, with what it does make."""
    srv = make_server({"stages": {k: v for k, v in small_stages().items() if k in stages}})
    c = srv.client()
    with pytest.raises(BadInput, match="frames") as e:
        c.open_session(want=["audio", "frames"])
    assert e.value.details.get("offers") == offers
    s = c.open_session(want=offers)
    for _ in range(2):  # and again: the first utterance's end left nothing behind
        t0 = time.monotonic()
        out = collect(s, "one two", timeout=10)
        assert time.monotonic() - t0 < 5
        samples = sum(len(a.pcm) for a in out["audio"])
        assert samples == 2 * int(WORD_S * 16000) and out["audio"][-1].final
        if "coeffs" in offers:
            assert sum(c.values.shape[0] for c in out["coeffs"]) == math.ceil(samples / 16000 * 25)
        done = out["events"][-1]
        assert done.kind == "utterance_done" and done.meta["complete"] and done.meta["frames"] == 0
    assert srv.status()["pipeline"]["offers"] == offers

def test_zero_copy_client_reads_the_pool_and_releases(make_server):
    srv = make_server()
    c = srv.client()
    s = c.open_session(zero_copy=True)
    seen = []
    for item in s.say("alpha beta"):
        if isinstance(item, Frame):
            assert not item.image.flags.owndata  # a view into the shared pool
            seen.append(item.index)
            item.release()
    assert seen == list(range(len(seen))) and len(seen) == 10
    assert eventually(lambda: list(srv.status()["pools"].values())[0]["in_use"] == 0)


@pytest.mark.parametrize("stage", ["tts", "coeffs", "motion", "render"])
def test_sigkill_of_a_stage_mid_stream_restarts_it_and_the_session_goes_on(make_server, stage):
    srv = make_server()
    c = srv.client()
    s = c.open_session()
    before = {w["stage"]: w for w in srv.status()["workers"]}
    victim = before[stage]["pid"]
    indexes: list[int] = []
    events: list[Event] = []
    killed = False
    text = " ".join(["SLOW"] * 40)  # 8 s of audio, produced slowly, so the kill lands mid-stream
    for item in s.say(text, timeout=30):
        if isinstance(item, Frame):
            indexes.append(item.index)
            item.release()
            if not killed and len(indexes) >= 5:
                os.kill(victim, signal.SIGKILL)
                killed = True
        elif isinstance(item, Event):
            events.append(item)
    kinds = [e.kind for e in events]
    assert "stage_restarted" in kinds, kinds
    restarted = next(e for e in events if e.kind == "stage_restarted")
    assert restarted.meta["stage"] == stage
    after = {w["stage"]: w for w in srv.status()["workers"]}
    assert after[stage]["pid"] != victim and after[stage]["restarts"] == 1
    assert after[stage]["state"] == "ready"
    # no index twice, always increasing; any gap lies after the reported last frame
    assert indexes == sorted(set(indexes))
    gaps = [(a, b) for a, b in zip(indexes, indexes[1:]) if b != a + 1]
    for a, _ in gaps:
        assert a >= restarted.meta["last_frame"] - 64
    # and the session keeps working after the restart
    out = collect(s, "after restart")
    assert len(out["frames"]) == math.ceil(2 * WORD_S * 25)
    assert out["frames"][0][0] > (indexes[-1] if indexes else -1)


def test_a_say_cut_by_a_tts_crash_ends_when_tts_is_back_and_is_counted(make_server):
    """The text of a say dies with the tts that was speaking it: once tts is back the
    utterance ends, ``lost``, with no wait for ``lost_after`` (30 s here), the stages
    behind drop the rest of it, the loss is counted in the errors metric, and the
    session's next say is whole."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    srv = make_server({"timeouts": {"lost_after": 30.0}, "server": {"metrics_port": port}})
    s = srv.client().open_session()
    tts = next(w["pid"] for w in srv.status()["workers"] if w["stage"] == "tts")
    killed_at = None
    items = []
    for item in s.say(" ".join(["SLOW"] * 40), timeout=60):
        items.append(item)
        if isinstance(item, Frame):
            item.release()
            if killed_at is None and item.index >= 4:
                os.kill(tts, signal.SIGKILL)
                killed_at = time.monotonic()
    ended = time.monotonic() - killed_at
    done = items[-1]
    assert done.kind == "utterance_done" and done.meta.get("lost") is True and not done.meta["complete"]
    assert ended < 10.0, ended
    kinds = [i.kind for i in items if isinstance(i, Event)]
    assert kinds.index("stage_restarted") < len(kinds) - 1
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'giris_errors_total{code="utterance_lost"} 1.0' in text
    out = collect(s, "after restart")
    assert len(out["frames"]) == math.ceil(2 * WORD_S * 25)


def test_audio_chunk_numbers_go_on_across_a_tts_restart(make_server):
    """``audio``'s ``seq`` counts the session's chunks (README: one clock per session), as
    ``start_sample`` does its samples; a restarted tts got the sample clock back but
    numbered its chunks from 0 again, so a session's chunk numbers repeated."""
    srv = make_server()
    s = srv.client().open_session()
    before = [a.seq for a in collect(s, "one two three")["audio"]]
    tts = next(w["pid"] for w in srv.status()["workers"] if w["stage"] == "tts")
    os.kill(tts, signal.SIGKILL)
    assert eventually(lambda: any(w["stage"] == "tts" and w["pid"] != tts and w["state"] == "ready"
                                  for w in srv.status()["workers"]), timeout=30)
    after = [a.seq for a in collect(s, "four five")["audio"]]
    assert before == [0, 1, 2] and after == [3, 4]


def test_workers_are_forked_from_the_launcher_and_outlive_its_death(make_server):
    """Workers (first ones and restarted ones) come from the launcher, which preloaded
    their engines; if the launcher itself dies, its workers die with it, a new launcher
    is started (logged) and they come back forked from it, and the server serves on.
    With ``launcher = "spawn"`` they are the server's own children."""
    srv = make_server()
    server = psutil.Process(srv.proc.pid)
    workers = {w["stage"]: w["pid"] for w in srv.status()["workers"]}
    (launcher,) = [p for p in server.children() if p.pid not in workers.values()]
    assert {psutil.Process(pid).ppid() for pid in workers.values()} == {launcher.pid}
    os.kill(workers["render"], signal.SIGKILL)
    assert eventually(lambda: all(w["state"] == "ready" and w["pid"] != workers["render"]
                                  for w in srv.status()["workers"] if w["stage"] == "render"))
    render = next(w["pid"] for w in srv.status()["workers"] if w["stage"] == "render")
    assert psutil.Process(render).ppid() == launcher.pid
    launcher.kill()
    assert eventually(lambda: all(w["state"] == "ready" and w["pid"] not in workers.values()
                                  and w["pid"] != render for w in srv.status()["workers"]), timeout=30)
    pids = {w["pid"] for w in srv.status()["workers"]}
    (second,) = [p for p in server.children() if p.pid not in pids]
    assert second.pid != launcher.pid and "launcher died, starting a new one" in srv.logs()
    assert {psutil.Process(pid).ppid() for pid in pids} == {second.pid}
    out = collect(srv.client().open_session(), "still here")
    assert len(out["frames"]) == math.ceil(2 * WORD_S * 25)

    plain = make_server({"server": {"launcher": "spawn"}})
    pids = {w["pid"] for w in plain.status()["workers"]}
    assert {p.pid for p in psutil.Process(plain.proc.pid).children()} == pids


def test_a_launcher_that_keeps_dying_is_given_up_for_fresh_interpreters(make_server):
    """A launcher that dies three times in a minute (say an engine's preload crashes it
    each time) is not started a fourth time: workers then start as fresh interpreters,
    children of the server, and the server serves on."""
    srv = make_server({"restart": {"max_restarts": 1}})
    server = psutil.Process(srv.proc.pid)

    def launcher() -> psutil.Process | None:
        workers = {w["pid"] for w in srv.status()["workers"]}
        rest = [p for p in server.children() if p.pid not in workers]
        return rest[0] if rest else None

    seen: set[str] = set()
    for _ in range(3):  # (not a crash of the workers it took along: max_restarts 1 holds)
        old = launcher()
        assert old is not None
        old.kill()

        def back() -> bool:
            st = srv.status()
            seen.add(st["state"])  # (while they come back: recovering, not serving)
            return all(w["state"] == "ready" for w in st["workers"]) and (
                (now := launcher()) is None or now.pid != old.pid)

        assert eventually(back, timeout=30)
    assert "launcher keeps dying" in srv.logs()
    assert eventually(lambda: all(w["state"] == "ready" for w in srv.status()["workers"]), timeout=30)
    assert launcher() is None
    assert {psutil.Process(w["pid"]).ppid() for w in srv.status()["workers"]} == {server.pid}
    assert srv.status()["state"] == "serving"  # three launcher deaths failed no stage
    assert "recovering" in seen
    assert len(collect(srv.client().open_session(), "still here")["frames"]) == math.ceil(2 * WORD_S * 25)


def test_a_preload_that_initialises_cuda_ends_forking(make_server):
    """An engine whose preload initialised CUDA (against the rule: a forked child cannot
    use the parent's context) makes the launcher stop forking: that stage and any started
    later are fresh interpreters, the workers forked before it run on untouched (no
    restart), and the server serves."""
    srv = make_server({"stages": small_stages(render={"options": {"preload_claims_cuda": True}})})
    server = psutil.Process(srv.proc.pid)
    assert eventually(lambda: all(w["state"] == "ready" and w["pid"] for w in srv.status()["workers"]),
                      timeout=30)
    workers = {w["stage"]: w for w in srv.status()["workers"]}
    assert all(w["restarts"] == 0 for w in workers.values())
    (launcher,) = [p for p in server.children() if p.pid not in {w["pid"] for w in workers.values()}]
    parents = {stage: psutil.Process(w["pid"]).ppid() for stage, w in workers.items()}
    assert parents == {"tts": launcher.pid, "coeffs": launcher.pid, "motion": launcher.pid,
                       "render": server.pid}
    os.kill(workers["tts"]["pid"], signal.SIGKILL)  # and a restart after it is fresh too
    assert eventually(lambda: next(w for w in srv.status()["workers"] if w["stage"] == "tts")["state"]
                      == "ready" and next(w for w in srv.status()["workers"]
                                          if w["stage"] == "tts")["pid"] != workers["tts"]["pid"])
    tts = next(w["pid"] for w in srv.status()["workers"] if w["stage"] == "tts")
    assert psutil.Process(tts).ppid() == server.pid
    out = collect(srv.client().open_session(), "still here")
    assert len(out["frames"]) == math.ceil(2 * WORD_S * 25)


def test_the_server_answers_while_the_launcher_preloads_an_engine(make_server):
    """An engine is preloaded before its first fork (seconds, for torch and dlib); the
    supervisor's loop does not wait for it: status answers meanwhile, the stage starting
    and not yet forked, a session open is told the server is starting, then the server
    serves."""
    srv = make_server({"stages": small_stages(render={"options": {"preload_s": 5.0}})}, wait=False)
    c = srv.client(timeout=2.0)
    st = None
    deadline = time.monotonic() + 30
    while st is None and time.monotonic() < deadline:
        try:
            st = c.status(timeout=1.0)
        except GirisError:
            time.sleep(0.05)
    render = next(w for w in st["workers"] if w["stage"] == "render")
    assert st["state"] == "starting" and render["state"] == "starting" and render["pid"] is None
    with pytest.raises(GirisError, match="the server is starting") as e:  # not "a stage is restarting"
        c.open_session()
    assert e.value.code == "stage_unavailable"
    assert srv.wait_serving()["state"] == "serving"


def test_hung_stage_is_killed_and_restarted(make_server):
    srv = make_server()
    s = srv.client().open_session()
    tts_pid = next(w["pid"] for w in srv.status()["workers"] if w["stage"] == "tts")
    utt = s.start_say("hello HANG")
    items = list(s.stream(utt, timeout=30))
    done = items[-1]
    assert done.kind == "utterance_done" and not done.meta["complete"]
    assert any(isinstance(i, Event) and i.kind == "stage_restarted" for i in items)
    w = next(w for w in srv.status()["workers"] if w["stage"] == "tts")
    assert w["pid"] != tts_pid and w["state"] == "ready"
    assert len(collect(s, "still here")["frames"]) == 10


def test_crash_looping_stage_is_marked_failed_and_server_stays_up(make_server):
    import socket
    import urllib.request

    with socket.socket() as probe:  # a free port for the metrics
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    srv = make_server({"stages": small_stages(motion={"engine": "test-relay",
                                                     "options": {"crash_on_start": True}}),
                       "restart": {"backoff_initial": 0.05, "backoff_max": 0.1, "max_restarts": 2},
                       "server": {"metrics_port": port}},
                      wait=False)
    st = srv.wait_serving(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = srv.status()
        if any(w["state"] == "failed" for w in st["workers"]):
            break
        time.sleep(0.1)
    motion = next(w for w in st["workers"] if w["stage"] == "motion")
    assert motion["state"] == "failed" and motion["restarts"] == 2
    with pytest.raises(StageFailed) as e:
        srv.clients[0].open_session()
    assert "motion" in str(e.value)
    assert srv.status()["state"] == "degraded"  # still answering, and saying why it cannot serve
    # the metric counts restarts, as status does (it counted the last exit too, not restarted)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'giris_stage_restarts_total{stage="motion"} 2.0' in text
    assert "error" in srv.logs() and "stage failed, the server is degraded: tried again in" in srv.logs()


def test_a_failed_stage_is_tried_again_after_failed_retry_and_the_server_serves(make_server, tmp_path):
    """A stage failed by a crash loop is started again ``failed_retry`` s later: once
    what made it crash has passed, the server serves again on its own (it stayed
    degraded until someone restarted it)."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    flag = tmp_path / "crash-while-this-exists"
    flag.touch()
    srv = make_server({"stages": small_stages(motion={"options": {"crash_on_start": str(flag)}}),
                       "restart": {"backoff_initial": 0.05, "backoff_max": 0.1, "max_restarts": 1,
                                   "failed_retry": 1.5}, "server": {"metrics_port": port}}, wait=False)
    srv.wait_serving(timeout=60)
    assert eventually(lambda: srv.status()["state"] == "degraded", timeout=30)
    with pytest.raises(StageFailed, match=r"motion failed \(tried again in \d+ s\)"):
        srv.clients[0].open_session()
    motion = next(w for w in srv.status()["workers"] if w["stage"] == "motion")
    assert 0 <= motion["retry_in_s"] <= 1.5  # status says when
    # while the cause holds, each retry fails it again: degraded, not a tight crash loop
    time.sleep(2.0)
    motion = next(w for w in srv.status()["workers"] if w["stage"] == "motion")
    assert 2 <= motion["restarts"] <= 6, motion
    flag.unlink()
    assert eventually(lambda: srv.status()["state"] == "serving", timeout=30), srv.logs()
    assert "retrying failed stage" in srv.logs()
    out = collect(srv.client().open_session(), "back again")
    assert len(out["frames"]) == math.ceil(2 * WORD_S * 25)
    # the metric counts the retries as status does (it missed them)
    restarts = next(w for w in srv.status()["workers"] if w["stage"] == "motion")["restarts"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert f'giris_stage_restarts_total{{stage="motion"}} {float(restarts)}' in text


def test_a_reload_reschedules_a_failed_stages_retry(make_server):
    """SIGHUP with a new ``failed_retry`` applies to a stage already failed (the old
    schedule stood: 0, "never", still retried it)."""
    srv = make_server({"stages": small_stages(motion={"options": {"crash_on_start": True}}),
                       "restart": {"backoff_initial": 0.05, "backoff_max": 0.1, "max_restarts": 0,
                                   "failed_retry": 300}}, wait=False)
    srv.wait_serving(timeout=60)
    assert eventually(lambda: srv.status()["state"] == "degraded", timeout=30)
    motion = lambda: next(w for w in srv.status()["workers"] if w["stage"] == "motion")  # noqa: E731
    assert motion()["retry_in_s"] > 200
    # new [defaults] too, which the failed stage cannot judge: the rest still applies (the
    # whole reload was refused, so a degraded server could not be told to retry), the
    # running defaults stay
    srv.config_path.write_text(srv.config_path.read_text().replace("failed_retry = 300", "failed_retry = 0")
                               .replace("size = 64", "size = 64\nintensity = 0.3"))
    os.kill(srv.proc.pid, signal.SIGHUP)
    assert eventually(lambda: motion()["retry_in_s"] is None, timeout=10), srv.logs()
    assert "kept the running [defaults]" in srv.logs()


def test_log_json_is_one_object_per_line_even_for_a_worker_crash(tmp_path):
    """Under ``--log-json`` every line the server and its workers write is a JSON object,
    a worker's traceback included (it was printed bare), and the supervisor's line on a
    stage's exit says why it ended."""
    import json

    from tests.conftest import write_toml

    endpoint = f"ipc://{tmp_path}/gw.sock"
    cfg = write_toml(tmp_path / "g.toml", {
        "server": {"endpoint": endpoint}, "defaults": {"size": 64}, "limits": {"min_size": 32},
        "restart": {"max_restarts": 0, "failed_retry": 0},
        "stages": small_stages(coeffs={"options": {"raise_on_start": True}})})
    proc = subprocess.Popen([sys.executable, "-m", "giris.supervisor.cli", "--log-json", "--log-level",
                             "INFO", "serve", "--config", str(cfg)], stderr=subprocess.PIPE, text=True)
    try:
        from giris.runtime.client import Client

        with Client(endpoint, timeout=5) as c:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if c.status(timeout=1)["state"] == "degraded":
                        break
                except GirisError:
                    pass
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    lines = [json.loads(line) for line in err.splitlines()]
    # degraded from the start: never ready, so it never said it was serving (that line, JSON
    # with its url, comes once a server is: test_defaults_a_session_could_open_with_serve)
    assert not any(x["event"] == "serving on" for x in lines)
    crash = next(x for x in lines if x["event"] == "engine failed to start")
    assert crash["stage"] == "coeffs" and "raise_on_start" in crash["exc"] and "Traceback" in crash["exc"]
    exited = next(x for x in lines if x["event"] == "stage exited")
    assert exited["stage"] == "coeffs" and exited["code"] == 1 and "failed" in exited["why"]


def test_budget_refuses_the_session_that_would_exceed_it_with_figures(make_server):
    mb = 1024 * 1024
    srv = make_server({"stages": small_stages(render={"options": {"estimate_bytes": 100 * mb}}),
                       "budgets": {"cpu": 250 * mb}})
    c = srv.client()
    a, b = c.open_session(), c.open_session()
    with pytest.raises(BudgetExceeded) as e:
        c.open_session()
    d = e.value.details
    assert d["device"] == "cpu" and d["requested"] == 100 * mb
    assert d["in_use"] == 200 * mb and d["budget"] == 250 * mb
    assert srv.status()["budgets"]["cpu"] == {"used": 200 * mb, "limit": 250 * mb}
    assert len(collect(a, "still streaming")["frames"]) == 10  # the others keep running
    b.close()
    c.open_session()  # room again once one closed


def test_live_capacity_refuses_the_live_session_past_it_with_figures(make_server):
    """Past what the host renders live, every live session stalls; an operator sets the
    capacity ``perf render --capacity`` measured, and the session past it is refused."""
    from giris.runtime.errors import LimitExceeded

    srv = make_server({"limits": {"live_capacity": 1.5}})
    c = srv.client()
    live = c.open_session(realtime=True, size=512)  # 1.0
    quarter = c.open_session(realtime=True, size=256)  # 0.25
    with pytest.raises(LimitExceeded) as e:
        c.open_session(realtime=True, size=256, fps=50)  # 0.5: 1.75 > 1.5
    assert e.value.details == {"limit": 1.5, "requested": 0.5, "in_use": 1.25}
    assert "live capacity" in str(e.value)
    c.open_session(realtime=False, size=512)  # offline sessions take frames as they come
    assert srv.status()["live"] == {"load": 1.25, "capacity": 1.5}
    r = subprocess.run([sys.executable, "-m", "giris.supervisor.cli", "status", "--endpoint",
                        srv.endpoint], capture_output=True, text=True, timeout=60)
    assert "live load: 1.25 of 1.5 (512² sessions at 25 FPS)" in r.stdout
    assert len(collect(live, "still live")["frames"]) == 10  # the others keep running
    quarter.close()
    c.open_session(realtime=True, size=256, fps=50)  # room again once one closed


def test_close_idle_and_sigterm_free_everything(make_server):
    srv = make_server({"timeouts": {"client_idle": 1.5},
                       "stages": small_stages(render={"options": {"render_s": 0.005}})})
    st = srv.status()
    pool = list(st["pools"])[0]
    worker_pids = [w["pid"] for w in st["workers"]]
    c = srv.client(heartbeat=0.3)
    s = c.open_session(zero_copy=True)
    utt = s.start_say("hold these frames please")  # frames held by the client, never released
    held = []
    with pytest.raises(GirisError) as e:  # 20 frames; a session's share of 16 slots is 4
        for item in s.stream(utt):
            if isinstance(item, Frame):
                held.append(item)
                item._release = None  # keep the slot: the session's close must free it
    assert e.value.code == "pool_full" and len(held) == 4  # after block_timeout, said so
    assert srv.status()["pools"][pool]["in_use"] > 0
    s.close()
    assert eventually(lambda: srv.status()["pools"][pool]["in_use"] == 0)
    # idle: a client that opens a session and then goes silent (no heartbeats)
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(srv.endpoint)
    raw.send_multipart(P.encode(P.Message(P.OPEN_SESSION, meta={"req": 1, "spec": {"zero_copy": True}})))
    assert raw.poll(20000)
    token = P.decode(raw.recv_multipart()).session
    raw.send_multipart(P.encode(P.Message(P.SAY, session=token, meta={"req": 2, "text": "a b c d"})))
    deadline = time.monotonic() + 15
    closed = False
    while time.monotonic() < deadline and not closed:
        if raw.poll(500):
            m = P.decode(raw.recv_multipart())
            closed = m.type == P.EVENT and m.meta.get("kind") == "session_closed"
    raw.close()
    assert closed, "idle session was not closed"
    assert srv.status()["sessions"] == 0
    # frames rendered while the close travelled come back as they arrive
    assert eventually(lambda: srv.status()["pools"][pool]["in_use"] == 0)
    # SIGTERM: exit 0, no segment, no child left
    s2 = c.open_session()
    s2.start_say("bye bye")
    server_pid = srv.proc.pid
    family = [p.pid for p in psutil.Process(server_pid).children(recursive=True)]  # + the launcher
    # a client holding every slot stalled the renderer, which must not be taken for hung
    assert set(worker_pids) < set(family), srv.logs()[-3000:]
    assert all(w["restarts"] == 0 for w in srv.status()["workers"])
    assert shm_segments(server_pid)
    assert srv.stop(signal.SIGTERM) == 0
    assert shm_segments(server_pid) == []
    time.sleep(0.2)
    assert not [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def test_ctrl_c_stops_the_server_cleanly_with_status_130(make_server):
    """SIGINT (Ctrl-C) stops it as SIGTERM does, but exits 130 as a shell reports an
    interruption (it exited 0, as a service stopped on purpose)."""
    srv = make_server()
    server_pid = srv.proc.pid
    assert srv.stop(signal.SIGINT) == 130
    assert shm_segments(server_pid) == []
    assert "Traceback" not in (srv.tmp / "server.log").read_text()


def test_a_client_slow_to_give_frames_back_holds_back_its_own_session_only(make_server):
    """A zero-copy client that keeps its frames: its session stops at its share of the
    render pool (``session_slots``) and fails with ``pool_full`` after ``block_timeout``;
    another session speaks meanwhile, every frame of it."""
    srv = make_server({"stages": small_stages(render={"session_slots": 3, "block_timeout": 3.0})})
    c = srv.client()
    hog, other = c.open_session(zero_copy=True), c.open_session(zero_copy=True)
    utt = hog.start_say("one two three four")
    kept = []
    for item in hog.stream(utt, timeout=10):
        if isinstance(item, Frame):
            item._release = None  # never given back
            kept.append(item)
            if len(kept) == 3:
                break
    out = collect(other, "five six")  # while the hog sits on its three slots
    assert [f[0] for f in out["frames"]] == list(range(out["frames"][0][0], out["frames"][0][0] + 10))
    assert out["events"][-1].meta["complete"]
    with pytest.raises(GirisError) as e:
        for item in hog.stream(utt, timeout=10):
            if isinstance(item, Frame):
                item._release = None
                kept.append(item)
    assert e.value.code == "pool_full" and len(kept) == 3


def test_with_backpressure_drop_an_utterance_whose_last_frame_is_dropped_still_ends(make_server):
    """``backpressure = "drop"``: a frame that finds the pool full is dropped, and the
    final one took the utterance's end with it: no ``utterance_done``, the client waited
    out its timeout. Here a zero-copy client keeps every slot of the pool, and another
    client's say (all its frames dropped) must still end."""
    srv = make_server({"stages": small_stages(render={"pool_slots": 4, "backpressure": "drop",
                                                      "block_timeout": 30.0})})
    hog = srv.client().open_session(zero_copy=True)
    kept = []
    for item in hog.stream(hog.start_say("one two"), timeout=10):
        if isinstance(item, Frame):
            item._release = None  # never given back
            kept.append(item)
            if len(kept) == 4:
                break
    assert list(srv.status()["pools"].values())[0]["in_use"] == 4
    out = collect(srv.client().open_session(), "three", timeout=10)
    assert out["frames"] == [] and len(out["audio"]) == 1
    assert [e.kind for e in out["events"]] == ["utterance_done"]


def test_sigkill_of_the_server_takes_its_launcher_and_workers_with_it(make_server, tmp_path):
    root = tmp_path / "run"  # where the servers make their socket directories
    root.mkdir()
    srv = make_server(env={"XDG_RUNTIME_DIR": str(root)})
    family = [p.pid for p in psutil.Process(srv.proc.pid).children(recursive=True)]
    assert len(family) == 5  # the launcher and four workers
    (left,) = root.iterdir()
    assert left.name.startswith(f"giris-{srv.proc.pid}-")
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(10)
    assert eventually(lambda: not [p for p in family if psutil.pid_exists(p)
                                   and psutil.Process(p).status() != "zombie"], timeout=10)
    # its socket directory is left behind (nothing ran to remove it): the next start
    # removes it, and leaves alone what is not a dead server's directory of sockets
    assert left.is_dir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    other = root / f"giris-{dead.pid}-notes"  # a dead pid's, but not only sockets
    other.mkdir()
    (other / "keep.txt").write_text("not a socket")
    nxt = make_server(env={"XDG_RUNTIME_DIR": str(root)})
    assert not left.exists() and (other / "keep.txt").exists()
    assert [p.name for p in root.iterdir() if p != other] != []  # its own
    nxt.stop()
    assert sorted(root.iterdir()) == [other]


def _raw(srv):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(srv.endpoint)
    return sock


def _ask(sock, frames):
    sock.send_multipart(frames)
    assert sock.poll(10000), "no answer"
    return P.decode(sock.recv_multipart())


def test_an_offline_idle_stream_ends_when_the_next_utterance_comes(make_server):
    """An offline session's idle stream (``audio_in`` with ``idle``) that a say stops:
    nothing takes over from it (that is live pacing's), and it was left stopped and
    never ended: no ``utterance_done`` (a raw client, no SDK logic on top)."""
    srv = make_server()
    sock = _raw(srv)
    tok = _ask(sock, P.encode(P.Message(P.OPEN_SESSION, meta={"req": 1, "spec": {}}))).session
    idle = P.Message(P.AUDIO_IN, session=tok, meta={"req": 2, "sample_rate": 16000,
                                                     "final": True, "idle": True})
    idle.add_inline(np.zeros(16000 * 4, np.int16))
    sock.send_multipart(P.encode(idle))
    sock.send_multipart(P.encode(P.Message(P.SAY, session=tok, meta={"req": 3, "text": "one two"})))
    done: dict[int, dict] = {}
    while len(done) < 2:
        assert sock.poll(10000), f"no utterance_done after {done}"
        m = P.decode(sock.recv_multipart())
        if m.type == P.EVENT and m.meta.get("kind") == "utterance_done":
            done[m.meta["utterance"]] = m.meta
    assert done[1]["cancelled"] is True and not done[1]["complete"]
    assert done[2]["complete"] and done[2]["frames"] == 10
    sock.close()


def test_bad_input_gets_clear_errors_and_the_server_keeps_serving(make_server):
    srv = make_server({"limits": {"max_text_chars": 100},
                       "server": {"max_message_bytes": 1024 * 1024}})
    good = srv.client().open_session()
    sock = _raw(srv)
    cases = {
        "random bytes": [os.urandom(64)],
        "msgpack but not a map": [msgpack.packb([1, 2, 3])],
        "wrong version": [msgpack.packb({"v": 99, "type": "say"})],
        "unknown type": [msgpack.packb({"v": 1, "type": "explode"})],
        "server-only type": [msgpack.packb({"v": 1, "type": "frame"})],
        "truncated multipart": [msgpack.packb({"v": 1, "type": "say", "tensors": [
            {"dtype": "uint8", "shape": [4], "nbytes": 4, "frame": 1}]})],
        "lying tensor size": [msgpack.packb({"v": 1, "type": "say", "tensors": [
            {"dtype": "uint8", "shape": [8], "nbytes": 4, "frame": 1}]}), b"1234"],
        "made-up token": P.encode(P.Message(P.SAY, session="not-a-session", meta={"text": "hi"})),
        "foreign token": P.encode(P.Message(P.SAY, session=good.token, meta={"text": "hi"})),
        "oversized payload": [msgpack.packb({"v": 1, "type": "open_session"}), b"x" * (2 * 1024 * 1024)],
    }
    codes = {}
    for name, frames in cases.items():
        m = _ask(sock, frames)
        assert m.type == P.EVENT and m.meta["kind"] == "error", name
        assert m.meta["message"], name
        codes[name] = m.meta["code"]
    assert codes["random bytes"] == "bad_message"
    assert codes["wrong version"] == "unsupported_version"
    assert codes["unknown type"] == codes["server-only type"] == "unknown_type"
    assert codes["made-up token"] == codes["foreign token"] == "unknown_session"
    assert codes["oversized payload"] == "too_large"
    # values of the wrong type inside a well-formed request: refused, not coerced
    spec = {"want": ["audio"]}
    loose = {
        "seed not an integer": P.Message(P.OPEN_SESSION, meta={"spec": {**spec, "seed": 1.5}}),
        "seed a bool": P.Message(P.OPEN_SESSION, meta={"spec": {**spec, "seed": True}}),
        "realtime a string": P.Message(P.OPEN_SESSION, meta={"spec": {**spec, "realtime": "yes"}}),
        "want unhashable": P.Message(P.OPEN_SESSION, meta={"spec": {"want": [["audio"]]}}),
        "batch a string": P.Message(P.SAY, session=good.token, meta={"text": "hi", "batch": "yes"}),
        "cancel a string": P.Message(P.CANCEL, session=good.token, meta={"utterance": "x"}),
        "cancel a list": P.Message(P.CANCEL, session=good.token, meta={"utterance": [1]}),
    }
    good_sock = good.client  # the good session's own connection, for its own token
    for name, msg in loose.items():
        if msg.session:
            with pytest.raises(BadInput, match="must be"):
                good_sock.request(msg)
        else:
            m = _ask(sock, P.encode(msg))
            assert m.meta["kind"] == "error" and m.meta["code"] == "bad_input", (name, m.meta)
    # a header that fails validation still gets its request id back (no wait for a timeout)
    m = _ask(sock, [msgpack.packb({"v": 1, "type": "say", "seq": "x", "meta": {"req": 7}})])
    assert m.meta["code"] == "bad_message" and m.meta["req"] == 7
    sock.close()
    with pytest.raises(LimitExceeded):
        good.start_say("word " * 50)
    with pytest.raises(BadInput):
        good.start_say("   ")
    with pytest.raises(BadInput):
        srv.clients[0].open_session(size=63)
    with pytest.raises(BadInput):
        srv.clients[0].open_session(fps=0)
    with pytest.raises(GirisError) as e:
        srv.clients[0].open_session(b"not an image")
    assert e.value.code == "bad_image"
    with pytest.raises(GirisError) as e:
        srv.clients[0].open_session(voice="nobody")
    assert e.value.code == "unknown_voice"
    # another client cannot touch the first one's session with its token
    other = srv.client()
    from giris.runtime.client import Session

    stolen = Session(other, good.token, {})
    other._sessions[good.token] = __import__("queue").Queue()
    with pytest.raises(SessionNotFound):
        stolen.start_say("mine now")
    with pytest.raises(SessionNotFound):
        stolen.close()
    assert len(collect(good, "still fine")["frames"]) == 10
    assert srv.status()["sessions"] == 1


def test_cancel_stops_an_utterance_midway(make_server):
    srv = make_server()
    s = srv.client().open_session()
    utt = s.start_say(" ".join(["SLOW"] * 50))
    frames = 0
    for item in s.stream(utt):
        if isinstance(item, Frame):
            frames += 1
            item.release()
            if frames == 3:
                assert s.cancel(utt) == [utt]
        elif isinstance(item, Event) and item.kind == "utterance_done":
            assert item.meta["cancelled"] and not item.meta["complete"]
    assert frames < 100
    assert len(collect(s, "next one")["frames"]) == 10


def test_cancel_cuts_a_live_utterance_whose_frames_are_all_made(make_server):
    """A live utterance is drawn ahead of its clock; once its last frame is made its
    ``utterance_done`` waits behind its frames in the pacing queue and it was no longer
    found by ``cancel``: ``[]``, and its frames played on (a barge-in did not stop the
    avatar). Here every frame is made within the 1.5 s playout delay, before the first
    one is shown."""
    srv = make_server()
    s = srv.client().open_session(realtime=True, playout_delay=1.5)
    utt = s.start_say("one two")  # 10 frames
    frames, cancelled, done = 0, None, None
    for item in s.stream(utt, timeout=10):
        if isinstance(item, Frame):
            frames += 1
            if cancelled is None:
                cancelled = s.cancel(utt)
        elif isinstance(item, Event) and item.kind == "utterance_done":
            done = item.meta
    assert cancelled == [utt]
    assert done["cancelled"] and not done["complete"] and done["frames"] == frames < 10
    assert s.cancel() == []  # nothing left of it
    assert len(collect(s, "next one")["frames"]) == 10


def test_realtime_session_is_paced_to_the_wall_clock(make_server):
    srv = make_server()
    s = srv.client().open_session(realtime=True, fps=25)
    t = []
    for item in s.say("one two three four five"):
        if isinstance(item, Frame):
            t.append(time.monotonic())
    assert len(t) == 25
    span = t[-1] - t[0]
    assert 0.85 <= span <= 1.3, span  # 24 intervals of 40 ms


def test_live_session_is_drawn_at_most_a_second_ahead(make_server):
    """A live viewer needs frames on time, not early: the renderer stays about a second
    ahead of the clock instead of filling every pool slot (memory) and the core."""
    srv = make_server({"stages": small_stages(render={"pool_slots": 64})})
    s = srv.client().open_session(realtime=True, fps=25, zero_copy=True, playout_delay=0.0)
    utt = s.start_say(" ".join(["word"] * 30))  # 6 s of speech, 150 frames
    t0, peak, frames = None, 0, 0
    for item in s.stream(utt):
        if isinstance(item, Frame):
            frames += 1
            item.release()
            t0 = t0 or time.monotonic()
            if frames % 10 == 0 and time.monotonic() - t0 > 1.0:
                peak = max(peak, next(iter(srv.status()["pools"].values()))["in_use"])
    assert frames == 150
    # unthrottled, the fast test renderer would hold all 64 slots within a fraction of a second
    assert 10 <= peak <= 34, peak


def test_asyncio_twin(make_server):
    import asyncio

    from giris.runtime.aio import AsyncClient

    srv = make_server()

    async def run() -> list[int]:
        async with AsyncClient(srv.endpoint) as c:
            s = await c.open_session()
            idx = [item.index async for item in s.say("async works") if isinstance(item, Frame)]
            await s.close()
            return idx

    assert asyncio.run(run()) == list(range(10))


def test_rate_limit_per_session(make_server):
    srv = make_server({"limits": {"max_requests_per_second": 3}})
    s = srv.client().open_session()
    with pytest.raises(LimitExceeded) as e:
        for _ in range(10):
            s.start_say("x")
    assert e.value.code == "rate_limited"


def test_session_limits(make_server):
    srv = make_server({"limits": {"max_sessions": 3, "max_sessions_per_client": 2}})
    a, b = srv.client(), srv.client()
    held = [a.open_session(), a.open_session()]  # (a session let go closes itself)
    with pytest.raises(LimitExceeded):
        a.open_session()
    held.append(b.open_session())
    with pytest.raises(LimitExceeded):
        b.open_session()


def test_session_limits_hold_for_opens_in_flight_together(make_server):
    """The limits were checked when an open came, before the stages' estimates, and not
    again when the session was added: opens sent back to back all passed them."""
    srv = make_server({"limits": {"max_sessions": 3, "max_sessions_per_client": 2}})
    answers = []
    for sock in (_raw(srv), _raw(srv)):
        for i in range(3):
            sock.send_multipart(P.encode(P.Message(P.OPEN_SESSION, meta={"req": i, "spec": {}})))
        for _ in range(3):
            assert sock.poll(10000), "no answer"
            m = P.decode(sock.recv_multipart())
            answers.append("ok" if m.type == P.REPLY else m.meta["code"])
    assert sorted(answers) == ["limit_exceeded"] * 3 + ["ok"] * 3, answers
    assert answers[:3].count("ok") == 2  # the first client: its own limit
    assert srv.status()["sessions"] == 3


def test_a_stage_on_a_second_gpu_is_charged_to_that_gpu(make_server):
    """A stage on ``cuda:1`` sees its GPU as ``cuda:0`` and reports it so; the supervisor
    charges it to ``cuda:1`` (no GPU needed: the test engine only reports figures)."""
    mb = 1024 * 1024
    render = {"device": "cuda:1", "options": {"estimate_bytes": 100 * mb, "estimate_device": "cuda:0"}}
    srv = make_server({"stages": small_stages(render=render),
                       "budgets": {"cuda:0": 50 * mb, "cuda:1": 250 * mb}})
    c = srv.client()
    a, b = c.open_session(), c.open_session()  # would not fit GPU 0's budget even once
    with pytest.raises(BudgetExceeded) as e:
        c.open_session()
    assert e.value.details["device"] == "cuda:1" and e.value.details["in_use"] == 200 * mb
    budgets = srv.status()["budgets"]
    assert budgets["cuda:1"]["used"] == 200 * mb and budgets["cuda:0"]["used"] == 0
    render_worker = [w for w in srv.status()["workers"] if w["stage"] == "render"][0]
    assert render_worker["device"] == "cuda:1"
    a.close()
    b.close()


def test_a_slow_session_open_does_not_stall_the_sessions_streaming(make_server):
    """Fitting a new portrait takes the renderer 0.1-1 s; meanwhile the sessions already
    streaming keep getting frames (the open runs beside the rendering)."""
    import threading

    srv = make_server({"stages": small_stages(render={"options": {"open_s": 1.5, "render_s": 0.04}})})
    c = srv.client()
    a = c.open_session()
    stamps: list[float] = []
    window: list[float] = []

    def open_b() -> None:
        other = srv.client()
        t0 = time.monotonic()
        b = other.open_session()
        window.extend([t0, time.monotonic()])
        b.close()
        other.close()

    opener = threading.Thread(target=open_b)
    utt = a.start_say(" ".join(["word"] * 40))  # 8 s of speech: 200 frames at 40 ms each
    for item in a.stream(utt, timeout=60):
        if isinstance(item, Frame):
            stamps.append(time.monotonic())
            item.release()
            if len(stamps) == 10:
                opener.start()
    opener.join()
    t0, t1 = window
    assert t1 - t0 >= 1.4
    during = [t for t in stamps if t0 + 0.3 < t < t1 - 0.3]
    assert len(during) >= 10  # ~20 at 40 ms a frame; none while an open held the renderer


def test_a_client_that_vanishes_while_its_session_opens_leaves_nothing(make_server):
    """The idle timeout closes a session whose portrait is still being fitted: the stage
    drops the half-opened state when the fitting ends, the server goes on serving."""
    srv = make_server({"timeouts": {"client_idle": 0.5},
                       "stages": small_stages(render={"options": {"open_s": 2.0}})})
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(srv.endpoint)
    raw.send_multipart(P.encode(P.Message(P.OPEN_SESSION, meta={"req": 1, "spec": {}})))
    got = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(m.meta.get("req") == 1 for m in got):
        if raw.poll(200):
            got.append(P.decode(raw.recv_multipart()))
    raw.close()
    # no heartbeat ever came: the session was closed while the renderer still fitted it,
    # and the open is answered with an error, not a token
    assert any(m.meta.get("kind") == "session_closed" for m in got)
    answer = next(m for m in got if m.meta.get("req") == 1)
    assert answer.type == P.EVENT and answer.meta["kind"] == "error"
    assert eventually(lambda: srv.status()["sessions"] == 0)
    assert eventually(lambda: all(w["sessions"] == 0 for w in srv.status()["workers"]), 10)
    c = srv.client(heartbeat=0.1)
    assert len(collect(c.open_session(), "still serving")["frames"]) == 10


def test_a_stage_on_cuda_n_sees_the_nth_gpu_the_server_sees():
    from giris.supervisor.process import visible_device

    assert visible_device("cuda:1", None) == "1" and visible_device("cuda", None) == "0"
    assert visible_device("cuda:1", "2,3") == "3"  # the server's second GPU, not physical 1
    assert visible_device("cuda:0", "GPU-5ab3,MIG-77") == "GPU-5ab3"
    for bad, seen in (("cuda:2", "2,3"), ("gpu:0", None), ("cuda:x", None), ("cuda:0", ""),
                      ("cuda:0", "-1")):  # the last two: the server was given no GPU
        with pytest.raises(ValueError):
            visible_device(bad, seen)


def test_a_device_the_server_cannot_see_is_a_config_error(tmp_path, monkeypatch):
    from giris.runtime.config import from_mapping
    from giris.supervisor.supervisor import Supervisor

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    cfg = from_mapping({"stages": small_stages(render={"device": "cuda:1"})})
    with pytest.raises(GirisError) as e:
        Supervisor(cfg).start()
    assert e.value.code == "bad_config" and "cuda:1" in str(e.value)
    assert not list(Path("/dev/shm").glob(f"giris-{os.getpid()}-*"))


def test_a_traced_request_says_where_its_time_went(make_server):
    """``trace=True``: the first audio chunk, coefficients and frame carry a stamp of each
    process they passed, in order, on one clock; untraced requests carry none."""
    srv = make_server({"stages": small_stages()})
    s = srv.client().open_session(want=["audio", "coeffs", "frames"])
    firsts = {}
    for item in s.say("one two three", trace=True):
        kind = type(item).__name__
        if kind in ("AudioChunk", "Coefficients", "Frame") and kind not in firsts:
            firsts[kind] = item.trace
        if isinstance(item, Frame):
            item.release()
    where = {k: [w for w, _ in t] for k, t in firsts.items()}
    assert where["AudioChunk"] == ["gateway", "tts in", "tts out", "supervisor", "client"]
    assert where["Coefficients"] == ["gateway", "tts in", "tts out", "coeffs in", "coeffs out",
                                     "motion in", "motion out", "supervisor", "client"]
    assert where["Frame"] == ["gateway", "tts in", "tts out", "coeffs in", "coeffs out", "motion in",
                              "motion out", "render in", "render out", "supervisor", "client"]
    stamps = [t for _, t in firsts["Frame"]]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] < 10
    plain = [i for i in s.say("one") if not isinstance(i, Event)]
    assert plain and all(i.trace is None for i in plain)
    for i in plain:
        if isinstance(i, Frame):
            i.release()


def test_a_session_that_wants_no_frames_renders_none(make_server):
    """A client driving its own 3D avatar asks for coefficients (and audio) only: the
    renderer draws nothing for it (it drew and threw away every frame) and the utterance
    still ends."""
    srv = make_server()
    s = srv.client().open_session(want=["audio", "coeffs"])
    out = collect(s, "one two three")
    samples = sum(len(a.pcm) for a in out["audio"])
    assert samples == 3 * int(WORD_S * 16000)
    n = math.ceil(samples * 25 / 16000)
    assert sum(c.values.shape[0] for c in out["coeffs"]) == n and not out["frames"]
    done = out["events"][-1]
    assert done.kind == "utterance_done" and done.meta["complete"] and done.meta["frames"] == 0
    assert srv.status()["frames_out"] == 0  # the server counts every frame made, wanted or not


def test_the_effective_spec_can_be_sent_again(make_server):
    """The reply's spec is what the session runs with, as a client could send it: it held
    the server's own ``max_image_pixels`` (a spec sent back was refused for it) and named
    the bundled avatar for a session opened with its own portrait."""
    srv = make_server()
    c = srv.client()
    own = c.open_session(b"portrait bytes", emotion="happy")
    assert "avatar_name" not in own.spec and "max_image_pixels" not in own.spec
    assert own.spec["emotion"] == "happy"
    bundled = c.open_session()
    assert bundled.spec["avatar_name"] == "astronaut" and "max_image_pixels" not in bundled.spec
    again = c.request(P.Message(P.OPEN_SESSION, meta={"spec": bundled.spec}))
    assert again.session and again.meta["spec"] == bundled.spec


def test_a_client_that_stops_reading_holds_back_its_own_session_only(make_server):
    """A client that stopped reading (suspended, on a slow link) had every frame of its
    utterance copied into ZeroMQ's queue for it (up to 10,000 messages: 1.8 GB for a long
    text at 512², kept by the supervisor's heap after). Frames for it now wait in their pool
    slots: the renderer holds back that session alone, then fails its utterance
    (``pool_full``); the supervisor's memory stays put and other clients are served."""
    import psutil
    import zmq

    side = 256
    srv = make_server({"defaults": {"size": side}, "stages": small_stages(
        render={"pool_slots": 32, "pool_slot_bytes": side * side * 3, "block_timeout": 1.5})})
    sup = psutil.Process(srv.proc.pid)
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.RCVHWM, 4)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(srv.endpoint)
    try:
        raw.send_multipart(P.encode(P.Message(P.OPEN_SESSION, meta={"req": 1, "spec": {}})))
        assert raw.poll(10000)
        token = P.decode(raw.recv_multipart()).session
        rss0 = sup.memory_info().rss
        # 150 words, 30 s of speech: 750 frames of 192 KiB (~140 MiB) if nothing held them
        raw.send_multipart(P.encode(P.Message(P.SAY, session=token,
                                              meta={"req": 2, "text": " ".join(["word"] * 150)})))
        time.sleep(3.0)  # reading nothing
        grown = (sup.memory_info().rss - rss0) >> 20
        assert srv.status()["outbox"]["clients_waiting"] == 1  # an operator sees it
        other = srv.client().open_session()
        assert len(collect(other, "still served")["frames"]) > 0
        assert grown < 40, f"the supervisor grew by {grown} MiB for a client not reading"
        seen, frames, error, done = [], 0, None, None
        deadline = time.monotonic() + 20
        while done is None and time.monotonic() < deadline:
            if not raw.poll(1000):
                continue
            m = P.decode(raw.recv_multipart())
            if m.type == P.FRAME:
                frames += 1
                seen.append(m.seq)
            elif m.type == P.EVENT and m.meta.get("code") == "pool_full":
                error = m
            elif m.type == P.EVENT and m.meta.get("kind") == "utterance_done":
                done = m
        assert done is not None and error is not None and not done.meta["complete"]
        assert 0 < frames < 750 and seen == sorted(seen)  # what it got, in order, then the end
        assert srv.status()["sessions"] == 2
    finally:
        raw.close(0)
        ctx.term()


def test_sighup_reloads_limits_and_keeps_the_running_config_when_the_new_one_is_bad(make_server):
    """SIGHUP rereads the file: new limits apply to the next request; a file that does not
    load, or defaults a stage refuses (an unknown emotion), are logged and the running
    config is kept (they would have failed every session)."""
    srv = make_server({"stages": small_stages(motion={"engine": "prosody"})})
    s = srv.client().open_session()
    assert len(collect(s, "one two three")["frames"]) == 15
    base = srv.config_path.read_text()

    def hup(text: str, said: str) -> None:
        srv.config_path.write_text(text)
        os.kill(srv.proc.pid, signal.SIGHUP)
        assert eventually(lambda: said in srv.logs(), timeout=10), srv.logs()

    hup(base.replace("[limits]", "[limits]\nmax_text_chars = 5"), "reloaded limits")
    with pytest.raises(LimitExceeded):
        s.start_say("one two three")
    hup(base.replace('size = 64', 'size = 64\nemotion = "furious"'),
        "the motion stage's engine (prosody) refuses it: unknown emotion 'furious'")
    # what no list of names says: the stages' engines judge new defaults as a session's
    hup(base.replace('size = 64', 'size = 64\nvoice = "nobody"'),
        "the tts stage's engine (test-source) refuses it: unknown voice 'nobody'")
    hup("[limits\n", "reload failed, keeping the running config")
    assert srv.status()["state"] == "serving"
    with pytest.raises(LimitExceeded):  # still the limits of the last good reload
        s.start_say("one two three")
    assert len(collect(srv.client().open_session(), "one")["frames"]) == 5  # neutral default kept
    # an emotion the engine takes as a session's ("Happy": it folds case) is taken
    srv.config_path.write_text(base.replace('size = 64', 'size = 64\nemotion = "Happy"'))
    os.kill(srv.proc.pid, signal.SIGHUP)
    assert eventually(lambda: srv.logs().count("reloaded limits") == 2, timeout=10), srv.logs()
    assert srv.client().open_session().spec["emotion"] == "Happy"


def test_a_reload_that_lowers_the_heartbeat_reaches_the_running_workers(make_server):
    """A SIGHUP lowering ``worker_timeout`` below the heartbeat the workers were started
    with killed every stage as hung, in a loop (the interval was fixed in their spec):
    the running workers are told the new interval, and judged by the one they beat at
    until they say they took it; a hang is then found by the new timeout, and the stage
    restarted in its place beats at the new interval too."""
    # (timeouts with room for a loaded 2-core runner's stalls: 2 s, against beats of 0.2)
    srv = make_server({"timeouts": {"worker_heartbeat": 4.0, "worker_timeout": 12.0}})
    s = srv.client().open_session()
    pids = {w["stage"]: w["pid"] for w in srv.status()["workers"]}
    text = srv.config_path.read_text()
    srv.config_path.write_text(text.replace("worker_heartbeat = 4.0", "worker_heartbeat = 0.2")
                               .replace("worker_timeout = 12.0", "worker_timeout = 2.0"))
    os.kill(srv.proc.pid, signal.SIGHUP)
    assert eventually(lambda: "reloaded limits" in srv.logs(), timeout=10), srv.logs()
    time.sleep(5)  # past the old heartbeat: the old code had killed every stage by now
    assert "stage hung" not in srv.logs(), srv.logs()
    st = srv.status()
    assert {w["stage"]: w["pid"] for w in st["workers"]} == pids and st["state"] == "serving"
    t0 = time.monotonic()
    items = list(s.stream(s.start_say("hello HANG"), timeout=30))  # the tts stage hangs
    assert time.monotonic() - t0 < 9  # found within the new timeout, not the old 12 s
    assert any(isinstance(i, Event) and i.kind == "stage_restarted" for i in items)
    time.sleep(3)  # the restarted stage beats at the new interval: not killed again
    assert srv.logs().count("stage hung") == 1, srv.logs()
    assert len(collect(s, "still here")["frames"]) == 10


def test_a_stage_option_its_engine_never_reads_is_logged(make_server):
    """Every config key is checked but a stage's ``options``, which are its engine's own:
    ``smoothng = 0.5`` ran as if unset, without a word. The worker logs the keys its
    engine did not look up while it loaded (with those it did: the spelling it knows),
    and serves on (an engine may read an option later: it declares those)."""
    srv = make_server({"stages": small_stages(
        coeffs={"engine": "visemes", "options": {"smoothng": 0.5, "smoothing": 0.4}},
        motion={"options": {"client_late_s": 0.0}})})
    line = next(ln for ln in srv.logs().splitlines() if "never read" in ln)
    assert "stage=coeffs" in line and "engine=visemes" in line and "unread=smoothng " in line
    assert "smoothing" in line.split("read=", 2)[-1] and "warn" in line.lower()
    assert srv.logs().count("never read") == 1  # word_s, render_s, client_late_s: all read
    assert len(collect(srv.client().open_session(), "one two")["frames"]) == 10


def test_a_bug_in_an_engines_check_does_not_stop_the_server(make_server):
    """An engine's ``check`` that raises something other than an error of its verdict (a
    third-party engine's bug) is logged and the server serves: it stopped the server at
    start as if the defaults were refused (a failing ``accepts()`` was only logged)."""
    srv = make_server({"defaults": {"voice": "BUG"}})
    assert srv.status()["state"] == "serving"
    assert "engine check failed" in srv.logs() and "a bug in check()" in srv.logs()

