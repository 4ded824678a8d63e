"""The client SDK when things go wrong around it: replies that come after their caller
gave up, a server slow to answer, stages that fail, a collector running at a bad moment,
a session closed from another thread or by the server."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from giris.runtime.client import Client, Frame
from giris.runtime.errors import GirisError, ServerGone, StageFailed, Timeout
from tests.conftest import collect, small_stages


def _wait(cond, timeout: float = 10.0, step: float = 0.1) -> bool:
    """Whether ``cond()`` became true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


def _pools_idle(srv) -> bool:
    return all(p["in_use"] == 0 for p in srv.status()["pools"].values())


def _stall(srv, seconds: float) -> None:
    """The supervisor stops answering for ``seconds`` (a loaded host), then goes on."""
    os.kill(srv.proc.pid, signal.SIGSTOP)
    threading.Timer(seconds, os.kill, (srv.proc.pid, signal.SIGCONT)).start()


def test_a_say_that_timed_out_is_cancelled_when_its_reply_comes(make_server):
    """A say whose reply came after its timeout ran on unseen: its zero-copy frames held
    the session's pool share and every later say failed with pool_full."""
    srv = make_server({"stages": small_stages(render={"session_slots": 4, "block_timeout": 2.0})})
    c = srv.client(timeout=1.0)
    s = c.open_session(zero_copy=True, timeout=10)
    assert len(collect(s, "one")["frames"]) == 5
    _stall(srv, 1.5)
    with pytest.raises(GirisError):
        s.say("one two three four five six")
    time.sleep(1.0)  # the server goes on: the say's reply comes, then its frames
    assert _wait(lambda: _pools_idle(srv)), srv.status()["pools"]
    out = collect(s, "seven eight", timeout=10)
    assert len(out["frames"]) == 10 and out["events"][-1].meta["complete"]
    assert not any(s._backlog.values())


def test_a_session_opened_after_its_timeout_is_closed(make_server):
    """An open_session that timed out still opened on the server: the orphan counted
    against the client's sessions for as long as the client heartbeated."""
    srv = make_server({"limits": {"max_sessions_per_client": 2},
                       "stages": small_stages(render={"options": {"open_s": 1.5}})})
    c = srv.client()
    kept = c.open_session()  # noqa: F841 - held open
    with pytest.raises(GirisError):
        c.open_session(timeout=1.0)
    time.sleep(1.5)  # it opens on the server meanwhile
    assert _wait(lambda: srv.status()["sessions"] == 1), srv.status()["sessions"]
    again = c.open_session(timeout=10)  # noqa: F841
    assert srv.status()["sessions"] == 2


def test_a_request_shorter_than_a_heartbeat_times_out_on_a_live_server(make_server):
    """A request whose limit was shorter than the heartbeat interval raised ServerGone
    from a live server slow to answer (nothing could be heard in so short a wait); a
    server silent for real is still ServerGone, early."""
    srv = make_server({"stages": small_stages(render={"options": {"open_s": 1.5}})})
    c = srv.client(heartbeat=10.0)
    with pytest.raises(Timeout):
        c.open_session(timeout=1.0)
    assert c.status(timeout=5)["state"] == "serving"
    quick = srv.client(timeout=1.0, heartbeat=0.2)  # silent for 1 s (5 heartbeats): gone
    quick.status(timeout=5)  # connected
    _stall(srv, 2.0)
    t0 = time.monotonic()
    with pytest.raises(ServerGone):
        quick.status(timeout=10)
    assert time.monotonic() - t0 < 5


def test_a_stage_failing_for_good_fails_every_utterance_in_flight(make_server):
    """The server sent one error for the whole session, then each utterance's end: only
    the stream that read the error raised; the second dropped its end and waited out its
    timeout (Timeout, 8 s, not StageFailed)."""
    srv = make_server({"restart": {"max_restarts": 0},
                       "stages": small_stages(tts={"options": {"word_s": 0.2, "slow_s": 0.3}})})
    s = srv.client().open_session()
    a = s.start_say("SLOW SLOW CRASH")  # the tts dies: failed at once (max_restarts 0)
    b = s.start_say("one two")  # queued behind it
    for utt in (a, b):
        t0 = time.monotonic()
        with pytest.raises(StageFailed, match="tts"):
            list(s.stream(utt, timeout=8))
        assert time.monotonic() - t0 < 6
    assert not any(s._backlog.values())


def test_a_stage_failure_is_not_raised_into_a_later_say(make_server):
    """A session with nothing in flight when a stage failed got a session-level error: its
    next say, once the stage was back, raised that stale StageFailed."""
    srv = make_server({"restart": {"max_restarts": 0, "failed_retry": 1.0}})
    c = srv.client()
    quiet = c.open_session()
    other = c.open_session()
    with pytest.raises(StageFailed):
        collect(other, "one CRASH")

    def serving() -> bool:
        st = c.status()
        return st["state"] == "serving" and all(w["state"] == "ready" for w in st["workers"])

    assert _wait(serving, 30)
    out = collect(quiet, "one two")
    assert len(out["frames"]) == 10 and out["events"][-1].meta["complete"]


def test_a_restart_loses_no_utterance_queued_behind_a_long_one(make_server):
    """A render restart marked every utterance in flight interrupted, and one queued behind
    a long one (nothing of it could come before that one ended) was declared lost
    ``lost_after`` (2 s) into the restart though the tts made it; and the long one,
    every frame of it delivered, was reported incomplete."""
    srv = make_server({"stages": small_stages(tts={"options": {"word_s": 0.2, "slow_s": 0.5}})})
    s = srv.client().open_session()
    a = s.start_say(" ".join(["SLOW"] * 12))  # ~6 s of tts work, 60 frames
    b = s.start_say("one two three")  # 15 frames, queued behind it
    render = next(w["pid"] for w in srv.status()["workers"] if w["stage"] == "render")
    threading.Timer(1.0, os.kill, (render, signal.SIGKILL)).start()
    ends: dict[int, tuple[int, dict]] = {}

    def read(u: int) -> None:
        items = list(s.stream(u, timeout=20))
        ends[u] = (sum(isinstance(i, Frame) for i in items), items[-1].meta)

    threads = [threading.Thread(target=read, args=(u,)) for u in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert next(w for w in srv.status()["workers"] if w["stage"] == "render")["restarts"] == 1
    frames, meta = ends[b]
    assert not meta.get("lost") and frames == 15 and meta["complete"], meta
    frames, meta = ends[a]  # complete exactly when every frame came (a kill mid-frame cuts)
    assert meta["complete"] == (frames == 60) and frames >= 50, (frames, meta)


#: clients whose thread hung (the old client): kept, so collecting them cannot hang the run
_HUNG: list = []


def test_a_frame_collected_while_the_client_wakes_its_thread_cannot_hang_it(tmp_path, monkeypatch):
    """Waking the I/O thread held a plain lock around a pyzmq send, where a garbage
    collection may run; a zero-copy Frame in a reference cycle collected there posts its
    release and wakes again, on the same thread: it waited for itself for ever (the
    reviewer's script hung within 200,000 frames at the default GC thresholds). Here the
    collection is made to run inside that send."""
    import gc

    import zmq

    from giris.runtime import protocol as P
    from giris.runtime.client import Client

    c = Client(f"ipc://{tmp_path}/nobody.sock", timeout=2)
    ref = P.TensorRef(dtype="uint8", shape=(1,), nbytes=1, pool="giris-1-x-render", slot=0, lease=1)
    send = zmq.Socket.send
    state: dict = {}

    def collecting_send(sock, *a, **kw):
        if threading.current_thread() is state.get("thread") and not state.get("collected"):
            state["collected"] = True
            gc.collect()  # the cyclic Frame's __del__ posts its release from in here
        return send(sock, *a, **kw)

    monkeypatch.setattr(zmq.Socket, "send", collecting_send)

    def work() -> None:
        f = Frame(image=None, index=0, pts=0.0, utterance=1, final=False,
                  _release=lambda: c._release_refs("tok", [ref]))
        f.cycle = f  # garbage only a collection finds
        del f
        c._poke()
        state["done"] = True

    state["thread"] = t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(5)
    if not state.get("done"):
        _HUNG.append(c)
    assert state.get("collected") and state.get("done"), "the thread hung in its own wake-up"
    monkeypatch.undo()
    c.close()
    assert not c._thread.is_alive()


def test_closing_a_session_from_another_thread_ends_the_loop_reading_it(make_server):
    """close() dropped the session's queue, but its reader was blocked on that queue and
    the server sends nothing for a closed session: the reader sat out its whole timeout
    and raised Timeout."""
    srv = make_server({"stages": small_stages(tts={"options": {"word_s": 0.2, "slow_s": 0.5}})})
    s = srv.client(timeout=20).open_session()
    speech = s.say(" ".join(["SLOW"] * 40))  # 20 s of work
    got: dict = {}

    def read() -> None:
        try:
            for _ in speech:
                got["items"] = got.get("items", 0) + 1
        except GirisError as e:
            got["error"] = e
        got["at"] = time.monotonic()

    t = threading.Thread(target=read)
    t.start()
    time.sleep(1.2)
    closed_at = time.monotonic()
    s.close()
    t.join(30)
    assert got.get("items") and isinstance(got.get("error"), GirisError), got
    assert got["error"].code == "session_closed" and got["at"] - closed_at < 5
    assert srv.status()["sessions"] == 0


def test_leaving_a_loop_over_coefficients_kept_in_a_variable_cancels_it(make_server):
    """coefficients() was a plain generator: left with ``break`` while a variable held it,
    it was not closed, its utterance ran on, and its unread zero-copy frames held the
    session's pool share (the next say failed pool_full after 4 s)."""
    srv = make_server({"stages": small_stages(render={"session_slots": 3, "block_timeout": 2.0})})
    s = srv.client().open_session(zero_copy=True, want=["audio", "frames", "coeffs"])
    co = s.coefficients(" ".join(["word"] * 20))
    for _ in co:
        break
    out = collect(s, "one two", timeout=10)
    assert len(out["frames"]) == 10 and out["events"][-1].meta["complete"]
    assert _wait(lambda: _pools_idle(srv)), srv.status()["pools"]
    assert co.utterance in s.client._abandoned[s.token]


def test_a_session_the_server_closes_while_read_is_forgotten(make_server):
    """A reader that got session_closed marked the Session closed, so close() returned
    early: the client kept the session's queue (and heartbeated for it), its abandoned
    ids and its end for ever."""
    srv = make_server({"timeouts": {"client_idle": 1.0},
                       "stages": small_stages(tts={"options": {"word_s": 0.2, "slow_s": 0.1}})})
    c = srv.client(heartbeat=10.0)  # too rare for this server: it closes the sessions as idle
    for close in (False, True):
        s = c.open_session()
        with pytest.raises(GirisError) as e:
            for _ in s.say(" ".join(["SLOW"] * 40)):
                pass
        assert e.value.code == "session_closed" and "idle" in str(e.value)
        assert s.token not in c._sessions and s.token not in c._abandoned  # read: forgotten
        with pytest.raises(GirisError, match="idle"):  # its requests still say why, at once
            s.start_say("again")
        if close:
            s.close()
            assert s.token not in c._ended
    assert not c._sessions and not c._abandoned and len(c._ended) == 1


def test_a_reader_that_is_behind_holds_back_its_stream_not_the_clients_memory(make_server):
    """The I/O thread took every message off the socket into an unbounded queue, so the
    server's back-pressure never engaged: a slow reader had the whole utterance buffered
    in the client (546 frames, ~102 MiB at 256²). Now reading stops at a full queue and
    the server's outbox holds the rest; heartbeats go on, and a request or another
    session's reader waiting for its messages resumes reading (no deadlock)."""
    from giris.runtime import client as sdk

    size = 256
    srv = make_server({"defaults": {"size": size}, "timeouts": {"client_idle": 1.0},
                       "stages": small_stages(render={"pool_slots": 16,
                                                      "pool_slot_bytes": size * size * 3})})
    c = srv.client(heartbeat=0.3)
    a, b = c.open_session(), c.open_session()
    q = c._sessions[a.token]
    speech = a.say(" ".join(["word"] * 60))  # 300 frames, not read for now
    peak = 0
    deadline = time.monotonic() + 2.5  # past client_idle: heartbeats must go on meanwhile
    while time.monotonic() < deadline:
        peak = max(peak, q.qsize())
        time.sleep(0.05)
    assert peak <= getattr(sdk, "SESSION_QUEUE", 64) + 8, peak
    assert srv.status()["outbox"]["messages_waiting"] > 0  # the server holds the rest
    out = collect(b, "one two", timeout=10)  # b's reader resumes reading
    assert len(out["frames"]) == 10 and out["events"][-1].meta["complete"]
    assert c.status(timeout=5)["sessions"] == 2  # a request is answered; none closed as idle
    frames = [i for i in speech if isinstance(i, Frame)]
    assert len(frames) == 300 and frames[-1].final


def test_reading_a_later_utterance_first_does_not_starve_it_of_slots(make_server):
    """Frames of an utterance nobody reads yet waited in the backlog holding their pool
    slots: with the session's share (4) taken by them, the utterance being read failed
    with pool_full. Parked frames are copies now, their slots given back at once."""
    srv = make_server({"stages": small_stages(render={"session_slots": 4, "block_timeout": 2.0})})
    s = srv.client(timeout=10.0).open_session(zero_copy=True, timeout=10)
    in_order = collect(s, "one two three four five six seven eight")["frames"]
    first = s.start_say("one two three four five six seven eight")
    second = s.start_say("nine ten")
    later = [(f.index, f.image.copy()) for f in s.stream(second) if isinstance(f, Frame)]
    assert len(later) == 10
    parked = [f for f in s.stream(first) if isinstance(f, Frame)]
    assert [f.index - parked[0].index for f in parked] == [i - in_order[0][0] for i, _, _ in in_order]
    assert all(f._release is None for f in parked)  # copies: they hold no slot
    assert all((f.image == img).all() for f, (_, img, _) in zip(parked, in_order))
    assert _wait(lambda: _pools_idle(srv)), srv.status()["pools"]


def test_clients_made_and_let_go_one_after_another_each_start(tmp_path):
    """A client's wake-up address was named by ``id(self)``, which Python gives the next
    client as soon as one is collected, while the old one's I/O thread may still hold
    the address: the constructor failed with "Address already in use" (290 of 300)."""
    for _ in range(100):
        Client(f"ipc://{tmp_path}/nobody.sock", timeout=1.0)  # let go at once
