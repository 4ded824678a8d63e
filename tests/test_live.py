"""Live sessions under real use: cancels of paced streams, live audio against the rate limits,
clients that hold pool slots, and errors counted in the metrics. Small test engines."""
from __future__ import annotations

import re
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest

from giris.runtime import protocol as P
from giris.runtime.client import Frame
from giris.runtime.errors import GirisError
from tests.conftest import collect, small_stages


def _next(s, timeout: float):
    """The session's next raw message, or None after ``timeout``; zero-copy frames are
    given back at once (as a client that shows and drops them would)."""
    try:
        msg = s.client.next_message(s.token, timeout)
    except GirisError:
        return None
    if msg.type == P.FRAME:
        item = s._item(msg)
        if isinstance(item, Frame):
            item.release()
    return msg


def test_cancel_of_a_live_session_drops_what_waits_for_its_pacing_slot(make_server):
    """A live session's frames wait in the server for their time on the wall clock (and the
    renderer draws up to 1 s ahead). A cancel used to leave them queued: ~30 frames and audio
    chunks came after ``utterance_done(cancelled)``, where a client may stop reading, zero-copy
    slots stayed taken, and the next utterance's first frame waited ~1 s behind them."""
    srv = make_server()
    s = srv.client().open_session(realtime=True, zero_copy=True)
    utt = s.start_say(" ".join(["word"] * 40))  # 8 s of speech
    frames = 0
    while frames < 3:
        msg = _next(s, 10)
        assert msg is not None
        frames += msg.type == P.FRAME
    assert s.cancel(utt) == [utt]
    done, after = False, []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        msg = _next(s, 0.1)
        if msg is None:
            continue
        if msg.type == P.EVENT and msg.meta.get("kind") == "utterance_done":
            assert msg.meta["utterance"] == utt and msg.meta["cancelled"]
            done = True
        elif done and msg.meta.get("utterance") == utt:
            after.append(msg.type)
    assert done and after == []
    pools = srv.status()["pools"]
    assert pools and all(p["in_use"] == 0 for p in pools.values()), pools

    t0 = time.monotonic()
    first = end = None
    for item in s.say("one two"):  # 0.4 s of speech, 10 frames
        if isinstance(item, Frame):
            first = first or time.monotonic() - t0
            item.release()
    end = time.monotonic() - t0
    assert first is not None and first < 0.5, first
    assert end < 1.5, end  # paced from its own start, not as if the cut frames had been shown


def test_live_audio_in_10ms_chunks_with_a_say_between(make_server):
    """Live audio used to share the per-session request counter with ``say`` (at 5x its
    rate): 10 ms chunks (100 a second) were refused with ``rate_limited`` after a second,
    leaving the utterance open for good, and a ``say`` during 20 ms chunks failed. Audio has a
    budget of its own now, in seconds of audio."""
    srv = make_server()
    s = srv.client().open_session()
    sr, n = 48000, 480
    t = np.arange(3 * sr) / sr
    pcm = (8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)
    utt, said = None, None
    t0 = time.monotonic()
    for k, a in enumerate(range(0, len(pcm), n)):
        utt = s.send_audio(pcm[a:a + n], sr, utterance=utt, final=a + n >= len(pcm))
        if k == 150:
            said = s.start_say("one two")
        time.sleep(max(0.0, t0 + (a + n) / sr - time.monotonic()))
    assert said is not None
    live = list(s.stream(utt, timeout=15))
    assert live[-1].kind == "utterance_done" and live[-1].meta["complete"]
    assert sum(isinstance(i, Frame) for i in live) == 75  # 3 s at 25 fps
    spoken = list(s.stream(said, timeout=15))
    assert spoken[-1].kind == "utterance_done" and spoken[-1].meta["complete"]


def test_audio_in_refused_for_rate_ends_its_utterance(make_server):
    """Audio far faster than real time is refused with ``rate_limited``; the utterance it
    continued must not stay open (no ``utterance_done`` ever came): its stream gets the error
    and the utterance ends, not complete."""
    srv = make_server()
    s = srv.client().open_session()
    sr = 16000
    chunk = np.zeros(sr, np.int16)  # 1 s of audio a message, sent as fast as it goes
    utt = s.send_audio(chunk, sr)
    refused = None
    for _ in range(40):
        try:
            s.send_audio(chunk, sr, utterance=utt)
        except GirisError as e:
            refused = e
            break
    assert refused is not None and refused.code == "rate_limited"
    got = None
    try:
        for item in s.stream(utt, timeout=10):
            pass
    except GirisError as e:
        got = e
    assert got is not None and got.code == "rate_limited"
    # the session serves on; a new utterance is not charged for the refused audio
    time.sleep(1.0)
    out = collect(s, "one")
    assert out["events"][-1].meta["complete"]


def test_one_clients_held_frames_leave_pool_slots_to_other_clients(make_server):
    """Each session's cap (``session_slots``) did not bound a client: four zero-copy
    sessions of one client that never give frames back took every slot of the render pool,
    and another client's session failed with ``pool_full``. One client's sessions together
    hold at most half the pool now."""
    srv = make_server({"stages": small_stages(render={"pool_slots": 16, "session_slots": 4,
                                                      "block_timeout": 2.0})})
    hog = srv.client()
    kept: list = []
    streams = []
    for _ in range(4):
        s = hog.open_session(zero_copy=True)
        streams.append((s, s.start_say(" ".join(["word"] * 10))))

    def keep(s, utt):
        try:
            for item in s.stream(utt, timeout=10):
                if isinstance(item, Frame):
                    item._release = None  # never given back
                    kept.append(item)
        except GirisError:
            pass  # pool_full: its own sessions are held back

    readers = [threading.Thread(target=keep, args=st, daemon=True) for st in streams]
    for r in readers:
        r.start()
    assert_until = time.monotonic() + 5
    while time.monotonic() < assert_until and len(kept) < 8:
        time.sleep(0.05)
    time.sleep(0.3)
    assert len(kept) <= 8
    other = srv.client().open_session()
    out = collect(other, "five six")
    assert len(out["frames"]) == 10 and out["events"][-1].meta["complete"]
    for r in readers:
        r.join(15)


def test_stage_errors_at_open_are_counted(make_server):
    """Errors a stage raises while opening a session (``bad_image``, ``unknown_voice``) reach
    the client but were missing from ``giris_errors_total``."""
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    srv = make_server({"server": {"metrics_port": port}})
    c = srv.client()
    for kw, code in (({"avatar": b"not an image"}, "bad_image"), ({"voice": "nobody"}, "unknown_voice")):
        try:
            c.open_session(**kw)
            raise AssertionError("opened")
        except GirisError as e:
            assert e.code == code
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for code in ("bad_image", "unknown_voice"):
        m = re.search(rf'^giris_errors_total{{code="{code}"}} ([0-9.e+]+)$', text, re.M)
        assert m and float(m.group(1)) == 1, code


def test_audio_after_an_utterance_ended_its_input_is_refused(make_server):
    """Audio sent after ``final`` (or to a say's utterance) used to be taken: its sound came
    back, its frames were dropped (the utterance's frames were already counted to its end)."""
    import pytest

    from giris.runtime.errors import BadInput

    srv = make_server()
    s = srv.client().open_session()
    tone = (4000 * np.sin(np.arange(1600) * 0.2)).astype(np.int16)
    utt = s.send_audio(tone, 16000, final=True)
    with pytest.raises(BadInput, match="ended its audio"):
        s.send_audio(tone, 16000, utterance=utt)
    said = s.start_say("one")
    with pytest.raises(BadInput, match="ended its audio"):
        s.send_audio(tone, 16000, utterance=said)
    assert list(s.stream(utt, timeout=15))[-1].meta["complete"]
    assert list(s.stream(said, timeout=15))[-1].meta["complete"]


def test_idle_keeps_a_live_avatar_streaming_and_a_say_cuts_in_at_once(make_server):
    """Between utterances a live avatar got no frames (a player showed the last one
    frozen); ``idle()`` streams it at rest, paced, and speech cuts in without waiting
    behind the idle frames already made."""
    import gc

    from giris.runtime.errors import BadInput
    from giris.runtime.client import Event

    srv = make_server()
    s = srv.client().open_session(realtime=True, zero_copy=True)
    t0 = time.monotonic()
    stamps, done = [], None
    for item in s.idle(1.0):
        if isinstance(item, Frame):
            stamps.append(time.monotonic() - t0)
            item.release()
        elif isinstance(item, Event) and item.kind == "utterance_done":
            done = item
    assert len(stamps) == 25 and done.meta["complete"]
    assert stamps[-1] - stamps[0] > 0.8  # paced to the wall clock, not a burst
    idle = s.idle()  # until stopped
    for n, item in enumerate(idle):
        if isinstance(item, Frame):
            item.release()
        if n >= 30:
            break
    # leaving the loop ends it, though `idle` still holds it (its frames held the
    # session's pool share, and the next say failed with pool_full)
    assert idle.ended and eventually_free(srv)
    old = s.idle()
    idle = s.idle()  # a new one takes over from an old one, which ends
    assert [i.kind for i in old if isinstance(i, Event) or isinstance(i, Frame) and i.release()] \
        == ["utterance_done"]
    assert read_frames(idle, 5) == 5
    t1 = time.monotonic()
    first = None
    for item in s.say("one two"):
        if isinstance(item, Frame):
            first = first or time.monotonic() - t1
            item.release()
    assert first is not None and first < 1.0
    assert idle.ended and [i for i in idle if isinstance(i, Event)] == []  # its loop ends
    # stop() ends one gracefully; one let go without close() stops being fed
    idle = s.idle()
    seen = []
    for item in idle:
        seen.append(item)
        if isinstance(item, Frame):
            item.release()
            idle.stop()  # (once is enough; again is harmless)
    assert seen[-1].kind == "utterance_done" and seen[-1].meta["complete"]
    s.idle()
    gc.collect()
    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name == "giris-idle"]
    for bad in ({"seconds": 0}, {"seconds": "1"}, {"chunk_s": 5}):
        try:
            s.idle(**bad)
        except BadInput:
            continue
        raise AssertionError(f"idle({bad}) was taken")
    # an offline session's idle runs ahead of the clock: 10 s of frames in much less
    t0 = time.monotonic()
    frames = sum(1 for i in srv.client().open_session().idle(10.0) if isinstance(i, Frame) and not i.release())
    assert frames == 250 and time.monotonic() - t0 < 8
    # unbounded, within the server's audio budget (it sent 24 s at once: LimitExceeded)
    assert read_frames(srv.client().open_session().idle(), 400) == 400
    # a say the server refuses leaves a live idle stream playing (it ended silently)
    idle = s.idle()
    with pytest.raises(GirisError):
        s.say("x" * 5000)
    assert read_frames(idle, 40) == 40
    assert eventually_free(srv)
    # closed from another thread while one reads it: the reader's loop ends at once (it
    # raised "generator already executing" there, and the reader waited out its timeout)
    idle = s.idle()
    ended = threading.Event()

    def show() -> None:
        for item in idle:
            if isinstance(item, Frame):
                item.release()
        ended.set()

    threading.Thread(target=show, daemon=True).start()
    time.sleep(0.5)
    idle.close()
    assert ended.wait(2.0)
    # and a say kept in a variable is cancelled by leaving its loop, as one that is not
    said = s.say(" ".join(["word"] * 30))
    for item in said:
        if isinstance(item, Frame):
            item.release()
            break
    assert eventually_free(srv) and len(collect(s, "one two")["frames"]) == 10


def read_frames(stream, n: int) -> int:
    """Read up to ``n`` frames of ``stream`` (giving each back), then leave it."""
    got = 0
    for item in stream:
        if isinstance(item, Frame):
            item.release()
            got += 1
            if got == n:
                break
    return got


def eventually_free(srv, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(p["in_use"] == 0 for p in srv.status()["pools"].values()):
            return True
        time.sleep(0.1)
    return False


def test_async_idle_is_cut_by_a_say_on_its_session(make_server):
    import asyncio

    from giris.runtime.aio import AsyncClient

    srv = make_server()

    async def run() -> tuple[int, int, int]:
        async with AsyncClient(srv.endpoint) as c:
            s = await c.open_session(realtime=True)
            bounded = sum([isinstance(i, Frame) async for i in s.idle(0.4)])

            async def show() -> int:
                return sum([isinstance(i, Frame) async for i in s.idle()])

            shown = asyncio.create_task(show())
            await asyncio.sleep(0.8)
            said = sum([isinstance(i, Frame) async for i in s.say("one two")])
            return bounded, await asyncio.wait_for(shown, 5), said

    bounded, idle, said = asyncio.run(run())
    assert bounded == 10 and idle > 5 and said == 10


@pytest.mark.parametrize("want", [["audio", "frames"], ["audio", "coeffs", "frames"]])
def test_speech_takes_over_from_a_live_idle_stream_without_a_gap(make_server, want):
    """A say used to cut the idle stream at once: what of it was made was dropped, and
    nothing was shown until the speech's first frame (160-270 ms). Now the idle frames
    already made play on until the speech's first frame takes over, and the idle stream
    ends (``cancelled``) just before it; no idle frame comes after it."""
    from giris.runtime.client import AudioChunk, Event

    srv = make_server({"stages": small_stages(render_s=0.03)})  # frames come after coefficients
    s = srv.client().open_session(realtime=True, zero_copy=True, want=want)
    log: list[tuple[float, str, object]] = []
    idle = s.idle()
    said_at: list[float] = []

    def show() -> None:
        for item in idle:
            if isinstance(item, Frame):
                log.append((time.monotonic(), "idle", item.index))
                item.release()
            elif isinstance(item, Event) and item.kind == "utterance_done":
                log.append((time.monotonic(), "idle done", item.meta.get("cancelled")))

    reader = threading.Thread(target=show, daemon=True)
    reader.start()
    time.sleep(1.0)
    said_at.append(time.monotonic())
    after = None
    for item in s.say("one two"):
        if isinstance(item, Frame):
            log.append((time.monotonic(), "say", item.index))
            item.release()
        elif isinstance(item, AudioChunk) and item.final and after is None:
            after = s.idle(0.4)  # started during the speech: it follows it, not cut by it
    reader.join(5)
    for item in after:
        if isinstance(item, Frame):
            log.append((time.monotonic(), "after", item.index))
            item.release()
        elif isinstance(item, Event) and item.kind == "utterance_done":
            assert item.meta["complete"]
    assert len([e for e in log if e[1] == "after"]) == 10
    assert not reader.is_alive()
    done = [e for e in log if e[1] == "idle done"]
    assert done and done[0][2] is True
    first_say = next(i for i, e in enumerate(log) if e[1] == "say")
    idle_after_say_call = [e for e in log[:first_say] if e[1] == "idle" and e[0] > said_at[0]]
    assert idle_after_say_call, "the idle stream stopped at the say instead of playing on"
    assert not [e for e in log[first_say:] if e[1] == "idle"]
    # the idle frames bridge the switch: a frame period or so between the last of them and
    # the speech's first (with coefficients wanted, the speech's coefficients queued
    # behind the dropped idle frames held its first frame back: 320 ms)
    last_idle = max(e[0] for e in log[:first_say] if e[1] == "idle")
    assert log[first_say][0] - last_idle < 0.25
    indexes = [e[2] for e in log if e[1] in ("idle", "say", "after")]
    assert indexes == sorted(indexes)  # one picture timeline: never back in time
    assert eventually_free(srv)
