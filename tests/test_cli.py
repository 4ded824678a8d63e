"""The ``giris`` command as an operator types it."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest


def giris(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "giris.supervisor.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_status_table_and_json(make_server):
    srv = make_server()
    r = giris("status", "--endpoint", srv.endpoint, "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert [w["stage"] for w in st["workers"]] == ["tts", "coeffs", "motion", "render"]
    for w in st["workers"]:
        assert w["pid"] > 0 and w["state"] == "ready" and w["restarts"] == 0 and w["cpus"]
    r = giris("status", "--endpoint", srv.endpoint)
    assert r.returncode == 0 and "render" in r.stdout and "test-frames" in r.stdout
    # `giris status | head -1`: the reader going away is no error
    p = subprocess.Popen([sys.executable, "-m", "giris.supervisor.cli", "status", "--endpoint",
                          srv.endpoint], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    assert p.wait(60) == 141 and p.stderr.read() == b""


def test_status_of_a_missing_server_fails_cleanly(tmp_path: Path):
    # an ipc endpoint with no socket file: said at once, with the path (no timeout wait)
    r = giris("status", "--endpoint", f"ipc://{tmp_path}/nobody.sock")
    assert r.returncode == 2
    assert "server_gone" in r.stderr and "no socket file" in r.stderr and "Traceback" not in r.stderr
    # so does `say --connect` (it waited out the client's 30 s)
    t0 = time.monotonic()
    r = giris("say", "hi", "-o", str(tmp_path / "x.mp4"), "--connect", f"ipc://{tmp_path}/nobody.sock")
    assert r.returncode == 2 and time.monotonic() - t0 < 20
    assert "server_gone" in r.stderr and "no socket file" in r.stderr and "Traceback" not in r.stderr
    # a tcp endpoint nobody answers: after the timeout
    r = giris("status", "--endpoint", "tcp://127.0.0.1:9", "--timeout", "1")
    assert r.returncode == 2
    assert "server_gone" in r.stderr and "Traceback" not in r.stderr


def test_keys_writes_a_pair(tmp_path: Path):
    r = giris("keys", "--dir", str(tmp_path), "--name", "alice")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "alice.key").exists()
    assert (tmp_path / "alice.key_secret").stat().st_mode & 0o077 == 0


def test_the_shipped_configs_load():
    from pathlib import Path

    from giris.runtime.config import load

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.rglob("*.toml"))
    assert {f.name for f in files} >= {"cpu.toml", "gpu.toml", "giris.toml"}
    for f in files:
        cfg = load(f)
        assert list(cfg.stages) == ["tts", "coeffs", "motion", "render"], f
    assert load(root / "gpu.toml").stages["render"].device == "cuda:0"


def _sessions(srv) -> int:
    return srv.client().status(timeout=5)["sessions"]


def test_say_connect_fails_cleanly_keeps_the_old_file_and_closes_its_session(make_server, tmp_path: Path):
    """Every failure of ``giris say`` is one line on stderr with exit status 2, leaves the
    file that was at the output path as it was (no half-written MP4 in its place) and no
    session on the server (each used to hold one until the idle timeout)."""
    import av

    srv = make_server()
    out = tmp_path / "out.mp4"
    out.write_bytes(b"the previous take")
    ep = ["--connect", srv.endpoint, "--quiet", "-o", str(out)]
    failures = {
        "rejected text": (["   "], "bad_input"),
        "a stage crashes mid-utterance": (["one two CRASH three"], "incomplete"),
        "missing avatar file": (["hi", "--avatar", str(tmp_path / "nope.png")], "does not exist"),
        "avatar is a folder": (["hi", "--avatar", str(tmp_path) + "/"], "bad_input"),
        "seed out of range": (["hi", "--seed", "99999999999999999999999"], "bad_input"),
    }
    for name, (args, said) in failures.items():
        r = giris("say", *ep, *args)
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert said in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
        assert r.stderr.count("\n") == 1, (name, r.stderr)
        assert out.read_bytes() == b"the previous take", name
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "srv0"], name
        assert _sessions(srv) == 0, name
    for args, said in [(["-o", str(tmp_path / "no" / "dir" / "x.mp4")], "no folder"),
                       (["-o", str(tmp_path / "x.txt")], "name it *.mp4"),
                       (["--config", str(tmp_path / "missing.toml")], "missing.toml"),
                       (["--coeffs", str(tmp_path / "c.txt")], "name it *.csv")]:
        r = giris("say", "hi", "--quiet", *args)  # refused before any model loads
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "bad.toml").write_text("[server\n")
    r = giris("say", "hi", "--quiet", "--config", str(tmp_path / "bad.toml"), "-o", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "giris: error" in r.stderr
    # and a run that works replaces the old file with a whole video, nothing else left
    r = giris("say", *ep, "one two")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml", "out.mp4", "srv0"]
    with av.open(str(out)) as c:
        assert c.streams.video[0].frames == json.loads(r.stdout.splitlines()[-1])["frames"]
    assert _sessions(srv) == 0


def test_a_client_closing_closes_its_sessions_on_the_server(make_server):
    import time

    srv = make_server()
    c = srv.client()
    kept = [c.open_session() for _ in range(3)]  # (a session let go is closed by itself)
    assert _sessions(srv) == 3
    c.close()
    deadline = time.monotonic() + 5  # at once, not after the 30 s idle timeout
    while _sessions(srv) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sessions(srv) == 0


def test_a_config_value_of_the_wrong_type_is_named():
    import pytest

    from giris.runtime.config import from_mapping

    for section, key, value, said in [("limits", "max_size", "big", "an integer"),
                                      ("limits", "max_fps", True, "a number"),
                                      ("server", "insecure", 1, "true or false"),
                                      ("server", "endpoint", 5, "a string")]:
        with pytest.raises(ValueError, match=f"\\[{section}\\] {key} must be {said}"):
            from_mapping({section: {key: value}})
    with pytest.raises(ValueError, match=r"\[stages.render\] needs an engine"):
        from_mapping({"stages": {"render": {"device": "cpu"}}})  # was a TypeError traceback
    with pytest.raises(ValueError, match=r"\[stages.render\] pool_slots must be an integer"):
        from_mapping({"stages": {"render": {"engine": "warp", "pool_slots": "many"}}})
    assert from_mapping({"timeouts": {"client_idle": 5}}).timeouts.client_idle == 5  # int for float
    for section, key, value in [("timeouts", "client_idle", -5), ("limits", "max_sessions", 0),
                                ("restart", "max_restarts", -1), ("limits", "live_capacity", -1)]:
        with pytest.raises(ValueError, match=f"\\[{section}\\] {key} must be"):  # out of range
            from_mapping({section: {key: value}})
    assert from_mapping({"limits": {"live_capacity": 0}}).limits.live_capacity == 0  # no limit
    server = from_mapping({"server": {"ipc_mode": 0o660, "max_message_bytes": "1MiB"}}).server
    assert (server.ipc_mode, server.max_message_bytes) == (0o660, 1 << 20)


@pytest.mark.parametrize("data, said", [
    ({"server": 5}, "[server] must be a table"), ({"budgets": 5}, "[budgets] must be a table"),
    ({"defaults": 5}, "[defaults] must be a table"), ({"stages": [1, 2]}, "[stages] must be a table"),
    ({"stages": {"tts": 3}}, "[stages.tts] must be a table"),
    ({"server": {"metrics_port": 70000}}, "metrics_port must be 0 (off) or a port"),
    ({"server": {"metrics_port": -5}}, "metrics_port must be 0 (off) or a port"),
    ({"budgets": {"cpu": -5}}, "[budgets] cpu must be ≥ 0"),
    ({"stages": {"tts": {"engine": "piper", "cpus": "1"}}}, "cpus must be a list of CPU numbers"),
    ({"stages": {"tts": {"engine": "piper", "options": "x"}}}, "options must be a table"),
    ({"timeouts": {"worker_heartbeat": 20, "worker_timeout": 1}}, "worker_heartbeat must be below"),
    ({"defaults": {"fps": 0}}, "[defaults] fps must be a number in 1..60"),
    ({"defaults": {"size": 4000}}, "[defaults] size must be a number in 128..1024"),
    ({"defaults": {"emotions": "happy"}}, "[defaults] unknown session option(s): emotions"),
    ({"defaults": {"emotion": 3}}, "[defaults] emotion must be a string"),
    ({"defaults": {"want": ["video"]}}, "[defaults] want must be a list drawn from"),
    # inf and nan are valid TOML: worker_start = inf crashed the server with OverflowError
    ({"timeouts": {"worker_start": float("inf")}}, "[timeouts] worker_start must be a finite number, not inf"),
    ({"stages": {"render": {"engine": "warp", "block_timeout": float("nan")}}},
     "[stages.render] block_timeout must be a finite number, not nan"),
    ({"defaults": {"intensity": float("inf")}}, "[defaults] intensity must be a finite number"),
    ({"budgets": {"cpu": float("inf")}}, "[budgets] cpu: not a size: inf"),
    ({"budgets": {"cpu": "lots"}}, "[budgets] cpu: not a size: 'lots'"),  # (no key was named)
    ({"stages": {"render": {"engine": "warp", "pool_slot_bytes": "big"}}},
     "[stages.render] pool_slot_bytes: not a size: 'big'"),
    # the socket was chmod'ed with these as is: -1 made it 7777, a decimal 600 made it 1130
    ({"server": {"ipc_mode": -1}}, "[server] ipc_mode must be permission bits in 0o000..0o777"),
    ({"server": {"ipc_mode": 600}}, "write it in octal: ipc_mode = 0o600"),
    ({"server": {"ipc_mode": 0o1600}}, "[server] ipc_mode must be permission bits"),
    ({"server": {"ipc_mode": 0o060}}, "leaves the server's own user unable to connect"),
    # every request failed
    ({"server": {"max_message_bytes": 0}}, "[server] max_message_bytes must be at least 65536"),
    ({"server": {"max_message_bytes": -5}}, "[server] max_message_bytes must be at least 65536"),
])
def test_config_shapes_and_ranges_are_named_at_load(data, said):
    """These went through as a TypeError traceback, a bind() OverflowError, a worker crash
    loop (cpus = "1", options = "x"), every session refused (a negative budget), or every
    stage killed as hung in turn (a heartbeat slower than the timeout)."""
    from giris.runtime.config import from_mapping

    with pytest.raises(ValueError) as e:
        from_mapping(data)
    assert said in str(e.value)


def test_a_default_no_stage_knows_stops_the_server_at_start(tmp_path: Path):
    """``[defaults] emotion = "furious"``: every session open failed on a server that said
    it was serving. What only an engine can judge is judged by the engines themselves
    (``Engine.check``, the validators their ``open_session`` uses) once the stages are
    ready: the server stops with exit 2, says which stage refused and why, and never
    said it was serving."""
    from tests.conftest import small_stages, write_toml

    cfg = write_toml(tmp_path / "g.toml", {
        "server": {"endpoint": f"ipc://{tmp_path}/gw.sock"}, "defaults": {"size": 64, "emotion": "furious"},
        "limits": {"min_size": 32}, "stages": small_stages(motion={"engine": "prosody"})})
    from tests.conftest import shm_segments

    proc = subprocess.Popen([sys.executable, "-m", "giris.supervisor.cli", "serve", "--config", str(cfg)],
                            stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=120)
    finally:  # (a server that did not stop was left running by an earlier version of this test)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert ("[bad_config]: [defaults] the motion stage's engine (prosody) refuses it: unknown emotion "
            "'furious'; known: neutral, happy, sad, surprised, angry") in err
    assert "serving on" not in err  # it said so before it stopped
    assert shm_segments(proc.pid) == []  # stopped as on SIGTERM, its pools unlinked

    def serve(name: str, defaults: dict, *flags: str, limits: dict | None = None,
              **stages: dict) -> subprocess.CompletedProcess:
        cfg = write_toml(tmp_path / f"{name}.toml", {
            "server": {"endpoint": f"ipc://{tmp_path}/{name}.sock"}, "defaults": {"size": 64, **defaults},
            "limits": {"min_size": 32, **(limits or {})}, "stages": small_stages(**stages)})
        return subprocess.run([sys.executable, "-m", "giris.supervisor.cli", *flags, "serve", "--config", str(cfg)],
                              capture_output=True, text=True, timeout=180)

    # so does a voice the engine does not know; under --log-json the last line is JSON too
    r = serve("t", {"voice": "nobody"}, "--log-json")
    last = json.loads(r.stderr.strip().splitlines()[-1])
    assert r.returncode == 2 and last["code"] == "bad_config", r.stderr
    assert last["event"] == "[defaults] the tts stage's engine (test-source) refuses it: unknown voice 'nobody'"
    # the real engines judge what no list of names could: Piper a voice file that is not
    # there (sessions may name files), the warp renderer a size past its own limits (the
    # server's allowed it); both stages are named
    r = serve("pw", {"voice": str(tmp_path / "gone.onnx"), "size": 1100}, limits={"max_size": 2048},
              tts={"engine": "piper", "options": {"voice_paths": True}},
              render={"engine": "warp", "options": {"preload_landmarks": False}})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (f"[defaults] the tts stage's engine (piper) refuses it: voice '{tmp_path}/gone.onnx': the file "
            f"{tmp_path}/gone.onnx does not exist; the render stage's engine (warp) refuses it: size must be "
            "128..1024, not 1100") in r.stderr, r.stderr
    # and an avatar name none of the bundled ones (at a size it renders: 64 it refused too)
    r = serve("a", {"avatar_name": "nobody", "size": 128},
              render={"engine": "warp", "options": {"preload_landmarks": False}})
    assert r.returncode == 2 and "[defaults] the render stage's engine (warp) refuses it: unknown avatar " \
        "'nobody'; bundled: astronaut" in r.stderr, r.stderr


@pytest.mark.parametrize("emotion", ["Happy", ""])
def test_defaults_a_session_could_open_with_serve(tmp_path: Path, emotion: str):
    """``[defaults] emotion = "Happy"`` (the engine folds case) or ``""`` (neutral): a
    session opens with either, yet the server refused to start with them, judging by a
    list of names. The engine judges them as it judges a session's. And "serving on" is
    said once the server serves (it was said before the stages had even loaded)."""
    from giris.runtime.client import Client
    from tests.conftest import collect, small_stages, write_toml

    endpoint = f"ipc://{tmp_path}/gw.sock"
    cfg = write_toml(tmp_path / "g.toml", {
        "server": {"endpoint": endpoint}, "defaults": {"size": 64, "emotion": emotion},
        "limits": {"min_size": 32}, "stages": small_stages(motion={"engine": "prosody"},
                                                           coeffs={"options": {"load_s": 1.0}})})
    proc = subprocess.Popen([sys.executable, "-m", "giris.supervisor.cli", "--log-json", "serve", "--config",
                             str(cfg)], stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            said = json.loads(line)
            if said["event"] == "serving on":
                assert said["url"] == endpoint
                break
        with Client(endpoint, timeout=20) as c:
            assert c.status()["state"] == "serving"  # not "starting"
            assert len(collect(c.open_session(), "one two")["frames"]) == 10
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_a_metrics_port_in_use_is_named(tmp_path: Path):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "giris.supervisor.cli", "serve", "--endpoint",
                            f"ipc://{tmp_path}/gw.sock", "--metrics-port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"[endpoint_in_use]: cannot listen for metrics on 127.0.0.1:{port}: Address already in use" in r.stderr


def test_a_bad_device_engine_or_log_level_is_one_line(tmp_path: Path):
    cfg = tmp_path / "tpu.toml"
    cfg.write_text('[stages.render]\nengine = "warp"\ndevice = "tpu"\n')
    r = subprocess.run([sys.executable, "-m", "giris.supervisor.cli", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "bad device 'tpu'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # an engine no worker can load: it left a "degraded" server, never ready for systemd
    cfg.write_text('[stages.render]\nengine = "nope"\n')
    r = subprocess.run([sys.executable, "-m", "giris.supervisor.cli", "serve", "--config", str(cfg),
                        "--endpoint", f"ipc://{tmp_path}/gw.sock"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "stages.render.engine: unknown engine 'nope'; known:" in r.stderr, r.stderr
    assert "warp" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "giris.supervisor.cli", "--log-level", "bogus", "status"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "invalid choice: 'BOGUS'" in r.stderr and "Traceback" not in r.stderr
    # the same level from the environment (it was a traceback and exit status 1)
    import os

    r = subprocess.run([sys.executable, "-m", "giris.supervisor.cli", "status"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "GIRIS_LOG_LEVEL": "verbose"})
    assert r.returncode == 2 and "GIRIS_LOG_LEVEL: invalid choice: 'VERBOSE'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_serve_refuses_an_inproc_endpoint(tmp_path: Path):
    """``inproc://`` is an embedded Runtime's: ``giris serve`` on one said "serving on"
    and served where no client could ever reach it."""
    cfg = embedded_config(tmp_path)
    r = giris("serve", "--config", str(cfg), "--endpoint", "inproc://giris", timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "giris: error [bad_endpoint]: cannot listen on inproc://giris: inproc:// reaches only" in r.stderr


def test_closing_after_the_server_died_does_not_wait_again(make_server):
    import signal
    import time

    import pytest

    from giris.runtime.errors import ServerGone

    srv = make_server()
    c = srv.client(timeout=1.0)
    s = c.open_session()
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(10)
    time.sleep(1.2)  # nothing heard from it since
    with pytest.raises(ServerGone):
        s.cancel()
    t0 = time.monotonic()
    with pytest.raises(ServerGone):
        s.close()  # one short try, not another full request timeout (was 10 s)
    assert time.monotonic() - t0 < 1.5
    t0 = time.monotonic()
    c.close()
    assert time.monotonic() - t0 < 1.5


def test_a_session_the_server_closed_fails_at_once(make_server):
    """After a server's shutdown (its clients are told: ``session_closed``), the next
    ``say`` waited out the client's whole timeout; and a client with nothing to talk to
    waited 120 s in ``open_session`` whatever its timeout."""
    from giris.runtime.client import Client
    from giris.runtime.errors import GirisError, ServerGone

    srv = make_server()
    c = srv.client(timeout=20.0)
    s = c.open_session()
    srv.proc.terminate()
    srv.proc.wait(30)
    time.sleep(0.3)  # its session_closed has come
    t0 = time.monotonic()
    with pytest.raises(GirisError) as e:
        s.start_say("hello")
    assert e.value.code == "session_closed" and "shutdown" in str(e.value)
    s.close()  # closed already: nothing to wait for
    assert time.monotonic() - t0 < 1.0
    with Client(srv.endpoint, timeout=2.0) as lonely:  # no server there any more
        t0 = time.monotonic()
        with pytest.raises(ServerGone):
            lonely.open_session()
        assert time.monotonic() - t0 < 10


def test_say_holds_a_few_frames_not_the_whole_video(make_server, tmp_path):
    """The renderer outruns the H.264 encoder: every frame of a long text waited in the
    ``giris say`` process (1.8 GB for 2,000 characters at 512²). Its frames are read
    zero-copy now, so a frame not yet encoded holds its pool slot and the renderer waits."""
    import time

    import psutil

    from tests.conftest import small_stages

    side = 512
    srv = make_server({"defaults": {"size": side}, "limits": {"max_size": side},
                       "stages": small_stages(render={"pool_slots": 48, "pool_slot_bytes": side * side * 3})})
    out = tmp_path / "long.mp4"
    # 150 words: 30 s of speech, 750 frames of 768 KiB (~560 MiB) if they all waited
    proc = subprocess.Popen([sys.executable, "-m", "giris.supervisor.cli", "say", "--connect", srv.endpoint,
                             "--quiet", " ".join(["word"] * 150), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    me, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, me.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout.splitlines()[-1])["frames"] == 750
    assert peak < 250 << 20, f"giris say peaked at {peak >> 20} MiB"


def test_a_second_server_on_a_live_ipc_endpoint_is_refused(make_server, tmp_path):
    """A second ``giris serve`` on the same ipc endpoint took the first's socket silently
    (its clients reached the newcomer), and whichever stopped first unlinked the socket
    the other was serving on. Now it is refused; a dead server's socket is taken over."""
    import socket

    from giris.runtime.client import Client
    from giris.runtime.errors import GirisError

    first = make_server()
    r = subprocess.run([sys.executable, "-m", "giris.supervisor.cli", "serve", "--config",
                        str(first.config_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "another server is serving on" in r.stderr, r.stderr
    assert first.status()["pid"] == first.proc.pid  # still its own socket, still serving
    # a socket nobody listens on (a server killed with SIGKILL) is stale: taken over
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    second = serve_on(first, tmp_path, f"ipc://{stale}")
    try:
        with Client(f"ipc://{stale}", timeout=5) as c:
            deadline = time.monotonic() + 60
            while second.poll() is None and time.monotonic() < deadline:
                try:
                    assert c.status(timeout=1)["pid"] == second.pid
                    break
                except GirisError:
                    time.sleep(0.2)
            else:
                raise AssertionError(f"no server on the stale socket: {second.poll()}")
    finally:
        second.terminate()
        second.wait(30)
    # and a file that is not a socket is not deleted to make way
    plain = tmp_path / "plain.sock"
    plain.write_text("mine")
    third = serve_on(first, tmp_path, f"ipc://{plain}")
    _, err = third.communicate(timeout=60)
    assert third.returncode == 2 and "is not a socket" in err and plain.read_text() == "mine"
    # a tcp port someone holds: said as what it is (it read "cannot connect")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "giris.supervisor.cli", "serve", "--config",
                            str(first.config_path), "--insecure", "--endpoint", f"tcp://127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"[endpoint_in_use]: cannot listen on tcp://127.0.0.1:{port}: Address already in use" in r.stderr


def serve_on(srv, tmp_path, endpoint: str):
    """``giris serve`` with ``srv``'s config on another endpoint."""
    path = tmp_path / f"{abs(hash(endpoint))}.toml"
    path.write_text(srv.config_path.read_text().replace(srv.endpoint, endpoint))
    return subprocess.Popen([sys.executable, "-m", "giris.supervisor.cli", "serve", "--config",
                             str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------------- giris say, embedded
WORDS = " ".join(["word"] * 40)  # 8 s of test speech


def embedded_config(tmp_path: Path, **stages: dict) -> Path:
    """A config for ``giris say``'s embedded runtime: the small test pipeline."""
    from tests.conftest import small_stages, write_toml

    return write_toml(tmp_path / "embedded.toml", {
        "defaults": {"size": 64}, "limits": {"min_size": 32, "max_fps": 200},
        "stages": small_stages(**stages)})


def _wait_for(what, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("phase", ["loading", "writing"])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_during_say_leaves_nothing_behind(tmp_path: Path, phase: str, sig: str):
    """SIGTERM and SIGHUP get the cleanup Ctrl-C gets: the temporary MP4 goes, the old
    file stays, the workers stop, the segments and the socket folder go; exit 128 + the
    signal. (SIGTERM killed the process: a ``.out.PID.partial.mp4`` or a 151 MB segment
    stayed; Ctrl-C while the models loaded left the segments and the socket folder.)"""
    import os
    import signal

    import psutil

    from tests.conftest import shm_segments

    signum = getattr(signal, sig)
    run = tmp_path / "run"
    run.mkdir()
    out = tmp_path / "out.mp4"
    out.write_bytes(b"the previous take")
    # loading: a stage that loads for a minute; writing: frames that take a while to draw
    over = {"tts": {"options": {"word_s": 0.2, "load_s": 60}}} if phase == "loading" else \
        {"render": {"options": {"render_s": 0.05}}}
    cfg = embedded_config(tmp_path, **over)
    p = subprocess.Popen([sys.executable, "-m", "giris.supervisor.cli", "say", WORDS, "-o", str(out),
                          "--quiet", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "XDG_RUNTIME_DIR": str(run)})
    try:
        if phase == "loading":
            _wait_for(lambda: shm_segments(p.pid) and len(psutil.Process(p.pid).children(recursive=True)) >= 5)
        else:
            _wait_for(lambda: any(f.name.startswith(".out.") for f in tmp_path.iterdir()))
        assert p.poll() is None
        kids = psutil.Process(p.pid).children(recursive=True)
        p.send_signal(signum)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signum, err
    assert "Traceback" not in err, err
    assert out.read_bytes() == b"the previous take"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["embedded.toml", "out.mp4", "run"]
    assert shm_segments(p.pid) == [] and list(run.iterdir()) == []
    _wait_for(lambda: not [k for k in kids if k.is_running() and k.status() != "zombie"], 10)


def test_a_coefficient_file_that_cannot_be_written_leaves_both_old_files(make_server, tmp_path: Path):
    """The MP4 and the CSV are both written under temporary names and renamed when both
    are whole: a CSV that cannot be written (here: past the process's file size limit)
    leaves the old video and the old CSV as they were (the MP4 was replaced, then the old
    CSV truncated), and the error names the file (it said only "File too large")."""
    import resource

    srv = make_server({"limits": {"max_fps": 200}})
    out, csv = tmp_path / "out.mp4", tmp_path / "out.csv"
    out.write_bytes(b"the previous take")
    csv.write_text("frame,pts\n")
    cmd = [sys.executable, "-m", "giris.supervisor.cli", "say", "one two three four five six seven eight",
           "--connect", srv.endpoint, "--fps", "200", "--quiet", "-o", str(out), "--coeffs", str(csv)]

    def small_files() -> None:  # the MP4 takes ~26 kB, the CSV ~54 kB
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, preexec_fn=small_files)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"giris: error: {csv}: File too large" in r.stderr, r.stderr
    assert out.read_bytes() == b"the previous take" and csv.read_text() == "frame,pts\n"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out.csv", "out.mp4", "srv0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(csv.read_text().splitlines()) == json.loads(r.stdout)["frames"] + 1
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out.csv", "out.mp4", "srv0"]


def test_an_output_name_at_the_file_systems_limit_is_written(make_server, tmp_path: Path):
    """A 255-byte name is written (its temporary name is shortened to fit; it failed after
    all the work), one longer is refused before anything loads."""
    srv = make_server()
    out = tmp_path / ("a" * 251 + ".mp4")
    r = giris("say", "one two", "--connect", srv.endpoint, "--quiet", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0 and sorted(f.name for f in tmp_path.iterdir()) == [out.name, "srv0"]
    r = giris("say", "one two", "--quiet", "-o", str(tmp_path / ("b" * 252 + ".mp4")))
    assert r.returncode == 2 and "longer than the 255 bytes" in r.stderr and "Traceback" not in r.stderr


def test_what_needs_no_model_is_refused_before_the_models_load(tmp_path: Path):
    """An odd size or an empty text is refused at once, by the server's own checks
    (after the models' 3–8 s load, it was; here a stage that loads for a minute)."""
    cfg = embedded_config(tmp_path, tts={"options": {"load_s": 60}})
    out = str(tmp_path / "x.mp4")
    for args, said in [(["hi", "--size", "65"], "size must be an even integer"),
                       (["  "], "text must be a non-empty string"),
                       (["hi", "--fps", "0"], "fps must be a number")]:
        t0 = time.monotonic()
        r = giris("say", *args, "--quiet", "-o", out, "--config", str(cfg))
        assert r.returncode == 2 and f"giris: error [bad_input]: {said}" in r.stderr, r.stderr
        assert time.monotonic() - t0 < 20


def test_flags_of_the_other_mode_are_refused(tmp_path: Path):
    """``--config`` is the embedded runtime's, the keys a ``--connect`` server's: given in
    the other mode they are refused at once (they were ignored: the run went on without
    them, here a stage that loads for a minute)."""
    cfg = embedded_config(tmp_path, tts={"options": {"load_s": 60}})
    out = str(tmp_path / "x.mp4")
    for args, said in [(["--connect", f"ipc://{tmp_path}/gw.sock"], "--config configures the embedded"),
                       (["--server-key", "server.key"], "--server-key and --client-key are for"),
                       (["--client-key", "alice.key_secret"], "--server-key and --client-key are for")]:
        t0 = time.monotonic()
        r = giris("say", "hi", "--quiet", "-o", out, "--config", str(cfg), *args, timeout=40)
        assert r.returncode == 2 and f"giris: error [bad_input]: {said}" in r.stderr, r.stderr
        assert time.monotonic() - t0 < 20 and not Path(out).exists()


def test_errors_start_a_line_of_their_own_and_quiet_is_quiet(tmp_path: Path):
    """The progress line ends before an error (``loading models…giris: error …`` was one
    line), and ``--quiet`` wins over ``GIRIS_PROGRESS`` (it was ignored)."""
    import os

    cfg = embedded_config(tmp_path)
    env = {**os.environ, "GIRIS_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "giris.supervisor.cli", "say", "hi", "--avatar", str(tmp_path / "no.png"),
           "-o", str(tmp_path / "x.mp4"), "--config", str(cfg)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2
    assert "loading models…\n" in r.stderr and r.stderr.splitlines()[-1].startswith("giris: error"), r.stderr
    r = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and r.stderr.startswith("giris: error"), r.stderr


def test_giris_progress_zero_means_no_bar():
    """``GIRIS_PROGRESS=0`` turned the bar on, as any value did."""
    from giris.supervisor.cli import _progress_wanted

    assert [_progress_wanted(v, False) for v in (None, "", "1", "yes", "0", "false", "OFF", "no")] == \
        [False, False, True, True, False, False, False, False]
    assert [_progress_wanted(v, True) for v in (None, "", "1", "0", "off")] == [True, True, True, False, False]


def test_the_global_log_flags_reach_the_embedded_workers(tmp_path: Path):
    """``giris --log-level INFO --log-json say``: the workers log at INFO, in JSON (they
    logged at WARNING, as plain text, whatever the flags)."""
    cfg = embedded_config(tmp_path)
    r = giris("--log-level", "INFO", "--log-json", "say", "hi", "--quiet", "-o", str(tmp_path / "x.mp4"),
              "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stderr.splitlines()]  # every line JSON
    ready = {line["stage"] for line in lines if line["logger"] == "giris.worker" and line["event"] == "ready"}
    assert ready == {"tts", "coeffs", "motion", "render"}


def test_keys_errors_are_said_as_every_commands_and_force_replaces(tmp_path: Path):
    """``giris keys`` fails as the other commands do (exit 2, ``giris: error [code]``, JSON
    under ``--log-json``; it said ``giris keys: …``, exit 1), and ``--force`` replaces a
    pair (argparse refused it)."""
    r = giris("keys", "--dir", str(tmp_path), "--name", "bob")
    assert r.returncode == 0, r.stderr
    assert str(tmp_path / "bob.key") in r.stdout and str(tmp_path / "bob.key_secret") in r.stdout
    old = (tmp_path / "bob.key").read_text()
    r = giris("keys", "--dir", str(tmp_path), "--name", "bob")
    assert r.returncode == 2 and r.stderr.startswith("giris: error [bad_input]: ") and "already exists" in r.stderr
    r = giris("--log-json", "keys", "--dir", str(tmp_path), "--name", "bob")
    line = json.loads(r.stderr)
    assert r.returncode == 2 and line["level"] == "error" and line["code"] == "bad_input"
    r = giris("keys", "--dir", str(tmp_path), "--name", "bob", "--force")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "bob.key").read_text() != old


def test_a_metrics_port_out_of_range_is_one_line(tmp_path: Path):
    r = giris("serve", "--endpoint", f"ipc://{tmp_path}/gw.sock", "--metrics-port", "70000")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("giris: error") and "metrics_port must be 0 (off) or a port in 1..65535, not 70000" in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
