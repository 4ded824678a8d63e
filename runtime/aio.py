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
import weakref
from typing import TYPE_CHECKING, Any, Callable, Generator, TypeVar

import numpy as np

from giris.runtime import protocol as P
from giris.runtime.client import Client, Coefficients, Frame, Item, Session, forwards_to
from giris.runtime.errors import GirisError, ServerGone, Timeout

if TYPE_CHECKING:
    from giris.runtime.idle import Idle

T = TypeVar("T")

#: threads for blocking waits, per client: each stream being read holds one while it waits
MAX_WAITERS = 256


class AsyncSession:
    """An open session: ``async for item in session.say(text)``; see :class:`Session`."""

    def __init__(self, session: Session, executor: concurrent.futures.Executor | None = None) -> None:
        self.sync = session
        self.token = session.token
        self.spec = session.spec
        #: per utterance, a read whose awaiting task gave up while it waited: the next reader
        #: of the utterance takes it over (guarded by the session's ``_cond``)
        self._orphans: dict[int, _Read] = {}
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            MAX_WAITERS, thread_name_prefix="giris-aio")

    async def _call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return await asyncio.wrap_future(_submit(self._executor, fn, *args, **kw))

    @forwards_to(Session.start_say)
    async def start_say(self, text: str, **kw: Any) -> int:
        """Start an utterance; returns its id (see :meth:`Session.start_say`). Cancelled
        while the request is on its way, the utterance it starts anyway is abandoned."""
        return await _call_undo(self._executor, self.sync._abandon, self.sync.start_say, text, **kw)

    @forwards_to(Session.say)
    def say(self, text: str, **kw: Any) -> "AsyncSpeech":
        """Stream ``text``'s items: ``async for item in session.say(text)``. As
        :meth:`Session.say`, the request is sent at once (``await session.say(text)`` waits
        for its answer: a refused one raises there, ``.utterance`` is its id), and leaving
        the loop early (``break``, an exception, a cancelled task), or letting it go unread,
        cancels the utterance, also while a variable still holds what this returns."""
        timeout = kw.pop("timeout", None)
        return AsyncSpeech(self, functools.partial(self.sync.start_say, text, **kw), timeout)

    @forwards_to(Session.coefficients)
    def coefficients(self, text: str, **kw: Any) -> "AsyncSpeech":
        """Only the coefficient stream (see :meth:`Session.coefficients`); frames that come
        with it are released."""
        self.sync._need_coeffs()
        timeout = kw.pop("timeout", None)
        return AsyncSpeech(self, functools.partial(self.sync.start_say, text, **kw), timeout,
                           only=Coefficients)

    def stream(self, utterance: int, timeout: float | None = None, *,
               cancel_on_exit: bool = False) -> "AsyncStream":
        """Items of ``utterance`` until its ``utterance_done`` (see :meth:`Session.stream`)."""
        return AsyncStream(self, utterance, timeout, cancel_on_exit)

    def idle(self, seconds: float | None = None, *, chunk_s: float = 0.2) -> "AsyncSpeech":
        """The avatar alive with nothing to say (see :meth:`Session.idle`): its items until
        ``seconds`` have played or a ``say`` on the session takes over from it; leaving
        the loop early ends it, as with ``say``, also while a variable still holds it."""
        return AsyncSpeech(self, functools.partial(self.sync.idle, seconds, chunk_s=chunk_s),
                           None, undo=_end_idle, id_of=_idle_id, stop=_stop_idle)

    async def send_audio(self, pcm: np.ndarray, sample_rate: int, *, utterance: int | None = None,
                         final: bool = False) -> int:
        """Live audio in (see :meth:`Session.send_audio`). Cancelled while a new utterance's
        first audio is on its way, that utterance is abandoned (nobody knows its id)."""
        undo = self.sync._abandon if utterance is None else _keep
        return await _call_undo(self._executor, undo, self.sync.send_audio, pcm, sample_rate,
                                utterance=utterance, final=final)

    @forwards_to(Session.cancel)
    async def cancel(self, utterance: int | None = None) -> list[int]:
        return await self._call(self.sync.cancel, utterance)

    @forwards_to(Session.close)
    async def close(self) -> None:
        if self.sync.closed or self.sync.client._closed.is_set():
            self.sync.close()  # nothing to wait for (the client's executor may be gone)
            return
        await self._call(self.sync.close)

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class _ClosedWhenDropped:
    """``close()`` (which never waits) also when the object is let go: a loop left while
    a variable still holds it, or an object nobody read, ends its utterance at once,
    without the event loop's async-generator finalizer."""

    def close(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown, a closed client
            pass


class AsyncStream(_ClosedWhenDropped):
    """What :meth:`AsyncSession.stream` returns: the items of one utterance, each read on an
    executor thread. An object, not an async generator: ``close()`` acts at once without
    the event loop (an async generator left early but still referenced ran its ``finally``
    only when collected, by a task the loop scheduled), so :class:`AsyncSpeech` can end
    its utterance the moment a loop lets go of it."""

    def __init__(self, session: AsyncSession, utterance: int, timeout: float | None,
                 cancel_on_exit: bool) -> None:
        self.session, self.utterance = session, utterance
        self._limit = session.sync.client._limit(timeout)
        self._cancel_on_exit = cancel_on_exit
        #: nothing more is read through this object (its utterance_done or an error came,
        #: or it was closed): nothing to cancel
        self._over = False

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> Item:
        s = self.session.sync
        while not self._over:
            read, adopted = self._read()
            try:
                msg = await asyncio.wrap_future(read.fut)
            except Timeout:
                if adopted:  # the read given up on timed out (from its own start): read afresh
                    continue
                self.close()
                raise
            except BaseException:  # a cancelled task, the client closed
                if self._cancel_on_exit:
                    self.close()  # also wakes the read still waiting for it
                self._give_up(read)
                raise
            try:
                item, self._over = s._advance(self.utterance, msg)
            except BaseException:  # an error event (it abandoned the utterance)
                self.close()
                raise
            if item is not None:
                return item
        raise StopAsyncIteration

    def _read(self) -> tuple["_Read", bool]:
        """The read of the utterance's next message: one a cancelled wait gave up on, taken
        over while it still has its message (true), or a new one."""
        s = self.session.sync
        orphans = self.session._orphans
        with s._cond:
            read = orphans.pop(self.utterance, None)
            if read is not None and read.state == "reading" and not read.fut.done():
                read.wanted = True
                return read, True
        read = _Read()
        read.fut = _submit(self.session._executor, _read_next, s, self.utterance, self._limit, read)
        return read, False

    def _give_up(self, read: "_Read") -> None:
        """The wait for ``read`` was cancelled (e.g. ``asyncio.wait_for``): the message it
        has or takes goes back to the front of the session's backlog, or to the next reader
        of the utterance, instead of into a future nobody awaits (a frame went missing, its
        zero-copy slot never given back, or the utterance_done, and the stream never ended).
        Of an abandoned utterance's, only a session-wide event (``stage_restarted``,
        ``session_closed``) is given back, for the session's other readers: all were dropped."""
        s = self.session.sync
        with s._cond:
            read.wanted = False
            if read.state == "handed":  # it came, but the task was cancelled before it woke
                _give_back(s, read.msg)
                read.state, read.msg = "back", None
            elif read.state == "reading" and not self._cancel_on_exit:
                self.session._orphans[self.utterance] = read

    def close(self) -> None:
        """Stop reading; with ``cancel_on_exit`` the utterance is cancelled and what is
        still to come of it dropped, without waiting for the server."""
        if not self._over and self._cancel_on_exit:
            self.session.sync._abandon(self.utterance)
        self._over = True


class _Read:
    """One ``Session._next`` on an executor thread, and who wants its message (guarded by
    the session's ``_cond``): ``state`` is "reading", "handed" (to the awaiting task) or
    "back" (given back to the backlog: the task gave up before it came)."""

    __slots__ = ("fut", "wanted", "state", "msg")

    def __init__(self) -> None:
        self.fut: concurrent.futures.Future | None = None
        self.wanted = True
        self.state = "reading"
        self.msg: P.Message | None = None


def _read_next(s: Session, utterance: int, limit: float, read: _Read) -> "P.Message | None":
    """``s._next``, and its message handed over or, if nobody waits for it any more, given
    back, in one hold of the session's lock (so no other reader comes between)."""
    msg = s._next(utterance, limit)
    with s._cond:
        if read.wanted:
            read.state, read.msg = "handed", msg
            return msg
        _give_back(s, msg)
        read.state = "back"
        return None


def _give_back(s: Session, msg: "P.Message | None") -> None:
    """Put ``msg`` back at the front of the session's backlog, where its reader looks first
    (under ``s._cond``); dropped if its utterance is abandoned meanwhile."""
    if msg is not None:
        s._sort(msg, front=True)
        s._cond.notify_all()  # (also when it was dropped: waiters look again)


class AsyncSpeech(_ClosedWhenDropped):
    """What :meth:`AsyncSession.say` returns: ``async for item in speech``, as the sync
    :class:`~giris.runtime.client.Speech`. Each ``async for`` gets an iterator of its own
    whose end (the loop left by ``break``, an exception or a cancelled task: the loop lets
    go of it) cancels the utterance at once, without waiting for the server or the event
    loop. An async generator kept in a variable was not closed by leaving its loop: the
    utterance ran on unread (zero-copy: its frames held the session's pool share and the
    next say failed ``pool_full``)."""

    def __init__(self, session: AsyncSession, start: Callable[[], Any], timeout: float | None,
                 only: type | None = None, undo: Callable[[Any], Any] | None = None,
                 id_of: Callable[[Any], int] = int, stop: Callable[[Any], Any] | None = None) -> None:
        self.session = session
        self.utterance: int | None = None  #: its id, once the server has answered
        #: what ``start`` returned (an idle stream's :class:`Idle`), once it has
        self.answer: Any = None
        self._undo = undo or session.sync._abandon  #: ends it, given what ``start`` returned
        self._id_of = id_of
        self._stop = stop  #: what else ends it, beside its stream (an idle stream's feeding)
        # sent now, as the sync say does (it was sent at the first item read: a bad request
        # raised only there, and until then there was no id to cancel or resume with)
        self._start = _submit(session._executor, start)
        self._start.add_done_callback(functools.partial(_answered, weakref.ref(self)))
        self._timeout = timeout
        self._only = only  #: yield only items of this type (frames among the rest released)
        self._items: AsyncStream | None = None
        self._closed = False

    def __await__(self) -> Generator[Any, None, "AsyncSpeech"]:
        """``speech = await session.say(text)``: once the server has accepted the request
        (a refusal raises here); then read it with ``async for``."""
        return self._answered().__await__()

    async def _answered(self) -> "AsyncSpeech":
        await self._stream()
        return self

    async def _stream(self) -> AsyncStream:
        if self._items is None:
            try:
                answer = await asyncio.wrap_future(self._start)
            except BaseException:
                self.close()  # cancelled on the way: the utterance it starts is abandoned
                raise
            self.answer, self.utterance = answer, self._id_of(answer)
            if self._items is None:  # (another task awaiting the answer may have made it)
                self._items = AsyncStream(self.session, self.utterance, self._timeout,
                                          cancel_on_exit=True)
        return self._items

    def __aiter__(self) -> "_SpeechLoop":
        return _SpeechLoop(self)

    async def __anext__(self) -> Item:
        """The next item; an error, or the awaiting task cancelled, ends the utterance."""
        if self._closed:
            raise StopAsyncIteration
        items = await self._stream()
        while True:
            item = await items.__anext__()
            if self._only is None or isinstance(item, self._only):
                return item
            if isinstance(item, Frame):
                item.release()

    def close(self) -> None:
        """Cancel the utterance unless it is over (now, or once the server answers the
        request), dropping what is still to come of it; never waits."""
        if self._closed:
            return
        self._closed = True
        if self._items is not None:
            self._items.close()
            if self._stop is not None:
                self._stop(self.answer)
        else:
            self._start.add_done_callback(functools.partial(_undo_late, self._undo))


def _answered(ref: "weakref.ref[AsyncSpeech]", fut: "concurrent.futures.Future[int]") -> None:
    """The say's answer came: its id on the speech, read or not (held weakly: a speech let
    go unread is collected, and its utterance cancelled, at once)."""
    speech = ref()
    if speech is not None and not fut.cancelled() and fut.exception() is None:
        answer = fut.result()
        speech.answer, speech.utterance = answer, speech._id_of(answer)


class _SpeechLoop(_ClosedWhenDropped):
    """One ``async for`` over an :class:`AsyncSpeech`: when the loop lets go of it (CPython
    frees it as the loop is left), the speech is closed."""

    def __init__(self, speech: AsyncSpeech) -> None:
        self._speech = speech

    def __aiter__(self) -> "_SpeechLoop":
        return self

    async def __anext__(self) -> Item:
        return await self._speech.__anext__()

    def close(self) -> None:
        self._speech.close()


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


def _idle_id(idle: "Idle") -> int:
    idle._started = True  # read here, not through the sync iterator
    return idle.utterance


def _stop_idle(idle: "Idle") -> None:
    idle._let_go()  # (not on the loop: no join)


def _end_idle(idle: "Idle") -> None:
    _stop_idle(idle)
    idle.session._abandon(idle.utterance)


def _keep(_: Any) -> None:
    """Nothing to undo (audio for an utterance the caller already knows)."""


class AsyncClient:
    """``async with AsyncClient(endpoint) as c: s = await c.open_session(...)``."""

    @forwards_to(Client.__init__)
    def __init__(self, endpoint: str, **kw: Any) -> None:
        self.sync = Client(endpoint, **kw)
        self._executor = concurrent.futures.ThreadPoolExecutor(MAX_WAITERS,
                                                               thread_name_prefix="giris-aio")

    async def _call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return await asyncio.wrap_future(_submit(self._executor, fn, *args, **kw))

    @forwards_to(Client.open_session)
    async def open_session(self, avatar: Any = None, **kw: Any) -> AsyncSession:
        """Open a session (the parameters: :meth:`Client.open_session`); one that opens
        after the awaiting task was cancelled is closed."""
        s = await _call_undo(self._executor, functools.partial(_close_later, self._executor),
                             self.sync.open_session, avatar, **kw)
        return AsyncSession(s, self._executor)

    @forwards_to(Client.status)
    async def status(self, **kw: Any) -> dict:
        return await self._call(self.sync.status, **kw)

    async def close(self) -> None:
        """Close the client: streams still waiting raise ServerGone at once."""
        await self._call(self.sync.close)
        self._executor.shutdown(wait=False)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
