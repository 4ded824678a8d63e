"""The asyncio twin of the client: the same sessions, awaitable and async-iterable.

It rides on the synchronous client's I/O thread (which already keeps the socket off the
caller's thread) and hands blocking waits to an executor of its own (the loop's default
one has few threads: many streams waiting in it would stall every other ``run_in_executor``
of the program), so an event loop never blocks on Giris. Closing the client wakes every
waiting stream at once (it raises ServerGone), so ``asyncio.run`` returns promptly.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from typing import Any, AsyncIterator, Callable, TypeVar

import numpy as np

from giris.runtime.client import Client, Coefficients, Frame, Item, Session
from giris.runtime.errors import GirisError, ServerGone

T = TypeVar("T")

#: threads for blocking waits, per client: each stream being read holds one while it waits
MAX_WAITERS = 256


class AsyncSession:
    """An open session: ``async for item in session.say(text)``; see :class:`Session`."""

    def __init__(self, session: Session, executor: concurrent.futures.Executor | None = None) -> None:
        self.sync = session
        self.token = session.token
        self.spec = session.spec
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            MAX_WAITERS, thread_name_prefix="giris-aio")

    async def _call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return await asyncio.wrap_future(_submit(self._executor, fn, *args, **kw))

    async def start_say(self, text: str, **kw: Any) -> int:
        """Start an utterance; returns its id (see :meth:`Session.start_say`). Cancelled
        while the request is on its way, the utterance it starts anyway is abandoned."""
        return await _call_undo(self._executor, self.sync._abandon, self.sync.start_say, text, **kw)

    async def say(self, text: str, **kw: Any) -> AsyncIterator[Item]:
        """Stream ``text``'s items; leaving early (``break``, a cancelled task) cancels the
        utterance, as with :meth:`Session.say`."""
        timeout = kw.pop("timeout", None)
        utt = await self.start_say(text, **kw)
        items = self.stream(utt, timeout=timeout, cancel_on_exit=True)
        try:
            async for item in items:
                yield item
        finally:
            await items.aclose()  # now, not when the loop gets round to collecting it

    async def coefficients(self, text: str, **kw: Any) -> AsyncIterator[Coefficients]:
        """Only the coefficient stream (see :meth:`Session.coefficients`)."""
        items = self.say(text, **kw)
        try:
            async for item in items:
                if isinstance(item, Coefficients):
                    yield item
                elif isinstance(item, Frame):
                    item.release()
        finally:
            await items.aclose()

    async def stream(self, utterance: int, timeout: float | None = None, *,
                     cancel_on_exit: bool = False) -> AsyncIterator[Item]:
        """Items of ``utterance`` until its ``utterance_done`` (see :meth:`Session.stream`)."""
        s = self.sync
        limit = timeout or s.client.timeout
        loop = asyncio.get_running_loop()
        done = False
        fut: concurrent.futures.Future | None = None
        try:
            while True:
                fut = _submit(self._executor, s._next, utterance, limit)
                msg = await asyncio.wrap_future(fut, loop=loop)
                fut = None
                item, done = s._advance(utterance, msg)
                if item is not None:
                    yield item
                if done:
                    return
        finally:
            if not done and cancel_on_exit:
                s._abandon(utterance)  # also wakes the read still waiting for it
                if fut is not None:  # a message it takes after all is nobody's: give it back
                    fut.add_done_callback(functools.partial(_drop_late, s))

    async def idle(self, seconds: float | None = None, *, chunk_s: float = 0.2) -> AsyncIterator[Item]:
        """The avatar alive with nothing to say (see :meth:`Session.idle`): its items until
        ``seconds`` have played or a ``say`` on the session takes over from it; leaving
        early ends it."""
        idle = await _call_undo(self._executor, functools.partial(_close_later, self._executor),
                                self.sync.idle, seconds, chunk_s=chunk_s)
        idle._started = True  # read here, not through the sync iterator
        items = self.stream(idle.utterance, cancel_on_exit=True)
        try:
            async for item in items:
                yield item
        finally:
            await self._call(idle._halt)  # stop feeding it (a thread join: not on the loop)
            await items.aclose()

    async def send_audio(self, pcm: np.ndarray, sample_rate: int, *, utterance: int | None = None,
                         final: bool = False) -> int:
        """Live audio in (see :meth:`Session.send_audio`). Cancelled while a new utterance's
        first audio is on its way, that utterance is abandoned (nobody knows its id)."""
        undo = self.sync._abandon if utterance is None else _keep
        return await _call_undo(self._executor, undo, self.sync.send_audio, pcm, sample_rate,
                                utterance=utterance, final=final)

    async def cancel(self, utterance: int | None = None) -> list[int]:
        return await self._call(self.sync.cancel, utterance)

    async def close(self) -> None:
        await self._call(self.sync.close)

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def _submit(executor: concurrent.futures.Executor, fn: Callable[..., T], *args: Any,
            **kw: Any) -> "concurrent.futures.Future[T]":
    """``executor.submit``, saying ServerGone once the client is closed (its executor shut
    down): a call after ``close()`` raised asyncio's RuntimeError "cannot schedule new
    futures after shutdown", not a GirisError as every other error is."""
    try:
        return executor.submit(fn, *args, **kw)
    except RuntimeError:
        raise ServerGone("client is closed") from None


async def _call_undo(executor: concurrent.futures.Executor, undo: Callable[[T], Any],
                     fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """``fn`` on an executor thread, and ``undo`` its result if the awaiting task is cancelled
    first: the thread cannot be stopped, so a ``say`` or an ``open_session`` it was sending
    went through anyway and its result was thrown away (an utterance nobody knew the id of
    ran on, its frames kept by the client: a zero-copy session's next say failed pool_full)."""
    fut = _submit(executor, fn, *args, **kw)
    try:
        return await asyncio.wrap_future(fut)
    except BaseException:
        fut.add_done_callback(functools.partial(_undo_late, undo))  # now if it is done already
        raise


def _undo_late(undo: Callable[[Any], Any], fut: concurrent.futures.Future) -> None:
    if not fut.cancelled() and fut.exception() is None:  # it ran, and nobody got its result
        try:
            undo(fut.result())
        except GirisError:  # a closed client or session: nothing left to undo
            pass


def _close_later(executor: concurrent.futures.Executor, obj: Any) -> None:
    """``obj.close()`` on an executor thread (it waits for the server or a thread); a closed
    client closed everything already."""
    try:
        _submit(executor, obj.close)
    except ServerGone:
        pass


def _keep(_: Any) -> None:
    """Nothing to undo (audio for an utterance the caller already knows)."""


def _drop_late(session: Session, fut: concurrent.futures.Future) -> None:
    if not fut.cancelled() and fut.exception() is None and fut.result() is not None:
        session.client._drop(fut.result())


class AsyncClient:
    """``async with AsyncClient(endpoint) as c: s = await c.open_session(...)``."""

    def __init__(self, endpoint: str, **kw: Any) -> None:
        self.sync = Client(endpoint, **kw)
        self._executor = concurrent.futures.ThreadPoolExecutor(MAX_WAITERS,
                                                               thread_name_prefix="giris-aio")

    async def _call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return await asyncio.wrap_future(_submit(self._executor, fn, *args, **kw))

    async def open_session(self, avatar: Any = None, **kw: Any) -> AsyncSession:
        """Open a session (see :meth:`Client.open_session`); one that opens after the awaiting
        task was cancelled is closed."""
        s = await _call_undo(self._executor, functools.partial(_close_later, self._executor),
                             self.sync.open_session, avatar, **kw)
        return AsyncSession(s, self._executor)

    async def status(self) -> dict:
        return await self._call(self.sync.status)

    async def close(self) -> None:
        """Close the client: streams still waiting raise ServerGone at once."""
        await self._call(self.sync.close)
        self._executor.shutdown(wait=False)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
