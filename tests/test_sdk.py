"""The client SDK's own promises: leaving a stream early cancels it, several readers of a
session at once, closing wakes every waiter, a server that cannot be reached never hangs
the client, and live audio is taken as it is or refused (never silently converted)."""
from __future__ import annotations

import asyncio
import re
import threading
import time

import numpy as np
import pytest
import zmq

from giris.runtime.client import Client, Event, Frame
from giris.runtime.errors import BadInput, ServerGone, Timeout
from tests.conftest import collect, small_stages


def _first_frame_s(session, text: str) -> float:
    t0 = time.monotonic()
    for item in session.say(text, timeout=20):
        if isinstance(item, Frame):
            item.release()
            return time.monotonic() - t0
    raise AssertionError("no frame")


def _queued(session) -> int:
    """Messages kept for the session but not read: its backlog and the client's queue."""
    q = session.client._sessions.get(session.token)
    return sum(len(b) for b in session._backlog.values()) + (q.qsize() if q else 0)


def test_breaking_out_of_say_cancels_the_utterance_and_keeps_nothing(make_server):
    """An abandoned ``say`` used to run on, its hundreds of messages piling up in the
    session's backlog, and the next utterance waited behind it."""
    srv = make_server()
    s = srv.client().open_session()
    for item in s.say(" ".join(["SLOW"] * 100)):  # 5 s of work on the server
        if isinstance(item, Frame):
            item.release()
            break
    assert _first_frame_s(s, "next one") < 2.0
    time.sleep(0.5)  # what was still on the way is dropped as it comes
    assert _queued(s) == 0
    assert len(collect(s, "one two")["frames"]) == 10 and _queued(s) == 0
    # what the client remembers of streams it left is bounded (it grew until the session
    # closed), the oldest forgotten first
    from giris.runtime import client as sdk

    kept, sdk.ABANDONED_KEPT = sdk.ABANDONED_KEPT, 4
    try:
        for _ in range(6):
            for item in s.say("one two three four"):
                break
        late = s.say("five six")
        next(late)
        time.sleep(0.5)  # it ends on the server, its end waits in the session's queue
        late.close()  # and is dropped from there
        assert collect(s, "seven")["events"][-1].meta["complete"] and _queued(s) == 0
        assert len(s.client._abandoned[s.token]) == 4
    finally:
        sdk.ABANDONED_KEPT = kept


def test_a_say_never_read_is_cancelled_when_let_go(make_server):
    """``say`` sends the request at once (a bad one raises at the call); a generator that
    never started runs no ``finally``, so one never read used to speak on unseen."""
    import gc

    srv = make_server()
    s = srv.client().open_session()
    with pytest.raises(BadInput):
        s.say("   ")
    speech = s.say(" ".join(["SLOW"] * 100))  # 5 s of work on the server
    assert speech.utterance >= 1
    del speech
    gc.collect()
    assert _first_frame_s(s, "next one") < 2.0
    time.sleep(0.5)
    assert _queued(s) == 0


def test_breaking_out_of_zero_copy_streams_gives_their_slots_back(make_server):
    """Frames of an abandoned zero-copy stream held pool slots until the session stalled
    with pool_full."""
    srv = make_server({"stages": small_stages(render={"session_slots": 3, "block_timeout": 2.0})})
    s = srv.client().open_session(zero_copy=True)
    for _ in range(4):
        for item in s.say(" ".join(["word"] * 20)):
            if isinstance(item, Frame):
                item.release()
                break
    out = collect(s, "one two")
    assert len(out["frames"]) == 10 and out["events"][-1].meta["complete"]
    deadline = time.monotonic() + 5  # releases in flight on a loaded host (0.3 s was short once)
    while True:
        pools = srv.status()["pools"]
        if all(p["in_use"] == 0 for p in pools.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all(p["in_use"] == 0 for p in pools.values()), pools


def test_two_threads_stream_two_utterances_of_one_session(make_server):
    """Readers sharing a session's backlog without a lock lost each other's messages
    (and read them out of order): a reader then timed out."""
    srv = make_server()
    s = srv.client().open_session()
    for _ in range(3):
        texts = {s.start_say("a b c d"): 20, s.start_say("e f g"): 15}
        got: dict[int, list] = {}

        def read(utt: int) -> None:
            got[utt] = [i.index if isinstance(i, Frame) else i.kind
                        for i in s.stream(utt, timeout=5) if isinstance(i, (Frame, Event))]

        threads = [threading.Thread(target=read, args=(u,)) for u in texts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        for utt, n in texts.items():
            frames = got[utt][:-1]
            assert got[utt][-1] == "utterance_done", got[utt][-3:]
            assert len(frames) == n and frames == sorted(frames)
    assert _queued(s) == 0


def test_closing_the_async_client_wakes_its_streams_at_once(make_server):
    """Streams waiting in the loop's default executor held it (other awaits of the
    program stalled) and ``asyncio.run`` returned only when their 30 s waits ran out."""
    from giris.runtime.aio import AsyncClient

    srv = make_server({"stages": small_stages(tts={"options": {"word_s": 0.2, "slow_s": 20.0}})})

    async def run() -> tuple[float, list]:
        c = AsyncClient(srv.endpoint, timeout=30)
        s = await c.open_session()

        async def listen() -> None:
            async for _ in s.say("SLOW"):
                pass

        tasks = [asyncio.create_task(listen()) for _ in range(12)]
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, time.sleep, 0)
        other = time.monotonic() - t0
        await c.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        # and what is called after close says so too (it was asyncio's RuntimeError
        # "cannot schedule new futures after shutdown")
        for call in (lambda: s.start_say("late"), c.status, lambda: s.say("late").__anext__()):
            try:
                await call()
            except Exception as e:  # noqa: BLE001
                results.append(e)
        return other, results

    t0 = time.monotonic()
    other, results = asyncio.run(run())
    assert time.monotonic() - t0 < 5
    assert other < 1.0
    assert len(results) == 15
    assert all(isinstance(r, ServerGone) and "closed" in str(r) for r in results), results


def test_an_async_stream_cancelled_midway_cancels_its_utterance(make_server):
    from giris.runtime.aio import AsyncClient

    srv = make_server()

    async def run() -> tuple[float, int]:
        async with AsyncClient(srv.endpoint) as c:
            s = await c.open_session()
            got: list = []

            async def consume() -> None:
                async for item in s.say(" ".join(["SLOW"] * 100)):
                    got.append(item)

            task = asyncio.create_task(consume())
            while len(got) < 3:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            t0 = time.monotonic()
            utt = await s.start_say("one two")
            frames = [i.index async for i in s.stream(utt) if isinstance(i, Frame)]
            assert len(frames) == 10
            await asyncio.sleep(0.3)
            return time.monotonic() - t0, _queued(s.sync)

    took, left = asyncio.run(run())
    assert took < 3.0 and left == 0


@pytest.mark.parametrize("where", ["nothing listens", "key refused"])
def test_an_unreachable_server_fails_requests_and_closes_at_once(tmp_path, where):
    """A client whose CURVE key the server refuses had its I/O thread stuck for good in a
    blocking send: close() took 5 s and left the thread behind."""
    kw: dict = {}
    auth = router = None
    if where == "nothing listens":
        endpoint = f"ipc://{tmp_path}/nobody.sock"
    else:
        from zmq.auth.thread import ThreadAuthenticator

        ctx = zmq.Context.instance()
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(tmp_path))  # no key is allowed
        public, secret = zmq.curve_keypair()
        router = ctx.socket(zmq.ROUTER)
        router.linger = 0
        router.curve_server, router.curve_publickey, router.curve_secretkey = True, public, secret
        endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
        kw["server_key"] = public
    try:
        c = Client(endpoint, timeout=1, heartbeat=0.1, **kw)
        t0 = time.monotonic()
        with pytest.raises((ServerGone, Timeout)):
            c.open_session(timeout=1)
        assert time.monotonic() - t0 < 2
        time.sleep(0.5)  # heartbeats meanwhile
        t0 = time.monotonic()
        c.close()
        assert time.monotonic() - t0 < 1
        c._thread.join(1)
        assert not c._thread.is_alive()
        with pytest.raises(ServerGone):
            c.status()
    finally:
        if router is not None:
            router.close()
        if auth is not None:
            auth.stop()


def test_send_audio_refuses_what_it_would_mangle(make_server):
    """Float audio became silence, int32 wrapped, stereo was interleaved and a fractional
    rate truncated, all without a word."""
    srv = make_server()
    s = srv.client().open_session()
    tone = (8000 * np.sin(np.arange(1600) / 10)).astype(np.int16)
    for pcm in (tone.astype(np.float32) / 32768, tone.astype(np.int32),
                np.stack([tone, tone], axis=1), tone.tolist(), tone.astype(">i2")):
        with pytest.raises(BadInput, match="int16"):
            s.send_audio(pcm, 16000)
    for rate in (16000.5, "16000", 0, True):
        with pytest.raises(BadInput, match="sample_rate"):
            s.send_audio(tone, rate)
    utt = s.send_audio(tone, 16000)
    assert s.send_audio(tone, 16000.0, utterance=utt, final=True) == utt
    items = list(s.stream(utt, timeout=10))
    assert isinstance(items[-1], Event) and items[-1].kind == "utterance_done"
    assert any(isinstance(i, Frame) for i in items)


def test_coefficients_need_a_session_that_asks_for_them(make_server):
    """The server sends coefficients only to sessions that want them: on any other,
    ``coefficients()`` yielded nothing at all; now it says why."""
    srv = make_server()
    c = srv.client()
    with pytest.raises(BadInput, match="coeffs"):
        list(c.open_session().coefficients("one two"))
    rows = sum(b.values.shape[0] for b in c.open_session(want=["coeffs"]).coefficients("one two"))
    assert rows == 10


def test_clients_and_sessions_let_go_without_close_are_closed(make_server):
    """A Client dropped without close() was never collected (its I/O thread held it) and
    kept its sessions open and heartbeated for ever: a dozen such clients filled the
    server's 16 sessions. A Session dropped without close() stayed open as long as its
    client lived: eight were a client's whole allowance."""
    import gc
    import threading

    srv = make_server()
    threads = threading.active_count()
    kept = []
    for _ in range(12):
        c = Client(srv.endpoint, timeout=20.0)
        kept.append(c.open_session())  # each session kept by its own reference...
        del c
    del kept  # ...until both are let go
    gc.collect()
    deadline = time.monotonic() + 10
    while srv.status()["sessions"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert srv.status()["sessions"] == 0
    assert threading.active_count() <= threads + 1  # their I/O threads ended
    keeper = srv.client()
    for _ in range(12):  # more than the 8 a client may hold at once
        keeper.open_session()  # let go at once
    gc.collect()
    time.sleep(0.5)
    assert srv.status()["sessions"] == 0
    held = keeper.open_session()
    assert srv.status()["sessions"] == 1 and not held.closed


def test_a_request_given_up_early_says_how_long_it_waited(tmp_path):
    """Opening a session may wait 120 s, but a server silent for the client's own timeout
    is given up sooner: the error said "in 120 s" of a wait of 30. Waits that are not a
    positive number of seconds are refused (``status --timeout -1`` failed as if no
    server answered)."""
    c = Client(f"ipc://{tmp_path}/nobody.sock", timeout=1, heartbeat=0.2)
    try:
        t0 = time.monotonic()
        with pytest.raises((ServerGone, Timeout)) as e:
            c.open_session()  # its limit: 120 s
        took = time.monotonic() - t0
        assert took < 5 and "120" not in str(e.value), e.value
        said = float(re.search(r"in ([0-9.]+) s", str(e.value)).group(1))
        assert said <= took + 0.05 and took - said < 2.0, (said, took)  # not the 120 s limit
        for bad in (-1, 0, float("nan"), float("inf")):
            with pytest.raises(BadInput, match="timeout must be a number of seconds > 0"):
                c.status(timeout=bad)
            with pytest.raises(BadInput, match="timeout must be a number of seconds > 0"):
                c.open_session(timeout=bad)  # (0 and -1 were taken as "the default")
        assert not c._waiters  # refused before anything was sent: nothing waits for a reply
    finally:
        c.close()
    with pytest.raises(BadInput, match="timeout must be a number of seconds > 0"):
        Client("ipc:///nowhere.sock", timeout=-1)


def test_utterance_done_says_where_the_picture_ends_so_a_barge_in_stops_the_voice(make_server):
    """Audio is sent ahead of its frames: after a live say was cancelled (a user barging
    in) the client had its audio for seconds past the last frame it would get, and
    nothing said where to stop playing it (a kiosk's avatar went on speaking, still)."""
    from giris.runtime import AsyncClient, AudioChunk

    srv = make_server()
    s = srv.client().open_session(realtime=True)
    audio, frames, done = [], [], None
    for item in s.say(" ".join(["word"] * 40)):  # 8 s, made at once, paced to the clock
        if isinstance(item, AudioChunk):
            audio.append(item)
        elif isinstance(item, Frame):
            frames.append(item)
            if len(frames) == 5:
                assert s.cancel() != []
        elif isinstance(item, Event) and item.kind == "utterance_done":
            done = item
    assert done.meta["cancelled"] and done.end_pts == pytest.approx(frames[-1].pts + 1 / s.fps)
    heard = max(a.pts + len(a.pcm) / a.sample_rate for a in audio)
    assert heard > done.end_pts + 0.5  # what a player must not play (the voice leads by ~1 s)
    # a complete one ends with its last frame, which covers its audio; the next starts later
    out = collect(s, "one two")
    last = out["events"][-1]
    assert last.meta["complete"] and last.end_pts == pytest.approx((out["frames"][-1][0] + 1) / s.fps)
    assert out["audio"][0].pts >= heard and last.end_pts >= out["audio"][-1].pts + 0.2

    async def twin() -> Event:
        async with AsyncClient(srv.endpoint, timeout=20) as c:
            a = await c.open_session(want=["coeffs"])
            items = [item async for item in a.say("one two three")]
            blocks = [i for i in items if hasattr(i, "values")]
            rows = sum(len(b.values) for b in blocks)
            assert items[-1].end_pts == pytest.approx((blocks[0].first_frame + rows) / 25)
            return items[-1]
    assert asyncio.run(twin()).end_pts is not None


def test_a_session_closed_after_its_client_closes_quietly(make_server):
    """The client's close() closes its sessions; closing one after it raised ServerGone:
    a task's ``async with session`` left after the client's ``async with`` (asyncio.run
    cancelling what was still running at its end) printed "unhandled exception during
    asyncio.run() shutdown"."""
    from giris.runtime import AsyncClient

    srv = make_server()
    c = Client(srv.endpoint, timeout=20)
    s = c.open_session()
    c.close()
    s.close()
    s.close()

    async def service() -> None:
        async def handler(client: AsyncClient) -> None:
            async with await client.open_session() as session:
                await asyncio.sleep(30)  # still talking when the service ends
        async with AsyncClient(srv.endpoint, timeout=20) as client:
            task = asyncio.create_task(handler(client))
            await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):  # not ServerGone from its session's exit
            await task
    asyncio.run(service())
    assert srv.client().status()["sessions"] == 0
