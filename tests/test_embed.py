"""Embedding: the runtime inside a product's process, no network socket."""
from __future__ import annotations

import os

import psutil
import pytest

from giris.runtime import Runtime
from giris.runtime.client import Frame
from giris.runtime.config import from_mapping, load, parse_bytes
from tests.conftest import collect, shm_segments, small_stages


def test_runtime_context_manager_streams_and_cleans_up():
    cfg = from_mapping({"stages": small_stages(), "defaults": {"size": 64}, "limits": {"min_size": 32}})
    with Runtime(cfg) as rt:
        assert rt.config.server.endpoint.startswith("inproc://")
        children = [p.pid for p in psutil.Process().children(recursive=True)]
        workers = {w["pid"] for w in rt.status()["workers"]}
        assert len(workers) == 4 and workers <= set(children)  # (and the launcher they fork from)
        s = rt.open_session(want=["audio", "frames", "coeffs"])
        out = collect(s, "embedded and fast")
        assert [f[0] for f in out["frames"]] == list(range(15))
        assert out["coeffs"] and out["audio"]
        st = rt.status()
        assert st["sessions"] == 1 and st["state"] == "serving"
        assert shm_segments(os.getpid())
        s.close()
    assert shm_segments(os.getpid()) == []
    assert not [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def test_a_stage_whose_engine_refuses_its_config_fails_the_start_at_once():
    """An engine that refuses its configuration (exit EX_CONFIG before it was ever ready)
    is not restarted five times, and an embedded Runtime raises instead of starting
    without that stage (it took ~14 s and then served nothing)."""
    import time

    from giris.runtime.errors import StageFailed

    stages = small_stages()
    stages["tts"] = {"engine": "piper", "options": {"rate": 99}}  # out of range: bad_config
    cfg = from_mapping({"stages": stages, "defaults": {"size": 64}, "limits": {"min_size": 32}})
    t0 = time.monotonic()
    with pytest.raises(StageFailed, match="tts") as e:
        Runtime(cfg).start()
    assert e.value.details["stages"] == ["tts"]
    assert time.monotonic() - t0 < 10
    assert shm_segments(os.getpid()) == []
    assert not [p for p in psutil.Process().children(recursive=True) if p.status() != "zombie"]


def test_an_option_value_the_engine_cannot_use_is_a_refused_config():
    """An option's value the engine cannot convert (a ValueError or TypeError while it
    loads) is its configuration refused (exit EX_CONFIG, not restarted): it was taken for
    a bug, a traceback and a restart after each backoff, the same error every time."""
    import time

    from giris.runtime.errors import StageFailed

    stages = small_stages(tts={"options": {"word_s": "slow"}})
    cfg = from_mapping({"stages": stages, "defaults": {"size": 64}, "limits": {"min_size": 32},
                        "restart": {"backoff_initial": 5.0}, "timeouts": {"worker_start": 15.0}})
    t0 = time.monotonic()
    with pytest.raises(StageFailed, match="tts"):
        Runtime(cfg).start()
    assert time.monotonic() - t0 < 10
    assert not [p for p in psutil.Process().children(recursive=True) if p.status() != "zombie"]


def test_a_pool_named_without_its_slot_size_holds_whole_frames():
    """``pool_slots`` without ``pool_slot_bytes`` in a named stage: slots that hold the
    largest frame allowed, so frames travel in the pool (its slots were 0 bytes: every
    frame went inline, a zero-copy session got copies, and the pool did nothing)."""
    stages = small_stages()
    del stages["render"]["pool_slot_bytes"]
    cfg = from_mapping({"stages": stages, "defaults": {"size": 64}, "limits": {"min_size": 32, "max_size": 96}})
    assert cfg.stages["render"].pool_slot_bytes == 96 * 96 * 3
    assert cfg.stages["coeffs"].pool_slot_bytes == 0  # no pool, no slots
    with Runtime(cfg) as rt:
        s = rt.open_session(zero_copy=True)
        views = []
        for item in s.say("alpha beta"):
            if isinstance(item, Frame):
                views.append(not item.image.flags.owndata)  # a view into the pool
                item.release()
        assert views and all(views)
        s.close()


def test_a_stage_on_a_gpu_hands_its_frames_over_in_host_memory(monkeypatch):
    """A stage on ``cuda:0`` (the test engine never touches CUDA, so this runs anywhere)
    writes into its shared-memory pool like any other: its references say ``cpu``, where
    the bytes are, and every frame reaches the client (they were all dropped as
    "a cuda:0 tensor needs the CUDA pool")."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # "" would mean: no GPU at all
    stages = small_stages(render={"device": "cuda:0"})
    cfg = from_mapping({"stages": stages, "defaults": {"size": 64}, "limits": {"min_size": 32}})
    with Runtime(cfg) as rt:
        s = rt.open_session(want=["frames"])
        out = collect(s, "on the gpu")
        assert [f[0] for f in out["frames"]] == list(range(len(out["frames"]))) and len(out["frames"]) >= 8
        s.close()


def test_config_loading(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[budgets]\ncpu = "2GiB"\n"cuda:0" = "512 MB"\n[limits]\nmax_sessions = 3\n'
                 '[stages.tts]\nengine = "test-source"\ncpus = [0]\n')
    cfg = load(p)
    assert cfg.budgets == {"cpu": 2 * 1024**3, "cuda:0": 512 * 10**6}
    assert cfg.limits.max_sessions == 3
    assert list(cfg.stages) == ["tts"] and cfg.stages["tts"].cpus == [0]
    assert list(load().stages) == ["tts", "coeffs", "motion", "render"]
    with pytest.raises(ValueError):
        from_mapping({"limits": {"max_sesions": 3}})
    with pytest.raises(ValueError):
        from_mapping({"bogus": {}})
    assert parse_bytes("1.5 KiB") == 1536


def _run_ids(pid: int) -> set[str]:
    """The supervisors whose segments are out: ``giris-PID-RUNID-stage``."""
    return {name.split("-")[2] for name in shm_segments(pid)}


def test_a_runtime_starts_once_starts_again_after_stop_and_keeps_the_callers_config():
    """``start()`` on a running runtime returns it (a second call started a second
    supervisor that nothing stopped); a stopped runtime starts again (it raised a raw
    ZMQError), ``status()`` when stopped is a clear error (a bare AssertionError), and the
    caller's config keeps its endpoint (it became ``inproc://…``)."""
    from giris.runtime.errors import GirisError

    cfg = from_mapping({"stages": small_stages(), "defaults": {"size": 64}, "limits": {"min_size": 32},
                        "server": {"endpoint": "ipc:///tmp/mine.sock"}})
    rt = Runtime(cfg)
    assert cfg.server.endpoint == "ipc:///tmp/mine.sock"
    with pytest.raises(GirisError, match="not started") as e:
        rt.status()
    assert e.value.code == "not_started"
    with rt.start() as same:  # `with Runtime().start() as rt:`, as with open()
        assert same is rt and rt.start() is rt
        assert len(_run_ids(os.getpid())) == 1
        children = [p.pid for p in psutil.Process().children(recursive=True)]
    assert shm_segments(os.getpid()) == []
    assert not [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    with pytest.raises(GirisError, match="not started") as e:
        rt.status()
    assert e.value.code == "not_started"
    rt.stop()  # again: nothing to do
    with rt:  # a stopped runtime starts again
        assert rt.status()["state"] == "serving"
        s = rt.open_session(want=["frames"])
        assert collect(s, "once more")["frames"]
        s.close()
    assert shm_segments(os.getpid()) == []


def test_a_start_that_runs_out_of_time_says_so_in_time_and_leaves_nothing():
    """``start_timeout`` is the wait: a stage still loading after it is stopped at once
    (it was said after the timeout + 5 s + the stop's join, 26 s for 1 s)."""
    import time

    from giris.runtime.errors import GirisError

    cfg = from_mapping({"stages": {"src": {"engine": "test-source", "options": {"load_s": 60}}}})
    rt = Runtime(cfg, start_timeout=1)
    t0 = time.monotonic()
    with pytest.raises(GirisError, match="did not start in 1 s") as e:
        rt.start()
    assert e.value.code == "start_timeout" and "src" in str(e.value)
    assert time.monotonic() - t0 < 12  # (a loaded runner; it was 26 s)
    assert shm_segments(os.getpid()) == []
    assert not [p for p in psutil.Process().children(recursive=True) if p.status() != "zombie"]


def test_stop_from_another_thread_ends_a_start_at_once():
    """A product that gives up on a start (its own shutdown) calls ``stop()`` from
    another thread: ``start()`` says so within a second and nothing is left; the wait
    itself notices, not a poll of it in slices."""
    import threading
    import time

    from giris.runtime.errors import GirisError

    cfg = from_mapping({"stages": {"src": {"engine": "test-source", "options": {"load_s": 60}}}})
    rt = Runtime(cfg, start_timeout=60)
    threading.Timer(1.5, rt.stop).start()
    t0 = time.monotonic()
    with pytest.raises(GirisError, match="stopped while it started") as e:
        rt.start()
    assert e.value.code == "not_started"
    assert time.monotonic() - t0 < 8
    assert shm_segments(os.getpid()) == []
    assert not [p for p in psutil.Process().children(recursive=True) if p.status() != "zombie"]


def test_a_start_timeout_that_is_no_wait_is_refused():
    """``start_timeout=0`` was taken as the default and a negative one as given (a start
    that timed out at once); they are refused as the client's waits are."""
    from giris.runtime.errors import BadInput

    for bad in (0, -1, float("inf")):
        with pytest.raises(BadInput, match="start_timeout must be a number of seconds > 0"):
            Runtime(start_timeout=bad)
