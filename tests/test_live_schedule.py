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
from giris.workers.engine import Output
from giris.workers.stage import LIVE_LEAD_S, OFFLINE_WAIT_S, StageWorker, WorkerSession
from tests.conftest import small_stages

import numpy as np


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
    assert len(stamps) == 10 and gaps.min() > 0.03 and gaps.max() < 0.05 * 3  # then paced


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
    order = sorted([offline, long, new, short], key=StageWorker._urgency)
    assert order == [new, short, long, offline]
    assert StageWorker._urgency(short) == now + 0.12 + 0.2
    assert StageWorker._urgency(offline) == now + OFFLINE_WAIT_S
    # an offline session that has waited long enough goes before a live one well ahead
    assert StageWorker._urgency(_session(False, last_step=now - 1.5)) < StageWorker._urgency(long)


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
