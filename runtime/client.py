"""The client SDK: ``Client(endpoint).open_session(...)`` → ``Session`` → ``say(text)``.

One background I/O thread owns the DEALER socket: it sends requests, heartbeats while
sessions are open (so the server keeps them), and sorts what arrives into per-request
replies and per-session queues. The caller's thread never touches the socket, and every
wait is bounded: a silent server raises :class:`ServerGone`, never hangs.
"""
from __future__ import annotations

import collections
import inspect
import itertools
import numbers
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import zmq

from giris.runtime import protocol as P
from giris.runtime.errors import BadInput, GirisError, ServerGone, Timeout, from_wire
from giris.runtime.transport import PoolSet, recv, send

if TYPE_CHECKING:
    from giris.runtime.idle import Idle

_SENTINEL = object()  #: put in each session queue by Client.close(): wakes its readers
_WAKE = object()  #: wakes a session's reader to look again (an utterance was abandoned)
_CLOSED = object()  #: put in a session's queue by Session.close(): its reader raises at once


_F = TypeVar("_F", bound=Callable[..., Any])


def forwards_to(source: Callable[..., Any]) -> Callable[[_F], _F]:
    """Show a method that passes ``**kw`` on to ``source`` with ``source``'s parameters
    (``help()``, an IDE, ``inspect.signature``), keeping its own return type; without a
    docstring of its own it takes ``source``'s. ``Runtime.open_session(avatar, **kw)``
    said nothing of ``realtime``, ``want`` or ``size``."""
    def wrap(fn: _F) -> _F:
        sig = inspect.signature(source)
        fn.__signature__ = sig.replace(  # type: ignore[attr-defined]
            return_annotation=inspect.signature(fn).return_annotation)
        fn.__doc__ = fn.__doc__ or source.__doc__
        return fn
    return wrap


# ---------------------------------------------------------------------- stream items
@dataclass
class AudioChunk:
    """A piece of the voice: ``pcm`` (mono ``int16``, ``(n,)``) at ``sample_rate`` Hz (the
    voice's: 22050 for the bundled one; every chunk carries it, so a player needs no
    other source). ``start_sample`` counts samples from the session's start (one clock
    per session: a second ``say`` goes on where the first ended) and ``pts`` is the
    same instant in seconds, ``start_sample / sample_rate``: a frame with that ``pts``
    is shown as the chunk's first sample plays. ``final``: the utterance's last chunk.
    ``text``: the clause the chunk begins (empty on a clause's later chunks);
    ``phonemes``: ``[ipa, start, n]`` for those that start in the chunk, ``start`` and
    ``n`` in samples, ``start`` from the chunk's first (None for live audio and voices
    without them)."""

    pcm: np.ndarray  # int16 (n,)
    sample_rate: int
    start_sample: int
    pts: float
    seq: int
    utterance: int
    final: bool
    text: str = ""
    phonemes: list | None = None
    #: for a traced request (``say(..., trace=True)``), on the first chunk: ``[where,
    #: seconds]`` stamps of each process on the way (the server host's monotonic clock)
    trace: list | None = None


@dataclass
class Coefficients:
    """A block of animation for a rig of one's own: ``values`` is ``float32`` ``(n, 73)``,
    row ``k`` being frame ``first_frame + k`` (counted from the session's start, as
    :attr:`Frame.index`), shown at ``(first_frame + k) / fps`` seconds; ``pts`` is the
    first row's. ``names`` are the 73 channels' names in column order
    (``giris.workers.coefficients.CHANNELS``; ``INDEX`` there maps a name to its column).
    ``final``: the utterance's last block."""

    values: np.ndarray  # float32 (n, 73): see giris.workers.coefficients.CHANNELS
    first_frame: int
    fps: float
    pts: float
    utterance: int
    final: bool
    trace: list | None = None  # as AudioChunk.trace

    @property
    def names(self) -> tuple[str, ...]:
        from giris.workers.coefficients import CHANNELS

        return CHANNELS


@dataclass
class Frame:
    """A video frame: ``image`` is ``uint8`` RGB ``(H, W, 3)``; ``index`` counts frames from
    the session's start (one clock per session) and ``pts = index / fps`` seconds, on the
    same clock as :attr:`AudioChunk.pts`: a player aligns the two by ``pts``, not by
    arrival. ``final``: the utterance's last frame. In a ``zero_copy`` session ``image`` is
    a view into the server's pool: :meth:`release` it (or let the Frame go) when done."""

    image: np.ndarray  # uint8 (H, W, 3) RGB
    index: int
    pts: float
    utterance: int
    final: bool
    _release: Any = field(default=None, repr=False)
    trace: list | None = None  # as AudioChunk.trace

    def release(self) -> None:
        """Zero-copy frames: give the slot back (also done when the Frame is collected)."""
        r, self._release = self._release, None
        if r is not None:
            r()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


@dataclass
class Event:
    """Something that is not media: ``kind`` is ``utterance_done`` (a stream's last item;
    ``meta``: ``utterance``, ``frames`` sent, ``complete``, and when so ``cancelled``,
    ``lost`` or ``error``: its code), ``stage_restarted`` and the like; ``meta`` is the
    server's message as it came (see the README's wire format).

    ``end_pts``, on ``utterance_done``: where the utterance's picture ends on the session
    clock, in seconds (after the last frame, or coefficient row, the client got of it;
    None if it got none). Audio is sent ahead of its frames, so after a ``cancel`` (a
    barge-in) chunks reaching past it may have come: a player stops the utterance's
    audio at ``end_pts``, or the avatar goes on speaking, still, over the gap the
    cancelled rest leaves on the clock (the next utterance starts after it)."""

    kind: str
    meta: dict
    end_pts: float | None = None


Item = AudioChunk | Coefficients | Frame | Event


# ---------------------------------------------------------------------- the client
_CLIENT_IDS = itertools.count(1)


class Client:
    """A connection to a Giris server (``ipc://``, ``tcp://`` with CURVE, or ``inproc://``)."""

    def __init__(self, endpoint: str, *, server_key: bytes | str | None = None,
                 client_keys: tuple[bytes, bytes] | str | os.PathLike | None = None,
                 context: zmq.Context | None = None, timeout: float = 30.0,
                 heartbeat: float = 2.0) -> None:
        self.endpoint = endpoint
        self.timeout = _seconds(timeout, "timeout")
        self.heartbeat = _seconds(heartbeat, "heartbeat")
        self._ctx = context or zmq.Context.instance()
        self._reqs = itertools.count(1)
        self._waiters: dict[int, list] = {}
        #: SimpleQueue (as the outbox): put from a ``__del__`` during a collection on a
        #: thread inside a put of its own must not wait on a lock that thread holds
        self._sessions: dict[str, "queue.SimpleQueue[Any]"] = {}
        #: per session, utterances nobody reads any more: their messages are dropped on arrival
        #: per session, the utterances nobody reads any more (insertion order: the oldest
        #: are forgotten past ABANDONED_KEPT)
        self._abandoned: dict[str, dict[int, None]] = {}
        #: sessions the server said it closed (shutdown, idle, ...) -> why: their requests
        #: fail at once (after a server's shutdown a say waited out its timeout)
        self._ended: dict[str, str] = {}
        #: requests sent without waiting (an abandoned stream's cancel): replies dropped
        self._unwaited: set[int] = set()
        #: requests whose caller gave up waiting (timed out) -> (type, session, fresh): a
        #: late reply still ran on the server, so what it started is undone (see _late_reply);
        #: the oldest are forgotten past LATE_KEPT
        self._late: dict[int, tuple[str, str, bool]] = {}
        self._late_lock = threading.Lock()  #: guards _late's trimming (never held across calls)
        #: per session, the newest utterance id a reply gave (see _dispatch: an error for
        #: the whole session concerns only utterances up to it)
        self._newest: dict[str, int] = {}
        #: the I/O thread stopped reading the socket (a session's queue is full, see
        #: _hold_back); readers that wait on an empty queue (``_hungry``) resume it
        self._held = False
        self._hungry = 0
        self._hungry_lock = threading.Lock()  #: never held across calls
        self._outbox: "queue.SimpleQueue[tuple[int | None, list]]" = queue.SimpleQueue()
        self._closed = threading.Event()
        #: when the I/O thread sent the first request or heartbeat the server has not
        #: answered (None: all answered): how long a live server has been silent
        self._unanswered_since: float | None = None
        #: the last request found the server silent: closing need not wait long for it
        self._gone = False
        self.pools = PoolSet()
        self._keys = _curve_keys(server_key, client_keys)
        if self._keys and not endpoint.startswith("tcp://"):
            # a server uses CURVE on tcp only: keys elsewhere met no answer ("server_gone")
            raise GirisError(f"CURVE keys are for a tcp:// server, not {endpoint} (an ipc socket "
                             "is guarded by its file's permissions)", code="bad_key")
        # a number of its own: id(self) comes back for the next client as soon as one is
        # collected, while the I/O thread may not have let its address go yet ("Address
        # already in use" from the constructor, 290 of 300 clients made in a row)
        name = f"inproc://giris-client-{os.getpid()}-{next(_CLIENT_IDS)}"
        self._wake_addr = name
        self._wake_recv = self._ctx.socket(zmq.PULL)
        self._wake_recv.bind(name)
        wake = self._ctx.socket(zmq.PUSH)
        wake.setsockopt(zmq.LINGER, 0)
        wake.connect(name)
        self._waker = _Waker(wake)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        # The I/O thread holds the client weakly: a client let go without close() is
        # collected, and its finalizer closes its sessions (they stayed open on the server,
        # heartbeated for ever: a dozen such clients filled the server's 16 sessions)
        self._thread = threading.Thread(target=_io_loop, args=(weakref.ref(self),),
                                        name="giris-client-io", daemon=True)
        self._finalizer = weakref.finalize(self, _let_go, self._sessions, self._outbox, self._closed,
                                           self._waker)
        self._finalizer.atexit = False
        self._thread.start()
        self._ready.wait(10)
        if self._error:
            raise self._error

    # ------------------------------------------------------------------ public
    def open_session(self, avatar: str | bytes | os.PathLike | None = None, *,
                     voice: str | None = None, emotion: str | None = None,
                     intensity: float | None = None, fps: float | None = None,
                     size: int | None = None, rate: float | None = None, realtime: bool = False,
                     zero_copy: bool = False, want: Sequence[str] = ("audio", "frames"),
                     seed: int | None = None, playout_delay: float | None = None,
                     timeout: float | None = None) -> "Session":
        """Open a session (``None`` for a parameter: the server's default).

        ``avatar``: image bytes, an image path, or a bundled avatar name (``"astronaut"``).
        ``voice``, ``emotion`` (neutral happy sad surprised angry), ``intensity`` (0..1),
        ``rate`` (speech speed, 0.25..4): the defaults of every ``say``. ``fps``, ``size``
        (the frame's side in pixels, even). ``realtime``: frames paced to the wall clock
        for live playback (default: as fast as they are made). ``zero_copy`` (same host):
        frames are views into the server's pool, see :meth:`Frame.release`. ``want``:
        the streams sent, of ``"audio"``, ``"frames"``, ``"coeffs"`` (``["coeffs"]``
        alone renders nothing). ``seed``: the motion's. ``playout_delay``: for
        ``realtime`` sessions, seconds the stream starts behind its first frame so late
        frames still leave on time (server default 0.12). ``timeout``: the wait for the
        server's answer (default the client's). Usable as a context manager."""
        spec: dict[str, Any] = {"voice": voice, "emotion": emotion, "intensity": intensity,
                                "fps": fps, "size": size, "rate": rate, "realtime": realtime,
                                "zero_copy": zero_copy, "want": list(want), "seed": seed,
                                "playout_delay": playout_delay}
        msg = P.Message(P.OPEN_SESSION, meta={"spec": {k: v for k, v in spec.items() if v is not None}})
        if isinstance(avatar, (bytes, bytearray, memoryview)):
            msg.add_inline(np.frombuffer(bytes(avatar), np.uint8))
        elif avatar is not None and (isinstance(avatar, os.PathLike) or os.path.sep in str(avatar)
                                     or Path(str(avatar)).suffix):
            msg.add_inline(np.frombuffer(_read_avatar(avatar), np.uint8))
        elif avatar is not None:
            msg.meta["spec"]["avatar_name"] = str(avatar)
        reply = self.request(msg, timeout=max(self.timeout, 120.0) if timeout is None else timeout)
        token = reply.session
        self._sessions.setdefault(token, queue.SimpleQueue())
        return Session(self, token, reply.meta.get("spec", {}))

    def status(self, timeout: float | None = None) -> dict:
        """The server's state as ``giris status --json`` prints it: ``state`` (``serving``
        once new sessions open; ``starting`` or ``recovering``: they get
        ``stage_unavailable``, retry shortly), ``workers``, ``sessions``, budgets, pools."""
        return self.request(P.Message(P.STATUS), timeout=timeout).meta["status"]

    def close(self) -> None:
        """Close the sessions still open (without waiting for the answers: the server frees
        them at once instead of at its idle timeout) and the connection. Readers still
        waiting on a stream or a reply are woken at once and raise ServerGone ("client is
        closed") instead of sitting out their timeouts."""
        if self._closed.is_set():
            return
        self._finalizer()  # its sessions' close_session queued, closed, the I/O thread woken
        for q in list(self._sessions.values()):
            q.put(_SENTINEL)
        self._sessions.clear()
        for waiter in list(self._waiters.values()):
            waiter[0].set()  # no reply in it: request() says the client is closed
        self._poke()
        self._thread.join(5)
        self.pools.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing
    def request(self, msg: P.Message, timeout: float | None = None) -> P.Message:
        """Send and wait for the reply; an error event raises the typed exception."""
        if self._closed.is_set():
            raise ServerGone("client is closed")
        if msg.session in self._ended:
            raise GirisError(f"session closed by the server ({self._ended[msg.session]})",
                             code="session_closed")
        # judged before anything is sent: a bad timeout raised after the post left its
        # request to run on the server unseen (a session opened and never known)
        limit = self._limit(timeout)
        req = next(self._reqs)
        msg.meta["req"] = req
        waiter: list = [threading.Event(), None, False]  # done, the reply, sent
        self._waiters[req] = waiter
        try:
            self.post(msg)
        except BadInput:
            self._waiters.pop(req, None)
            raise
        sent = time.monotonic()
        # a long request (opening a session may take minutes) still gives up on a server
        # that says nothing, not even to heartbeats, for the client's own timeout: one that
        # was never there made open_session wait 120 s whatever the timeout
        quiet = max(self.timeout, 3 * self.heartbeat)
        while not waiter[0].wait(min(max(0.0, sent + limit - time.monotonic()), 0.5)):
            now = time.monotonic()
            # a request that could not leave (no connection) is unanswered since it was made
            silent = max(self._silent_for(now), 0.0 if waiter[2] else now - sent)
            if now - sent < limit and not (limit > quiet and silent > quiet):
                continue
            if not self._give_up(req, msg):
                waiter[0].wait(5)  # the reply came as it gave up: take it
                break
            waited = now - sent  # (it said the limit, 120 s, of a wait given up at 30)
            if not waiter[2] or self._is_silent(now, limit):
                self._gone = True
                why = "nothing took the request" if not waiter[2] else f"silent for {silent:.1f} s"
                raise ServerGone(f"no answer from {self.endpoint} in {waited:.1f} s ({why})")
            raise Timeout(f"{msg.type} got no reply in {waited:.1f} s")
        reply: P.Message | None = waiter[1]
        if reply is None:  # woken by close()
            self._waiters.pop(req, None)
            raise ServerGone("client is closed")
        if reply.type == P.EVENT and reply.meta.get("kind") == "error":
            raise from_wire(reply.meta)
        return reply

    def _limit(self, timeout: float | None) -> float:
        """A wait: ``timeout`` (checked: seconds > 0), or the client's own when None."""
        return self.timeout if timeout is None else _seconds(timeout, "timeout")

    def _give_up(self, req: int, msg: P.Message) -> bool:
        """Stop waiting for ``req``'s reply: remembered first, so a reply that comes later
        is undone (:meth:`_late_reply`) rather than lost; False when the reply was handed
        to the waiter meanwhile (the caller takes it)."""
        fresh = msg.type == P.SAY or (msg.type == P.AUDIO_IN and msg.meta.get("utterance") is None)
        with self._late_lock:
            self._late[req] = (msg.type, msg.session, fresh)
            _trim(self._late, LATE_KEPT)
        if self._waiters.pop(req, None) is None:  # the I/O thread took it: the reply is in
            self._late.pop(req, None)
            return False
        return True

    def _late_reply(self, kind: str, token: str, fresh: bool, msg: P.Message) -> None:
        """The reply of a request whose caller timed out: what it started runs on the
        server with nobody to read or end it, so it is undone without waiting. A session
        opened late is closed (it counted against the client's sessions, heartbeated for
        ever); a new utterance is cancelled and its messages dropped as they come (its
        frames held a zero-copy session's pool share, and the next say failed
        ``pool_full``)."""
        if msg.type != P.REPLY or self._closed.is_set():
            return  # an error: nothing was started
        try:
            if kind == P.OPEN_SESSION and msg.session:
                self.post_unwaited(P.Message(P.CLOSE_SESSION, session=msg.session))
            elif fresh and isinstance(msg.meta.get("utterance"), int) and token in self._sessions:
                utt = int(msg.meta["utterance"])  # (a forgotten session's messages are dropped)
                self._mark_abandoned(token, utt)
                if token not in self._ended:
                    self.post_unwaited(P.Message(P.CANCEL, session=token, meta={"utterance": utt}))
        except GirisError:
            pass

    def _mark_abandoned(self, token: str, utterance: int) -> bool:
        """Remember that nobody reads ``utterance`` of the session (its messages are
        dropped on arrival); False if it was already. Bounded, not forgotten at the
        utterance's end: a frame of it may still sit in the session's queue behind a
        reader when its end is dropped by the I/O thread, and a forgotten id let that
        frame into the backlog, its pool slot never given back (a zero-copy test found
        1-2 slots held, once in ~15 runs)."""
        gone = self._abandoned.setdefault(token, {})
        if utterance in gone:
            return False
        gone[utterance] = None
        _trim(gone, ABANDONED_KEPT)
        return True

    def post(self, msg: P.Message) -> None:
        """Queue ``msg`` for the I/O thread; never blocks."""
        try:
            frames = [bytes(f) if not isinstance(f, bytes) else f for f in P.encode(msg)]
        except (TypeError, ValueError, OverflowError) as e:  # msgpack: a value it cannot carry
            raise BadInput(f"{msg.type}: a value cannot be sent ({e})") from None
        self._outbox.put((msg.meta.get("req"), frames))
        self._poke()

    def post_unwaited(self, msg: P.Message) -> None:
        """Send a request whose reply nobody waits for (it is dropped when it comes): for
        best-effort requests that must not block, e.g. on a dead server."""
        req = next(self._reqs)
        msg.meta["req"] = req
        self._unwaited.add(req)
        self.post(msg)

    def _poke(self) -> None:
        self._waker.poke()

    def next_message(self, token: str, timeout: float) -> P.Message:
        """The session's next message, whatever its utterance (Session sorts them)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self._take(token, max(0.0, deadline - time.monotonic()))
            if msg is None:
                raise self._silence(timeout)
            if msg is not _WAKE:
                return msg

    def _take(self, token: str, timeout: float) -> Any:
        """One message, ``_WAKE``, or None when nothing came in ``timeout``."""
        q = self._sessions.get(token)
        if q is None:
            if self._closed.is_set():
                raise ServerGone("client is closed")
            raise GirisError("session is closed", code="unknown_session")
        try:
            msg = q.get_nowait()
        except queue.Empty:
            with self._hungry_lock:
                self._hungry += 1
            try:
                if self._held:
                    self._poke()  # this reader waits: reading goes on (see _hold_back)
                msg = q.get(timeout=timeout)
            except queue.Empty:
                return None
            finally:
                with self._hungry_lock:
                    self._hungry -= 1
        else:
            if self._held and q.qsize() < SESSION_QUEUE // 2:
                self._poke()  # room again
        if msg is _SENTINEL:
            raise ServerGone("client is closed")
        if msg is _CLOSED:
            q.put(msg)  # for the next reader too
            raise _session_closed()
        return msg

    def _silence(self, timeout: float) -> GirisError:
        if self._closed.is_set():
            return ServerGone("client is closed")
        if self._is_silent(time.monotonic(), timeout):
            return ServerGone(f"server silent for {timeout:g} s")
        return Timeout(f"nothing arrived in {timeout:g} s")

    def _full(self, token: str) -> bool:
        q = self._sessions.get(token)
        return q is not None and _crowded(q)

    def _hold_back(self) -> bool:
        """Whether the I/O thread stops reading the socket: a session's queue holds
        ``SESSION_QUEUE`` messages (its reader is behind), no request waits for its
        reply and no reader waits on an empty queue. Then what comes waits in ZeroMQ
        (``RECV_HWM``) and in the server's outbox, which holds the session back: a slow
        reader of an offline stream had the whole utterance buffered here (546 frames,
        ~102 MiB at 256²). A reply or another session's messages may lie behind the
        held ones on the one socket, so anyone waiting for something resumes reading
        (that session's queue then grows past its bound, as before)."""
        return self._may_hold() and any(map(_crowded, list(self._sessions.values())))

    def _may_hold(self) -> bool:
        """Nobody waits for something that may lie behind held messages (see ``_hold_back``)."""
        return not (self._waiters or self._hungry or self._closed.is_set())

    def _silent_for(self, now: float) -> float:
        """Seconds the server has left what the client sent (a request, a heartbeat)
        unanswered: 0 when it answered everything."""
        since = self._unanswered_since
        return 0.0 if since is None else max(0.0, now - since)

    def _is_silent(self, now: float, limit: float) -> bool:
        """Whether the server counts as gone after a wait of ``limit``: it left what was
        sent unanswered for that long (at most ``max(timeout, 3 heartbeats)``) and for
        three heartbeats at least. A wait shorter than the heartbeat interval on a server slow to
        answer (a stalled host, a long open) is a Timeout, not ServerGone: measured from
        the last message heard, every request shorter than a heartbeat said ServerGone."""
        silent = self._silent_for(now)
        return silent > min(limit, max(self.timeout, 3 * self.heartbeat)) and silent >= 3 * self.heartbeat

    def _dispatch(self, msg: P.Message) -> None:
        self._unanswered_since = None
        self._gone = False
        req = msg.meta.get("req") if msg.type in (P.REPLY, P.EVENT, P.HEARTBEAT) else None
        if msg.type == P.REPLY and msg.session and type(msg.meta.get("utterance")) is int:
            self._newest[msg.session] = max(self._newest.get(msg.session, 0), msg.meta["utterance"])
        if req is not None and req in self._waiters:
            waiter = self._waiters.pop(req, None)
            if waiter is not None:
                waiter[1] = msg
                waiter[0].set()
                return
        if req is not None and req in self._late:  # its caller gave up: undo what it started
            late = self._late.pop(req, None)
            if late is not None:
                self._late_reply(*late, msg)
            return
        if req is not None and req in self._unwaited:
            self._unwaited.discard(req)
            return
        if msg.type == P.HEARTBEAT:
            return
        if msg.type == P.EVENT and msg.meta.get("kind") == "session_closed" and msg.session:
            self._ended[msg.session] = str(msg.meta.get("reason") or "closed")
            _trim(self._ended, ENDED_KEPT)  # kept past the session's end: bounded
        if msg.type == P.EVENT and msg.meta.get("kind") == "error" and msg.meta.get("utterance") is None:
            # an error for the whole session concerns the utterances it had then, not
            # those started after it (a stale stage_failed was raised into a healthy say)
            msg.upto = self._newest.get(msg.session, 0)  # type: ignore[attr-defined]
        if self._is_abandoned(msg.session, _utterance_of(msg)):  # nobody reads it: drop it now
            self._drop(msg)
            return
        q = self._sessions.get(msg.session)
        if q is not None:
            q.put(msg)
        elif msg.tensors:  # a stray zero-copy frame of a closed session: give it back
            self._release_refs(msg.session, msg.tensors)

    def _is_abandoned(self, token: str, utterance: int | None) -> bool:
        """Whether nobody reads ``utterance`` of the session any more (its messages go)."""
        return utterance is not None and utterance in self._abandoned.get(token, ())

    def _drop(self, msg: P.Message) -> None:
        """A message nobody will read: its pooled frames go back."""
        if msg.tensors:
            self._release_refs(msg.session, msg.tensors)

    def _release_refs(self, token: str, refs: list[P.TensorRef]) -> None:
        pooled = [{"pool": r.pool, "slot": r.slot, "lease": r.lease} for r in refs if r.pool]
        if pooled and not self._closed.is_set():
            self.post(P.Message(P.RELEASE, session=token, meta={"refs": pooled}))

    def _forget(self, token: str, keep_ended: bool = False) -> None:
        """Drop what the client keeps for a session (no more heartbeats for it);
        ``keep_ended``: its requests still fail at once with the server's reason."""
        self._sessions.pop(token, None)
        self._abandoned.pop(token, None)
        self._newest.pop(token, None)
        if not keep_ended:
            self._ended.pop(token, None)
        if self._held:
            self._poke()  # its full queue may have been what held reading back


class _Waker:
    """Wakes the I/O thread from any thread, without ever waiting for a lock.

    A ZeroMQ socket is used by one thread at a time, so a wake is sent under a lock; but
    a garbage collection may run inside that send and collect a Frame, Speech or Session
    whose ``__del__`` posts and wakes again on the same thread: with a blocking lock it
    waited for itself for ever. A wake that finds the lock taken leaves ``again`` set
    instead, and the holder sends once more before it leaves, so none is lost."""

    def __init__(self, sock: zmq.Socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._again = False
        self._closed = False

    def poke(self) -> None:
        self._again = True
        while self._again:
            if not self._lock.acquire(blocking=False):
                return  # its holder sees ``again`` once it is done
            try:
                self._again = False
                if not self._closed:
                    try:
                        self._sock.send(b"", zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
            finally:
                self._lock.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._sock.close(0)


def _let_go(sessions: dict, outbox: queue.SimpleQueue, closed: threading.Event,
            waker: _Waker) -> None:
    """The end of a client, by close() or when it is collected without it: its sessions
    are closed on the server (without waiting for the answers) and its I/O thread ends."""
    for token in list(sessions):
        outbox.put((None, [bytes(f) for f in P.encode(P.Message(P.CLOSE_SESSION, session=token))]))
    closed.set()
    waker.poke()


def _io_loop(ref: "weakref.ref[Client]") -> None:
    """The client's socket, on its own thread. It holds the client only while it handles
    what came (not while it waits), so a client nobody holds any more is collected."""
    self = ref()
    if self is None:
        return
    ctx, outbox, closed, waker = self._ctx, self._outbox, self._closed, self._waker
    wake_recv, heartbeat = self._wake_recv, self.heartbeat
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, os.urandom(16))
        # a few messages in ZeroMQ; the rest wait in the server's outbox while this
        # thread stops reading for a reader that is behind (see Client._hold_back)
        sock.setsockopt(zmq.RCVHWM, RECV_HWM)
        # queue only to a connection made (not to one being tried): a request that could
        # not leave says no server took it (ServerGone), one sent but unanswered Timeout
        sock.setsockopt(zmq.IMMEDIATE, 1)
        if self._keys:
            server_key, public, secret = self._keys
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key, public, secret
        sock.connect(self.endpoint)
    except BaseException as e:  # noqa: BLE001 - re-raised in the constructor
        self._error = e
        self._ready.set()
        return
    self._ready.set()
    del self
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(wake_recv, zmq.POLLIN)
    next_beat = time.monotonic() + heartbeat
    # Sends never block (a server that refuses our CURVE key, or is not there, leaves
    # the DEALER with no peer: a blocking send would hang this thread and close()).
    # What cannot go yet waits here, in order, and goes when the socket can take it.
    pending: collections.deque = collections.deque()
    held = False  # reading stopped: a session's reader is behind (Client._hold_back)
    try:
        while not closed.is_set():
            flags = (0 if held else zmq.POLLIN) | (zmq.POLLOUT if pending else 0)
            if flags:
                poller.register(sock, flags)
            elif sock in poller:
                poller.unregister(sock)
            ready = dict(poller.poll(int(heartbeat * 500)))
            self = ref()
            if self is None or closed.is_set():
                break
            if wake_recv in ready:
                while True:
                    try:
                        wake_recv.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
            while True:
                try:
                    pending.append(outbox.get_nowait())
                except queue.Empty:
                    break
            while pending:
                req, frames = pending[0]
                if req is not None and req not in self._waiters and req not in self._unwaited:
                    pending.popleft()  # its caller gave up waiting: do not send it late
                    continue
                try:
                    sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                pending.popleft()
                if req is not None:  # answered (a release is not)
                    _sent(self, req)
            held = self._hold_back()
            if not held and ready.get(sock, 0) & zmq.POLLIN:
                for _ in range(512):
                    try:
                        msg = recv(sock, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except GirisError:
                        continue
                    self._dispatch(msg)
                    if self._full(msg.session) and self._may_hold():  # (that session: no scan of all)
                        held = True
                        break
            self._held = held
            if held:  # answers cannot be heard now: silence is not counted
                self._unanswered_since = None
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + heartbeat
                if (self._sessions or self._waiters) and not pending:  # a client awaiting an open is alive too
                    try:
                        send(sock, P.Message(P.HEARTBEAT), zmq.NOBLOCK)
                        if not held:
                            _sent(self, None)
                    except zmq.Again:
                        pass  # no peer to take it: the next one will do
            del self
    finally:
        self = None
        flushed = False
        while True:  # what close() (or the finalizer) queued last: its sessions' close_session
            try:
                if not pending:
                    pending.append(outbox.get_nowait())
                sock.send_multipart(pending.popleft()[1], zmq.NOBLOCK, copy=False)
                flushed = True
            except (queue.Empty, zmq.ZMQError):
                break
        sock.close(500 if flushed else 0)  # zmq's own thread delivers them, we do not wait
        wake_recv.close(0)
        waker.close()


def _sent(client: Client, req: int | None) -> None:
    """The I/O thread sent a request (``req``) or a heartbeat: the server owes an answer."""
    if client._unanswered_since is None:
        client._unanswered_since = time.monotonic()
    waiter = client._waiters.get(req) if req is not None else None
    if waiter is not None:
        waiter[2] = True


def _crowded(q: "queue.SimpleQueue[Any]") -> bool:
    """A session's queue holds its bound (``SESSION_QUEUE``): its reader is behind."""
    return q.qsize() >= SESSION_QUEUE


def _trim(d: dict, keep: int) -> None:
    """Forget the oldest entries of ``d`` past ``keep``; another thread may pop from it
    meanwhile (then this stops: the next call trims)."""
    while len(d) > keep:
        try:
            d.pop(next(iter(d)), None)
        except (RuntimeError, StopIteration):  # changed under it
            break


def _session_closed() -> GirisError:
    return GirisError("session is closed", code="session_closed")


def _utterance_of(msg: P.Message) -> int | None:
    utt = msg.meta.get("utterance")
    return None if isinstance(utt, list) else utt


# ---------------------------------------------------------------------- a session
#: abandoned utterance ids a session remembers (their late messages are dropped)
ABANDONED_KEPT = 256
#: timed-out requests a client remembers (their late replies are undone)
LATE_KEPT = 256
#: sessions the server closed whose reason a client remembers (their requests fail at once)
ENDED_KEPT = 256
#: messages a session's queue holds before the I/O thread stops reading (a slow reader);
#: it reads on once the queue is half empty
SESSION_QUEUE = 64
#: messages ZeroMQ takes in for the client before the server's outbox holds them
RECV_HWM = 64


class Session:
    """One avatar: ``say`` streams its voice and frames; ``close`` frees all it held."""

    def __init__(self, client: Client, token: str, spec: dict) -> None:
        self.client = client
        self.token = token
        self.spec = spec
        #: messages read for an utterance other than the reader's own, by utterance
        #: (None: the session's own events); guarded by _cond, as several threads or
        #: tasks may stream different utterances of the session at once
        self._backlog: dict[int | None, collections.deque[P.Message]] = {}
        self._cond = threading.Condition()
        self._reading = False  #: one reader at a time takes from the client's queue
        self.events: list[Event] = []
        self.closed = False
        self._idle: weakref.ref | None = None  #: the idle stream running, if any
        #: per utterance, the end of its last frame or coefficient row handed out: its
        #: ``utterance_done``'s ``end_pts`` (one reader per utterance writes its entry)
        self._picture_end: dict[int, float] = {}

    @property
    def fps(self) -> float:
        return float(self.spec.get("fps", 25))

    def say(self, text: str, *, emotion: str | None = None, intensity: float | None = None,
            rate: float | None = None, timeout: float | None = None,
            batch: bool = False, trace: bool = False) -> Iterator[Item]:
        """Speak ``text``: yields AudioChunk, Coefficients (if wanted), Frame and Event items
        as they stream, and ends when the utterance is done. ``batch=True`` synthesizes the
        whole text before animating anything (the non-streaming baseline of the benchmarks);
        ``trace``: see :meth:`start_say`. ``timeout``: the longest wait for each item
        (a silent server raises Timeout), not for the whole utterance; default the
        client's."""
        utt = self.start_say(text, emotion=emotion, intensity=intensity, rate=rate, batch=batch,
                             trace=trace)
        return Speech(self, utt, self.stream(utt, timeout=timeout, cancel_on_exit=True))

    def start_say(self, text: str, *, emotion: str | None = None, intensity: float | None = None,
                  rate: float | None = None, batch: bool = False, trace: bool = False) -> int:
        """Start an utterance; ``trace``: its first audio chunk, coefficients and frame say
        when each process on the way had it (``.trace``; a "client" stamp is added when
        the item is handed to the caller), to see where the time goes."""
        meta = {"text": text, "emotion": emotion, "intensity": intensity, "rate": rate,
                "batch": batch or None, "trace": trace or None}
        self._yield_idle()
        try:
            reply = self.client.request(P.Message(P.SAY, session=self.token,
                                                  meta={k: v for k, v in meta.items() if v is not None}))
        except GirisError as e:
            self._idle_on(e)
            raise
        return int(reply.meta["utterance"])

    @forwards_to(say)
    def coefficients(self, text: str, **kw: Any) -> "Speech":
        """Only the coefficient stream (for clients that drive their own 3D avatar); the
        session must have been opened with ``want`` including ``"coeffs"`` (the server
        sends none otherwise, and this would yield nothing). Returns a :class:`Speech`,
        as ``say`` does: leaving a loop over it cancels the utterance even while a
        variable holds it (a plain generator kept in one ran on, its zero-copy frames
        holding the pool share, and the next say failed ``pool_full``)."""
        self._need_coeffs()
        items = self.say(text, **kw)
        return Speech(self, items.utterance, _only_coefficients(items))

    def _need_coeffs(self) -> None:
        if "coeffs" not in self.spec.get("want", ()):
            raise BadInput("this session was opened without want=[..., 'coeffs']: it gets no "
                           "coefficients; open one that asks for them")

    def send_audio(self, pcm: np.ndarray, sample_rate: int, *, utterance: int | None = None,
                   final: bool = False, idle: bool = False) -> int:
        """Live audio in: the avatar lip-syncs to it. Returns the utterance id: send the
        next chunks with ``utterance=`` it (``final=True`` on the last: the mouth comes
        to rest) and read what comes back with :meth:`stream` (a thread of its own for
        one of the two: both go on at once); without ``utterance`` a chunk starts a new
        utterance.

        ``pcm`` must be a 1-D ``int16`` numpy array (mono) and ``sample_rate`` an integer:
        anything else is a BadInput, not converted (a cast turned float audio in [-1, 1]
        into silence, wrapped int32, and interleaved stereo into noise at twice the rate)."""
        if not isinstance(pcm, np.ndarray) or pcm.dtype != np.dtype(np.int16) or pcm.ndim != 1:
            got = (f"{pcm.dtype} array of shape {pcm.shape}" if isinstance(pcm, np.ndarray)
                   else type(pcm).__name__)
            raise BadInput(f"send_audio takes mono int16 PCM as a 1-D numpy array, got {got} "
                           "(float audio: (x * 32767).astype(np.int16); stereo: one channel, "
                           "e.g. x[:, 0])")
        if (isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real)
                or not float(sample_rate).is_integer() or sample_rate <= 0):
            raise BadInput(f"send_audio: sample_rate must be a positive whole number of Hz, "
                           f"got {sample_rate!r}")
        fresh = utterance is None
        if fresh:
            self._yield_idle()
        msg = P.Message(P.AUDIO_IN, session=self.token,
                        meta={"sample_rate": int(sample_rate), "final": bool(final),
                              **({"idle": True} if idle else {}),
                              **({"utterance": utterance} if utterance is not None else {})})
        msg.add_inline(np.ascontiguousarray(pcm))
        try:
            return int(self.client.request(msg).meta["utterance"])
        except GirisError as e:
            if fresh:
                self._idle_on(e)
            raise

    def idle(self, seconds: float | None = None, *, chunk_s: float = 0.2) -> "Idle":
        """The avatar alive with nothing to say: blinks, the slow sway, the mouth at rest,
        for ``seconds`` (None: until ``stop()``, ``close()`` or the next ``say``). Iterate
        it for the frames, as ``say``'s items. It is live audio of silence, paced to the
        session (see :mod:`giris.runtime.idle`); a ``say`` or new live audio on the
        session takes over from it (a live session: its frames play until the speech's
        first frame; an offline one: cut at once)."""
        from giris.runtime.idle import Idle

        idle = Idle(self, seconds, chunk_s)
        self._idle = weakref.ref(idle)
        return idle

    def _idle_stream(self) -> "Idle | None":
        """The session's idle stream, while one is alive."""
        return self._idle() if self._idle is not None else None

    def _yield_idle(self) -> None:
        """Speech is coming: a live session's idle stream stops being fed and plays on
        until the speech's first frame takes over on the server (no gap between them);
        an offline session's is cut now (its frames would only come first)."""
        idle = self._idle_stream()
        if idle is None:
            return
        if self.spec.get("realtime"):
            idle.halt()
        else:
            self._cut_idle()

    def _idle_on(self, e: GirisError) -> None:
        """The request the idle stream made way for failed: a refusal leaves the stream
        as it was on the server, so it is fed again (it stopped silently before, and a
        player showed its last frame); without an answer, it is cut (nothing would take
        over from it)."""
        idle = self._idle_stream()
        if idle is None:
            return
        if isinstance(e, (ServerGone, Timeout)):
            self._cut_idle()
        else:
            idle.resume()

    def _cut_idle(self) -> None:
        idle = self._idle_stream()
        self._idle = None
        if idle is not None:
            idle.cut()

    def cancel(self, utterance: int | None = None) -> list[int]:
        """Stop ``utterance`` (None: all of the session's) between two chunks; its stream
        still ends with an ``utterance_done`` (``cancelled``). Returns the ids cancelled."""
        reply = self.client.request(P.Message(P.CANCEL, session=self.token,
                                              meta={"utterance": utterance}))
        return list(reply.meta.get("cancelled", []))

    def stream(self, utterance: int, timeout: float | None = None, *,
               cancel_on_exit: bool = False) -> Iterator[Item]:
        """Items of ``utterance`` until its ``utterance_done``; errors raise typed exceptions.

        Leaving early (``break``, an exception, a cancelled task) with ``cancel_on_exit``
        (what ``say`` does: its caller has no id to come back with) cancels the utterance
        without waiting for the server and drops what is still to come of it; otherwise a
        later ``stream(utterance)`` goes on where this one stopped."""
        limit = self.client._limit(timeout)
        done = False
        try:
            while not done:
                item, done = self._advance(utterance, self._next(utterance, limit))
                if item is not None:
                    yield item
        finally:
            if not done and cancel_on_exit:
                self._abandon(utterance)

    def _advance(self, utterance: int, msg: P.Message | None) -> tuple[Item | None, bool]:
        """(item, whether the utterance is over) for the next message of ``utterance``: none
        means another reader abandoned it meanwhile; an error event abandons it (its
        ``utterance_done`` is dropped when it comes) and raises."""
        if msg is None:
            return None, True
        kind = msg.meta.get("kind") if msg.type == P.EVENT else None
        if kind == "error":
            self._abandon(utterance, cancel=False)
        elif (kind == "utterance_done" and msg.meta.get("error") and not msg.meta.get("complete")
              and _utterance_of(msg) == utterance):
            # its error went to another reader (an older server's one error for the whole
            # session): this stream waited out its timeout for an end it had dropped
            self._abandon(utterance, cancel=False)
            code = str(msg.meta["error"])
            raise from_wire({"code": code, "message": f"utterance {utterance} failed ({code})"})
        return self._to_item(msg)

    def _to_item(self, msg: P.Message) -> tuple[Item | None, bool]:
        """A message as a stream item, and whether it ends the utterance."""
        if msg.type == P.EVENT:
            kind = msg.meta.get("kind")
            ev = Event(kind, msg.meta)
            if kind == "utterance_done":
                ev.end_pts = self._picture_end.pop(_utterance_of(msg), None)
                return ev, True
            if kind == "error":
                raise from_wire(msg.meta)
            if kind == "session_closed":
                # nothing more comes for it: the client forgets it now (it was kept, and
                # heartbeated, for ever: close() found it closed and returned early)
                self.closed = True
                self._wake_readers()
                self.client._forget(self.token, keep_ended=True)
                raise GirisError(f"session closed by the server ({msg.meta.get('reason')})",
                                 code="session_closed")
            self.events.append(ev)
            return ev, False
        return self._item(msg), False

    def _abandon(self, utterance: int, cancel: bool = True) -> None:
        """Nobody will read ``utterance`` any more: cancel it (best-effort, no wait), drop
        what was kept of it (giving pooled frames back) and what is still to come."""
        client = self.client
        if self.token not in client._sessions:  # forgotten: nothing more comes for it
            cancel = False
        elif not client._mark_abandoned(self.token, utterance):
            cancel = False  # once is enough (an error ended it, or another reader left it)
        if cancel and not self.closed and not client._closed.is_set():
            try:
                client.post_unwaited(P.Message(P.CANCEL, session=self.token,
                                               meta={"utterance": utterance}))
            except GirisError:
                pass
        self._picture_end.pop(utterance, None)  # its utterance_done is dropped too
        with self._cond:
            for msg in self._backlog.pop(utterance, ()):
                client._drop(msg)
            q = client._sessions.get(self.token)
            if q is not None and self._reading:
                q.put(_WAKE)  # its reader may be this utterance's: let it see
            elif q is not None:  # sort what already came, dropping this utterance's
                while True:
                    try:
                        msg = q.get_nowait()
                    except queue.Empty:
                        break
                    if msg is _SENTINEL or msg is _CLOSED:
                        q.put(msg)
                        break
                    if msg is not _WAKE:
                        self._sort(msg)
            self._cond.notify_all()
        if client._held:
            client._poke()  # the queue was emptied: reading may go on

    def _sort(self, msg: P.Message, front: bool = False, reader: int | None = None) -> None:
        """Keep ``msg`` for its utterance's reader (under _cond); ``front``: given back, it
        is read first. A pooled frame kept for another utterance than ``reader``'s is
        copied out of the pool and its slot given back: parked, it held the session's
        share of slots, and the reader's own utterance stalled (``pool_full``) waiting
        for frames that had no slot to be drawn in."""
        utt = _utterance_of(msg)
        if self.client._is_abandoned(self.token, utt):
            self.client._drop(msg)
            return
        if utt != reader and not front and msg.type == P.FRAME:
            self._unpool(msg)
        q = self._backlog.setdefault(utt, collections.deque())
        (q.appendleft if front else q.append)(msg)

    def _unpool(self, msg: P.Message) -> None:
        """Make ``msg``'s pooled tensors inline copies and give their slots back."""
        pooled = [(i, r) for i, r in enumerate(msg.tensors) if r.pool is not None]
        if not pooled:
            return
        try:
            copies = [self.client.pools.array(msg, r).copy() for _, r in pooled]
        except GirisError:  # stale: left as it is, its read says so
            return
        for (i, _), a in zip(pooled, copies):
            msg.tensors[i] = msg.inline_ref(a)
        self.client._release_refs(self.token, [r for _, r in pooled])

    def _next(self, utterance: int, timeout: float) -> P.Message | None:
        """The next message for ``utterance`` (or the session), None once it is abandoned.

        Thread-safe: one reader at a time takes from the client's queue and sorts what is
        not its own into the backlog; the others wait on the condition for theirs."""
        client = self.client
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if client._is_abandoned(self.token, utterance):
                    return None
                if self.closed:  # by close() on another thread, or the server
                    raise _session_closed()
                self._drop_stale(utterance)
                for key in (utterance, None):
                    b = self._backlog.get(key)
                    if b:
                        msg = b.popleft()
                        if not b:
                            del self._backlog[key]
                        return msg
                if client._closed.is_set():
                    raise ServerGone("client is closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise client._silence(timeout)
                if self._reading:
                    self._cond.wait(left)
                    continue
                self._reading = True
                try:
                    self._cond.release()
                    try:
                        msg = client._take(self.token, left)
                    finally:
                        self._cond.acquire()
                finally:
                    self._reading = False
                    self._cond.notify_all()
                if msg is not None and msg is not _WAKE:
                    self._sort(msg, reader=utterance)

    def _drop_stale(self, utterance: int) -> None:
        """Session-wide errors that came before ``utterance`` was asked for are not its
        own: kept in ``events``, never raised into it (under _cond)."""
        b = self._backlog.get(None)
        while b and getattr(b[0], "upto", utterance) < utterance:
            stale = b.popleft()
            self.events.append(Event(str(stale.meta.get("kind")), stale.meta))
        if b is not None and not b:
            del self._backlog[None]

    def _item(self, msg: P.Message) -> Item | None:
        m = msg.meta
        trace = m.get("trace")
        if type(trace) is list:
            trace = [*trace, ["client", time.monotonic()]]
        else:
            trace = None
        if msg.type == P.AUDIO:
            return AudioChunk(pcm=msg.inline_array(msg.tensors[0]), sample_rate=int(m["sample_rate"]),
                              start_sample=int(m["start_sample"]), pts=msg.pts, seq=msg.seq,
                              utterance=int(m.get("utterance", 0)), final=bool(m.get("final")),
                              text=m.get("text", ""), phonemes=m.get("phonemes"), trace=trace)
        if msg.type == P.COEFFS:
            c = Coefficients(values=msg.inline_array(msg.tensors[0]), first_frame=int(m["first_frame"]),
                             fps=float(m["fps"]), pts=msg.pts, utterance=int(m.get("utterance", 0)),
                             final=bool(m.get("final")), trace=trace)
            self._picture_ends(c.utterance, (c.first_frame + len(c.values)) / c.fps)
            return c
        if msg.type == P.FRAME:
            ref = msg.tensors[0]
            release = None
            if ref.pool is not None:  # zero-copy: a view straight into the server's pool
                image = self.client.pools.array(msg, ref)
                release = lambda: self.client._release_refs(self.token, [ref])  # noqa: E731
            else:
                image = msg.inline_array(ref)
            f = Frame(image=image, index=msg.seq, pts=msg.pts, utterance=int(m.get("utterance", 0)),
                      final=bool(m.get("final")), _release=release, trace=trace)
            self._picture_ends(f.utterance, (f.index + 1) / self.fps)
            return f
        return None

    def _picture_ends(self, utterance: int, end: float) -> None:
        """``utterance``'s picture reaches ``end`` (seconds on the session clock)."""
        self._picture_end[utterance] = max(end, self._picture_end.get(utterance, end))

    def close(self) -> None:
        """Free all the session held on the server (also by ``with client.open_session(...)
        as session:``); a reader on another thread raises ``session_closed`` at once.
        Closing it again, or after its client was closed (which closed it), does nothing."""
        if self.closed:
            self.client._forget(self.token)  # closed by the server: forgotten for good
            return
        self.closed = True
        self._wake_readers()
        try:
            # closed already: by the server (ended), or by the client's close(), after which
            # this raised ServerGone (a task's ``async with session`` left after its client's
            # ``async with`` failed at asyncio.run's shutdown)
            if self.token not in self.client._ended and not self.client._closed.is_set():
                self.client.request(P.Message(P.CLOSE_SESSION, session=self.token),
                                    timeout=1 if self.client._gone else 10)
        finally:
            self.client._forget(self.token)

    def _wake_readers(self) -> None:
        """The session is closed: whoever reads it raises ``session_closed`` now (a
        reader on another thread sat out its whole timeout, the server sending nothing
        more for a closed session, then raised Timeout)."""
        q = self.client._sessions.get(self.token)
        if q is not None:
            q.put(_CLOSED)  # the reader taking from the queue
        with self._cond:
            self._cond.notify_all()  # those waiting for it

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        """A session let go without close() is closed on the server (without waiting):
        it stayed open as long as its client lived, and eight of them were a client's
        whole allowance."""
        try:
            if not self.closed and not self.client._closed.is_set():
                self.closed = True
                self.client.post_unwaited(P.Message(P.CLOSE_SESSION, session=self.token))
                self.client._forget(self.token)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class Speech(Iterator[Item]):
    """What :meth:`Session.say` returns: the utterance's items, as its generator yields them.

    The request is sent at once (a bad one raises at the call), and an utterance whose
    items are never read at all is cancelled when this is closed or collected: a generator
    that never started runs no ``finally``, so the plain one would leave it speaking."""

    def __init__(self, session: "Session", utterance: int, items: Iterator[Item]) -> None:
        self.session, self.utterance, self._items = session, utterance, items
        self._started = False

    def __next__(self) -> Item:
        self._started = True
        return next(self._items)

    def __iter__(self) -> Iterator[Item]:
        """A loop's own iterator: leaving the loop early (``break``, an exception) ends
        the utterance even while this object is still referenced (a variable kept it
        alive, and its stream with it: its frames held the session's pool share and the
        next ``say`` failed with ``pool_full``)."""
        try:
            while True:
                try:
                    item = self.__next__()
                except StopIteration:
                    return
                yield item
        finally:
            self.close()

    def close(self) -> None:
        if not self._started:
            self._started = True
            self.session._abandon(self.utterance)
        try:
            self._items.close()  # type: ignore[attr-defined]
        except ValueError:  # another thread is reading it ("generator already executing"):
            self.session._abandon(self.utterance)  # its read wakes and the stream ends

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown, a closed client
            pass


def _seconds(value: Any, name: str) -> float:
    """A wait in seconds, > 0 and finite (``status --timeout -1`` was taken, and failed at
    once as a server that did not answer)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < float("inf"):
        raise BadInput(f"{name} must be a number of seconds > 0, not {value!r}")
    return float(value)


def _only_coefficients(items: "Speech") -> Iterator[Coefficients]:
    """``items``' coefficients; its frames are given back at once."""
    try:
        for item in items:
            if isinstance(item, Coefficients):
                yield item
            elif isinstance(item, Frame):
                item.release()
    finally:
        items.close()  # leaving early cancels the utterance (see stream)


def _read_avatar(path: str | os.PathLike) -> bytes:
    """A portrait file's bytes; a name with a dot or a slash is a path, so a missing one
    is said to be missing (not looked up among the bundled avatars)."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise BadInput(f"avatar file {str(path)!r} does not exist (bundled avatars are named "
                       "without a suffix)") from None
    except OSError as e:
        raise BadInput(f"avatar file {str(path)!r} cannot be read: {e.strerror or e}") from None


#: ZeroMQ's Z85 alphabet: a CURVE key written out is 40 of these characters
def _is_z85_key(key: str | bytes) -> bool:
    """Whether ``key`` is a CURVE key in Z85 text (40 characters of ZeroMQ's alphabet)."""
    from zmq.utils.z85 import Z85CHARS

    raw = key.encode("utf-8", "replace") if isinstance(key, str) else key
    return len(raw) == 40 and set(raw) <= set(Z85CHARS)


def _curve_keys(server_key: Any, client_keys: Any) -> tuple[bytes, bytes, bytes] | None:
    """(server public, client public, client secret) for CURVE; None without a server key.
    ``server_key`` is the key itself (40 Z85 characters) or its file: anything else is a
    file that is not there (it was taken as a key: "cannot connect: Invalid argument")."""
    from giris.runtime.keys import load_keypair

    if server_key is None:
        if client_keys is not None:  # (it was ignored: the connection went out in the clear)
            raise GirisError("a client key needs the server's public key too (server_key, "
                             "--server-key): CURVE takes both", code="bad_key")
        return None
    if isinstance(server_key, bytes) and not (_is_z85_key(server_key) or len(server_key) == 32):
        raise GirisError("server_key must be a 40-character Z85 key (or 32 raw bytes) or a key file",
                         code="bad_key")
    if not isinstance(server_key, bytes):
        if isinstance(server_key, str) and _is_z85_key(server_key) and not os.path.exists(server_key):
            server_key = server_key.encode()
        else:
            server_key = load_keypair(server_key, "server key")[0]
    if client_keys is None:
        public, secret = zmq.curve_keypair()
    elif isinstance(client_keys, tuple):
        public, secret = client_keys
    else:
        public, secret = load_keypair(client_keys, "client key")
    if secret is None:
        raise GirisError("client key file has no secret key (use the .key_secret file)", code="bad_key")
    return server_key, public, secret
