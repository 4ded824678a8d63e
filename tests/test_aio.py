"""The asyncio twin's own promises (``giris.runtime.aio``), each against a real server: a
task cancelled at any await leaves nothing running or held behind it."""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable

import numpy as np
import pytest

from giris.runtime.aio import AsyncClient
from giris.runtime import protocol as P
from giris.runtime.client import Event, Frame
from giris.runtime.errors import BadInput
from tests.conftest import small_stages

LONG = " ".join(["word"] * 20)  # 100 frames: more than a 3-slot zero-copy share holds
#: a zero-copy session may hold 3 frames: an utterance left running unread fills them, and
#: the next say fails pool_full after block_timeout
TIGHT = {"stages": small_stages(render={"session_slots": 3, "block_timeout": 2.0})}


def _queued(session) -> int:
    """Messages kept for the session but not read: its backlog and the client's queue."""
    q = session.client._sessions.get(session.token)
    return sum(len(b) for b in session._backlog.values()) + (q.qsize() if q else 0)


def _held(obj: Any, name: str) -> tuple[threading.Event, threading.Event, threading.Event]:
    """Make ``obj.name`` wait for a go-ahead once it is called: (entered, go, returned)."""
    real: Callable = getattr(obj, name)
    entered, go, returned = threading.Event(), threading.Event(), threading.Event()

    def held(*args: Any, **kw: Any) -> Any:
        entered.set()
        go.wait(10)
        try:
            return real(*args, **kw)
        finally:
            returned.set()

    setattr(obj, name, held)
    return entered, go, returned


async def _frames(speech) -> int:
    n = 0
    async for item in speech:
        if isinstance(item, Frame):
            n += 1
            item.release()
    return n


async def _settled(srv, session, timeout: float = 10.0) -> tuple[int, dict]:
    """(messages still kept, pool slots in use) once nothing is left over, or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        pools = {k: p["in_use"] for k, p in srv.status()["pools"].items()}
        left = _queued(session.sync)
        if (left == 0 and not any(pools.values())) or time.monotonic() > deadline:
            return left, pools
        await asyncio.sleep(0.1)


def test_a_task_cancelled_while_its_say_is_sent_leaves_nothing_running(make_server):
    """The executor thread's start_say finished after the task was cancelled and its id was
    thrown away: the utterance ran on, its frames held the session's zero-copy share and
    the next say failed pool_full; its items stayed in the client's backlog."""
    srv = make_server(TIGHT)

    async def run() -> tuple[int, int, dict]:
        async with AsyncClient(srv.endpoint, timeout=20) as c:
            s = await c.open_session(zero_copy=True)
            entered, go, _ = _held(s.sync, "start_say")
            task = asyncio.create_task(_frames(s.say(LONG, timeout=10)))
            assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
            task.cancel()  # e.g. the websocket that asked for it closed
            with pytest.raises(asyncio.CancelledError):
                await task
            go.set()  # the say goes out now, for nobody
            await asyncio.sleep(1.0)
            n = await _frames(s.say("one two", timeout=10))
            return (n, *await _settled(srv, s))

    n, left, pools = asyncio.run(run())
    assert n == 10
    assert left == 0 and not any(pools.values()), (left, pools)


@pytest.mark.parametrize("what", ["send_audio", "idle"])
def test_a_task_cancelled_while_a_live_utterance_starts_leaves_nothing_running(make_server, what):
    """The same for the first audio of a new live utterance (its id thrown away: it was
    never abandoned, its frames kept) and an idle stream (its feeder thread started)."""
    srv = make_server(TIGHT)

    async def run() -> tuple[int, dict]:
        async with AsyncClient(srv.endpoint, timeout=20) as c:
            s = await c.open_session(zero_copy=True)
            entered, go, returned = _held(s.sync, what)
            if what == "idle":
                task = asyncio.create_task(s.idle().__anext__())
            else:
                task = asyncio.create_task(s.send_audio(np.zeros(16000, np.int16), 16000))
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, entered.wait, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            go.set()
            assert await loop.run_in_executor(None, returned.wait, 10)
            await asyncio.sleep(1.0)  # an utterance left running has frames by now
            return await _settled(srv, s, timeout=5)

    left, pools = asyncio.run(run())
    assert left == 0 and not any(pools.values()), (left, pools)


def test_a_task_cancelled_while_its_session_opens_leaves_no_session_open(make_server):
    """The session that opens for nobody is closed explicitly. (Before, only the sync
    ``Session.__del__`` closed it, when CPython collected the thrown-away result: this
    passed then too.)"""
    srv = make_server()

    async def run() -> int:
        async with AsyncClient(srv.endpoint, timeout=20) as c:
            entered, go, opened = _held(c.sync, "open_session")
            task = asyncio.create_task(c.open_session())
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, entered.wait, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            go.set()  # it opens now, for nobody
            assert await loop.run_in_executor(None, opened.wait, 10)
            deadline = time.monotonic() + 10
            while (sessions := (await c.status())["sessions"]) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return sessions

    assert asyncio.run(run()) == 0


@pytest.mark.parametrize("what", ["say", "coefficients"])
def test_leaving_a_loop_over_a_kept_say_cancels_it(make_server, what):
    """``items = s.say(text); async for item in items: ... break``: the async generator,
    still referenced, was not closed, so its utterance ran on unread and the next say
    failed pool_full (the sync ``Speech.__iter__`` had fixed this for ``for``)."""
    srv = make_server(TIGHT)

    async def run() -> tuple[int, int, dict]:
        async with AsyncClient(srv.endpoint, timeout=20) as c:
            s = await c.open_session(zero_copy=True, want=["audio", "coeffs", "frames"])
            items = getattr(s, what)(LONG, timeout=10)
            async for item in items:
                if isinstance(item, Frame):
                    item.release()
                if what == "say" and isinstance(item, Frame) or what != "say":
                    break
            n = await _frames(s.say("one two", timeout=10))
            assert items is not None  # still held
            return (n, *await _settled(srv, s))

    n, left, pools = asyncio.run(run())
    assert n == 10
    assert left == 0 and not any(pools.values()), (left, pools)


def test_say_sends_its_request_at_once(make_server):
    """As the sync ``say``: the request goes at the call, so a refused one raises at
    ``await session.say(...)`` and ``.utterance`` is known without reading; one let go
    unread is cancelled. (It was sent at the first item read: a bad text raised only
    there, and there was no id to cancel or resume with.)"""
    srv = make_server(TIGHT)

    async def run() -> tuple[int, int, int, dict]:
        async with AsyncClient(srv.endpoint, timeout=20) as c:
            s = await c.open_session(zero_copy=True)
            with pytest.raises(BadInput):
                await s.say("   ")
            speech = s.say("one two", timeout=10)
            deadline = time.monotonic() + 10
            while speech.utterance is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # nothing read: the request went out by itself
            assert isinstance(speech.utterance, int)
            n = await _frames(speech)
            s.say(LONG)  # let go unread: cancelled, as a sync Speech
            await asyncio.sleep(0.5)
            again = await s.say("one two", timeout=10)
            assert isinstance(again.utterance, int)
            return (n, await _frames(again), *await _settled(srv, s))

    n, again, left, pools = asyncio.run(run())
    assert n == again == 10
    assert left == 0 and not any(pools.values()), (left, pools)


@pytest.mark.parametrize("poll_s", [0.05, 0.3])
def test_a_resumed_stream_loses_nothing_to_cancelled_waits(make_server, poll_s):
    """``wait_for(stream.__anext__(), t)`` timing out: the executor thread still waiting
    took the next message and handed it to a future nobody awaited. The resumed stream
    missed a frame (its zero-copy slot never given back) or the utterance_done, and
    never ended."""
    srv = make_server({"stages": small_stages(tts={"options": {"word_s": 0.2, "slow_s": 0.4}})})

    async def run() -> tuple[list, int, int, dict]:
        async with AsyncClient(srv.endpoint, timeout=20) as c:
            s = await c.open_session(zero_copy=True)
            utt = await s.start_say(" ".join(["SLOW"] * 6))  # 30 frames, a word each 0.4 s
            got: list = []
            timeouts = 0
            items = s.stream(utt)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    item = await asyncio.wait_for(items.__anext__(), poll_s)
                except asyncio.TimeoutError:
                    timeouts += 1
                    items = s.stream(utt)  # "a later stream(utterance) goes on where this one stopped"
                    continue
                if isinstance(item, Frame):
                    got.append(item.index)
                    item.release()
                elif getattr(item, "kind", None) == "utterance_done":
                    got.append("done")
                    break
            return (got, timeouts, *await _settled(srv, s))

    got, timeouts, left, pools = asyncio.run(run())
    assert timeouts >= 3  # the test tested something
    assert got == [*range(30), "done"], got
    assert left == 0 and not any(pools.values()), (left, pools)


def test_a_session_event_a_cancelled_say_took_is_left_to_the_sessions_readers(make_server):
    """A say's task cancelled just as its read took a session-wide event (no utterance:
    ``stage_restarted``, ``session_closed``): the late message was dropped as the cancelled
    utterance's, and no reader of the session ever saw it. (The event is injected as the
    I/O thread hands it over, so that exactly one comes; the loop is kept busy meanwhile so
    the task is cancelled before it wakes with it.)"""
    srv = make_server({"stages": small_stages(tts={"options": {"word_s": 0.2, "slow_s": 2.0}})})

    async def run() -> list[str]:
        async with AsyncClient(srv.endpoint, timeout=20) as c:
            s = await c.open_session()
            task = asyncio.create_task(_frames(s.say("SLOW")))
            deadline = time.monotonic() + 10
            while not s.sync._reading and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # its read waits for the next message
            c.sync._dispatch(P.event("stage_restarted", session=s.token, stage="render", restarts=1))
            while s.sync._reading and time.monotonic() < deadline:
                time.sleep(0.01)  # (blocking the loop) until the read has taken it
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return [i.kind async for i in s.say("one two", timeout=10) if isinstance(i, Event)]

    assert asyncio.run(run()) == ["stage_restarted", "utterance_done"]


def test_leaving_a_loop_over_a_kept_idle_stream_ends_it(make_server):
    """``idle()`` was an async generator too: left early while a variable held it, it was
    fed on and its frames piled up unread, holding the session's zero-copy share."""
    srv = make_server(TIGHT)

    async def run() -> tuple[int, dict, bool]:
        async with AsyncClient(srv.endpoint, timeout=20) as c:
            s = await c.open_session(zero_copy=True)
            idle = s.idle()
            async for item in idle:
                if isinstance(item, Frame):
                    item.release()
                    break
            await asyncio.sleep(1.0)  # an idle stream fed on would fill the share by now
            left, pools = await _settled(srv, s)
            feeder = getattr(getattr(idle, "answer", None), "_thread", None)
            return left, pools, feeder is None or not feeder.is_alive()

    left, pools, stopped = asyncio.run(run())
    assert left == 0 and not any(pools.values()), (left, pools)
    assert stopped
