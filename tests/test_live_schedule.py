"""Several live sessions at once: who a stage serves first, how much of the pool each
session of one client may hold, and the cushion a live stream starts with. Real
supervisor and workers with the small test engines; the scheduling rules themselves also
checked directly on a worker's session table."""
from __future__ import annotations

import threading
import time

from giris.runtime import protocol as P
from giris.runtime.client import Event, Frame
from giris.runtime.errors import GirisError
from giris.workers.engine import EngineContext, Output, StageInput
from giris.workers.stage import LIVE_LEAD_S, OFFLINE_WAIT_S, StageWorker, WorkerSession
from tests.conftest import small_stages

import numpy as np
import pytest


def _first_frame_after(s, text: str, timeout: float = 20.0) -> tuple[float, list[float]]:
    """(seconds from the request to its first frame at the client, every frame's arrival)."""
    t0 = time.monotonic()
    stamps = []
    for item in s.say(text, timeout=timeout):
        if isinstance(item, Frame):
            stamps.append(time.monotonic())
            item.release()
    return stamps[0] - t0, stamps


def test_a_session_of_a_client_gets_its_part_of_the_clients_slots(make_server):
    """One client's sessions share half the pool. Its sessions that kept frames (live ones
    whose frames wait for their time do too) took all of it, and a sibling that came
    second could draw none: 1-2 s stalls, then ``pool_full``. Each session now has an
    even part of its client's share while the others are at work."""
    srv = make_server({"stages": small_stages(render={"pool_slots": 16, "session_slots": 4,
                                                      "block_timeout": 2.0})})
    c = srv.client()
    reader = c.open_session(zero_copy=True)
    hogs = [c.open_session(zero_copy=True) for _ in range(2)]
    said = reader.start_say(" ".join(["word"] * 12))  # first at work: 60 frames
    kept: list = []

    def keep(s, utt):
        try:
            for item in s.stream(utt, timeout=10):
                if isinstance(item, Frame):
                    item._release = None  # never given back
                    kept.append(item)
        except GirisError:
            pass  # pool_full: its own sessions are held back

    threads = [threading.Thread(target=keep, args=(h, h.start_say(" ".join(["word"] * 12))), daemon=True)
               for h in hogs]
    for t in threads:
        t.start()
    frames, done = 0, None
    for item in reader.stream(said, timeout=20):
        if isinstance(item, Frame):
            frames += 1
            item.release()
        elif isinstance(item, Event) and item.kind == "utterance_done":
            done = item
    # client share 8 among 3 working sessions: the hogs keep 2 each, never 4 each
    assert len(kept) <= 6
    assert done is not None and done.meta["complete"] and frames == 60
    for t in threads:
        t.join(15)


def test_an_utterance_right_after_another_starts_with_its_own_playout_delay(make_server):
    """A live utterance that came just as the one before had played out continued that
    one's clock with nothing in hand (its first frame shown on arrival), so any hiccup of
    its start-up stalled it. It starts a playout delay after its first frame now."""
    srv = make_server()
    s = srv.client().open_session(realtime=True, zero_copy=True, playout_delay=0.3)
    first, _ = _first_frame_after(s, "one two")
    second, stamps = _first_frame_after(s, "three four")  # the first has just played out
    assert first >= 0.29 and second >= 0.29
    gaps = np.diff(stamps)
    # then paced (one frame read late by a loaded client shortens the gap after it: the
    # median gap and the span say paced, a burst would have them near 0)
    assert len(stamps) == 10 and np.median(gaps) > 0.03 and gaps.max() < 0.05 * 3
    assert stamps[-1] - stamps[0] > 9 * 0.04 * 0.8


def test_live_streams_started_together_get_a_deeper_cushion(make_server):
    """Live streams that start in the same second share the voice's costliest second:
    each starts ``CROWD_DELAY_S`` later per other one (none asked with no playout delay)."""
    from giris.supervisor.delivery import CROWD_DELAY_S

    srv = make_server()
    c = srv.client()
    sessions = [c.open_session(realtime=True, zero_copy=True, playout_delay=0.1) for _ in range(3)]
    firsts = [0.0] * 3
    barrier = threading.Barrier(3)

    def run(i):
        barrier.wait()
        firsts[i], _ = _first_frame_after(sessions[i], "one two")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # the first to start saw at least one other starting, the others two
    assert min(firsts) >= 0.1 + CROWD_DELAY_S - 0.01
    assert sorted(firsts)[1] >= 0.1 + 2 * CROWD_DELAY_S - 0.01
    # a session that asked for no playout delay gets no cushion either
    from types import SimpleNamespace

    from giris.supervisor.delivery import Delivery

    d = Delivery.__new__(Delivery)
    starting = SimpleNamespace(realtime=True, utterances={1: SimpleNamespace(said_at=time.monotonic())})
    d.sup = SimpleNamespace(registry=[starting, starting])
    me = SimpleNamespace()
    assert d.crowd_delay(me, time.monotonic(), 0.1) == 2 * CROWD_DELAY_S
    assert d.crowd_delay(me, time.monotonic(), 0.0) == 0.0


def test_an_utterance_that_failed_is_dropped_by_every_stage(make_server):
    """A live utterance that failed part-way (its client kept its zero-copy frames:
    ``pool_full``) ended for the client, but the stages went on making the rest of it at
    live pace, and the session's next utterance waited ~10 s behind it; its frames made
    before the failure then held their slots until their time, and the next utterance
    failed with ``pool_full`` in turn."""
    srv = make_server({"stages": small_stages(render={"pool_slots": 16, "session_slots": 4,
                                                      "block_timeout": 1.0})})
    s = srv.client().open_session(realtime=True, zero_copy=True)
    held = []  # the frames' release callbacks: kept until the utterance failed
    try:
        for item in s.say(" ".join(["word"] * 60)):  # 12 s of speech
            if isinstance(item, Frame):
                held.append(item._release)
                item._release = None
        raise AssertionError("no pool_full")
    except GirisError as e:
        assert e.code == "pool_full"
    for release in held:
        release()
    first, stamps = _first_frame_after(s, "one two")
    assert len(stamps) == 10 and first < 3.0  # (it was ~10 s)


def test_a_cancelled_live_utterance_counts_the_frames_its_client_got(make_server):
    srv = make_server()
    s = srv.client().open_session(realtime=True, zero_copy=True)
    utt = s.start_say(" ".join(["word"] * 30))
    got, done = 0, None
    for item in s.stream(utt):
        if isinstance(item, Frame):
            item.release()
            got += 1
            if got == 10:
                s.cancel(utt)  # frames made for the next ~0.1-1 s wait for their time
        elif isinstance(item, Event) and item.kind == "utterance_done":
            done = item
    assert done is not None and done.meta["cancelled"] and done.meta["frames"] == got


# ---------------------------------------------------------------------- the worker's rules
def _session(realtime: bool, last_step: float = 0.0, delay: float = 0.12) -> WorkerSession:
    return WorkerSession(token="t", tag=1, state=None, realtime=realtime, delay=delay, last_step=last_step)


def _audio(pts: float, seconds: float) -> Output:
    return Output(type=P.AUDIO, seq=0, pts=pts, meta={"sample_rate": 1000},
                  tensors=[np.zeros(int(seconds * 1000), np.int16)])


def test_a_stage_serves_the_live_session_that_runs_dry_first():
    """Earliest deadline first: a live session's next output is due when the speech it
    has made has played; a new live stream's a playout delay after it asked; an offline
    session's ``OFFLINE_WAIT_S`` after its last turn."""
    w = StageWorker.__new__(StageWorker)
    now = 100.0
    short = _session(True)
    w._played(short, _audio(0.0, 0.2), now)  # plays from now + 0.12 for 0.2 s
    long = _session(True)
    w._played(long, _audio(0.0, 0.6), now)
    new = _session(True, last_step=now)
    offline = _session(False, last_step=now)
    order = sorted([offline, long, new, short], key=lambda s: StageWorker._urgency(s, now))
    assert order == [new, short, long, offline]
    assert StageWorker._urgency(short, now) == now + 0.12 + 0.2
    assert StageWorker._urgency(offline, now) == now + OFFLINE_WAIT_S
    # an offline session that has waited long enough goes before a live one well ahead
    assert StageWorker._urgency(_session(False, last_step=now - 1.5), now) < StageWorker._urgency(long, now)


def test_a_live_session_far_ahead_leaves_the_core_until_it_is_needed():
    w = StageWorker.__new__(StageWorker)
    now = 100.0
    s = _session(True)
    w._played(s, _audio(0.0, 0.5), now)
    assert s.not_before <= now  # 0.62 s in hand: it goes on
    w._played(s, _audio(0.5, 2.0), now + 0.01)
    assert s.not_before == now + 0.12 + 2.5 - LIVE_LEAD_S  # 2.6 s in hand: it waits
    # a chunk that should have played already: the stream starts again a delay on
    w._played(s, _audio(0.2, 0.1), now + 5.0)
    assert s.media == (now + 5.0 + 0.12, 0.2)
    # offline sessions and outputs other than audio are not timed
    off = _session(False)
    w._played(off, _audio(0.0, 5.0), now)
    assert off.media is None and off.not_before == 0.0


def test_coefficient_frames_are_booked_by_the_frames_they_cover():
    """Stages that make coefficients (not audio) book their live outputs too: a live
    session well ahead there lets an offline one have the core (it had one turn a second)."""
    w = StageWorker.__new__(StageWorker)
    s = _session(True)
    s.fps = 25.0
    block = Output(type=P.COEFFS, seq=0, pts=0.0, meta={}, tensors=[np.zeros((50, 73), np.float32)])
    w._played(s, block, 100.0)  # 50 frames: 2 s
    assert s.media == (100.12, 0.0) and s.media_end == 2.0
    assert s.not_before == 100.12 + 2.0 - LIVE_LEAD_S


def test_a_cancel_of_another_utterance_keeps_the_booking_of_the_one_being_made():
    from collections import deque

    w = StageWorker.__new__(StageWorker)
    w.batching = False
    w.pools = type("Pools", (), {"release_all": lambda self, m: None})()
    w.last, w.engine = True, type("E", (), {"cancel": lambda self, st, u: None})()
    s = _session(True)
    s.current = P.Message(P.SAY, session="t", meta={"utterance": 2})
    s.queue = deque()
    w._played(s, _audio(0.0, 3.0), 100.0)
    booked = (s.media, s.not_before)
    w.cancel(s, P.Message(P.CANCEL, session="t", meta={"utterance": 1}))
    assert (s.media, s.not_before) == booked and s.current is not None
    w.cancel(s, P.Message(P.CANCEL, session="t", meta={"utterance": None}))
    assert s.media is None and s.not_before == 0.0


def test_busy_is_answered_on_the_loop_thread_only():
    """The voice asks ``busy()`` to size an utterance's first window; a voice loading on
    the opener thread (for a session being opened) asked it too, iterating the session
    table while the loop changed it, and warmed only some of its nets."""
    w = StageWorker.__new__(StageWorker)
    w.loop_thread = threading.get_ident()
    w.current = None
    other = _session(True)
    other.queue.append(object())
    w.sessions = {"a": other}
    assert w.busy() == 1
    seen = []
    t = threading.Thread(target=lambda: seen.append(w.busy()))
    t.start()
    t.join()
    assert seen == [0]


def test_idle_sessions_holding_a_frame_do_not_shrink_a_working_siblings_share():
    class Pool:
        n_slots = 48

        def __init__(self, owned):
            self.owned = owned

        def owned_by(self, tag):
            return self.owned.get(tag, 0)

    w = StageWorker.__new__(StageWorker)
    w.session_slots, w.client_slots, w._counts_at, w._client_counts = 12, 24, -1.0, {}
    idle = [WorkerSession(token=f"i{k}", tag=10 + k, state=None, client=7) for k in range(7)]
    speaking = WorkerSession(token="s", tag=99, state=None, client=7)
    speaking.queue.append(object())
    w.sessions = {x.token: x for x in idle + [speaking]}
    w.pool = Pool({x.tag: 1 for x in idle})  # each keeps its last zero-copy frame
    held, share = w._client_held(speaking, 1.0)
    assert held == 7 and share == 12


def test_an_utterance_queued_behind_one_still_playing_is_due_when_that_one_has_played():
    """Each new item used to start the session's booking over, as if nothing played: four
    utterances queued on a live session had the voice ~3 s ahead (1 s promised)."""
    w = StageWorker.__new__(StageWorker)
    now = 100.0
    s = _session(True, last_step=now)
    w._played(s, _audio(0.0, 3.0), now)  # utterance 1: plays until now + 3.12
    s.fresh = True  # utterance 2 begins
    assert StageWorker._urgency(s, now + 1.0) == now + 3.12
    # after a pause (utterance 1 has played out) an item starts the stream again
    s.last_step = now + 5.0
    assert StageWorker._urgency(s, now + 5.0) == now + 5.0 + 0.12
    # but a stream that ran dry mid-item is due at once: it stalls
    s.fresh = False
    assert StageWorker._urgency(s, now + 5.0) == now + 3.12


def test_piper_gives_the_worker_a_turn_between_a_later_clauses_front_and_its_first_window(piper):
    """A clause's front and whole flow, then its first window, were one step of ~0.15 s,
    during which a live microphone session on the same worker waited (~0.3 s stalls)."""
    state = piper.open_session({})
    item = StageInput(type="say", seq=0, pts=0.0, meta={"utterance": 1, "text": "Hello there, my friend."})
    raw = list(piper.process(item, state))
    turns = [i for i, o in enumerate(raw) if o is None]
    assert turns and 0 not in turns  # never before the first audio
    for i in turns:  # each right before a clause's first chunk
        assert raw[i + 1] is not None and raw[i + 1].meta["text"]


@pytest.fixture(scope="module")
def piper():
    from giris.workers.tts_piper import PiperEngine

    return PiperEngine({}, EngineContext(stage="tts"))


def test_only_a_streams_start_gets_the_cushion_for_others_starting():
    """A stream already playing that stalled while others started froze 0.3 s longer: the
    cushion for streams starting together is for a stream's start, not a late frame's."""
    from types import SimpleNamespace

    from giris.supervisor.delivery import CROWD_DELAY_S, Delivery

    sent = []
    starting = SimpleNamespace(realtime=True, utterances={})
    me = SimpleNamespace(realtime=True, token="me", client=b"c", utterances={},
                         spec={"fps": 25, "playout_delay": 0.1})
    d = Delivery(SimpleNamespace(registry=[me, starting],
                                 gateway=SimpleNamespace(to=lambda c, m: sent.append(m))))

    def frame(seq: int, utt: int) -> P.Message:
        return P.Message(P.FRAME, session="me", seq=seq, meta={"utterance": utt})

    starting.utterances[1] = SimpleNamespace(said_at=time.monotonic())
    t = time.monotonic()
    d.send(me, frame(0, 1))  # a start beside another one starting: delay + cushion
    assert d.clock["me"][0] >= t + 0.1 + CROWD_DELAY_S - 1e-3
    d.clock["me"] = (time.monotonic() - 1.0, 0, time.monotonic() - 1.0, 1)  # frame 0 long shown
    t = time.monotonic()
    d.send(me, frame(3, 1))  # late mid-stream: the delay again, no cushion
    assert t + 0.1 - 1e-3 <= d.clock["me"][0] <= time.monotonic() + 0.1


def test_live_audio_arrives_ahead_of_its_frames(make_server):
    """Audio is a live player's clock: it leaves as it comes, not behind the paced frames
    before it (it came 1-38 ms before its own first frame, nothing in hand to buffer)."""
    from giris.runtime.client import AudioChunk

    srv = make_server()
    s = srv.client().open_session(realtime=True, playout_delay=0.2)
    audio, frames = [], []
    for item in s.say(" ".join(["word"] * 15)):  # ~3 s of speech in several chunks
        if isinstance(item, AudioChunk):
            audio.append((item.pts, time.monotonic()))
        elif isinstance(item, Frame):
            frames.append((item.pts, time.monotonic()))
            item.release()
    assert len(audio) >= 3 and frames
    for pts, at in audio:
        shown = [t for p, t in frames if p >= pts]
        if shown:  # the chunk is in hand by the playout delay before its first frame
            assert shown[0] - at > 0.1, (pts, shown[0] - at)
