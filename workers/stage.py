"""The stage worker: one process per stage replica, spawned by the supervisor.

It loads its engine once, then loops: read control (sessions opening and closing) and
input (work), advance by one output the engine generator of the busy session whose next
output is due first (live sessions by when their speech runs out, see ``_urgency``; a
long utterance of one session never starves another, and a ``cancel`` takes effect
between two chunks), route each output downstream and/or to the client, heartbeat. The
renderer instead draws one frame of every busy session in one batch.

Sessions open on a thread of their own: fitting a portrait (decode, face detection,
rig: 0.1-1 s for a photo) or loading a voice must not freeze the frames of the
sessions already streaming. The engine's ``open_session`` therefore runs beside
``process``; the engines keep what they share (caches, voices) safe for that.

Engines see numpy arrays only; this module owns sockets, pools and the session table.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import zmq

from giris.runtime import protocol as P
from giris.runtime.errors import GirisError
from giris.runtime.logs import setup_logging
from giris.runtime.shm_pool import PoolFull, Slot, SlotPool, session_tag
from giris.runtime.transport import PoolSet, recv, send, socket
from giris.workers.bases import RenderEngine
from giris.workers.engine import EngineContext, Options, Output, StageInput
from giris.workers.registry import engine_class

log = logging.getLogger("giris.worker")
MAX_DRAIN = 64
#: stamps a traced request may gather (one per stage boundary, a few per stage)
MAX_TRACE = 32
#: seconds a live session's frames may be drawn ahead of its clock (frames made earlier
#: would only wait in the supervisor's memory)
LIVE_LEAD_S = 1.0
#: how long an offline session may wait for its next step while live sessions go first:
#: a live session whose audio lasts longer than this ahead of its viewer lets it go
OFFLINE_WAIT_S = 1.0


@dataclass
class WorkerSession:
    token: str
    tag: int
    state: Any
    queue: deque = field(default_factory=deque)
    gen: Iterator[Output] | None = None
    current: P.Message | None = None
    started: float = 0.0
    #: pool slots allocated for this session and not yet sent
    allocs: dict[int, Slot] = field(default_factory=dict)
    #: live sessions (``realtime``) are drawn at most LIVE_LEAD_S ahead of their clock
    fps: float = 25.0
    realtime: bool = False
    #: (t0, k0): frame k0 was drawn at t0; None until a stream starts
    clock: tuple[float, int] | None = None
    #: when the next frame may be drawn
    not_before: float = 0.0
    #: since when the session has held its share of the pool (its client is behind)
    held_since: float | None = None
    #: the client (connection) that owns it: one client's sessions share a cap (0: none)
    client: int = 0
    #: (utterance, stamps so far) of a traced request, until this stage's next output for
    #: that utterance carries them on
    trace: tuple[Any, list] | None = None
    #: live sessions' playout: (wall time, pts) of the media it plays at that time, and
    #: the end (pts) of the media made so far (None until an item's first output)
    media: tuple[float, float] | None = None
    media_end: float = 0.0
    #: the utterance of the last output booked
    media_utt: Any = None
    #: seconds a live stream starts behind its first output (the session's playout delay)
    delay: float = 0.0
    #: when it last took a step, or (idle) when work came: its turn among offline sessions
    last_step: float = 0.0
    #: its current item has made no (booked) output yet
    fresh: bool = True


class StageWorker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.stage: str = spec["stage"]
        self.last: bool = bool(spec["last"])
        self.ctx = zmq.Context()
        self.pools = PoolSet()
        self.pool: SlotPool | None = None
        if spec.get("pool"):
            self.pool = SlotPool.attach(spec["pool"])
            self.pools.add(self.pool)
        self.sessions: dict[str, WorkerSession] = {}
        self.current: WorkerSession | None = None
        self.stats = {"processed": 0, "outputs": 0, "dropped": 0, "errors": 0}
        self.latencies: list[float] = []
        self.running = True
        self.looping = False
        #: the thread that steps the sessions (``busy`` answers it alone)
        self.loop_thread = threading.get_ident()
        self.scratch: set[int] = set()
        #: sessions being opened on the opener thread: token -> (future, tag, spec, request)
        self.opening: dict[str, tuple[Future, int, dict, Any]] = {}
        #: opens whose session was closed (or opened again) meanwhile: closed once done
        self.abandoned: list[Future] = []
        self.opener = ThreadPoolExecutor(max_workers=1, thread_name_prefix="giris-open")
        self.beat_every = float(spec.get("heartbeat", 0.5))
        self.next_beat = 0.0
        self.block_timeout = float(spec.get("block_timeout", 5.0))
        #: most pool slots one session may hold (see ``_held_back``); 0: no cap
        self.session_slots = int(spec.get("session_slots") or 0)
        #: most pool slots the sessions of one client may hold together: half the pool (or
        #: ``session_slots``, if more), so a client that keeps its zero-copy frames, over
        #: however many sessions, leaves the rest of the pool to the other clients
        self.client_slots = max(self.session_slots, self.pool.n_slots // 2) if self.pool else 0
        self._counts_at, self._client_counts = -1.0, {}

    # ------------------------------------------------------------------ start-up
    def start(self) -> None:
        sp = self.spec
        self.control = socket(self.ctx, zmq.DEALER, identity=sp["identity"].encode())
        self.control.connect(sp["control"])
        context = EngineContext(stage=self.stage, device=sp.get("device", "cpu"),
                                alloc=self.alloc, log=logging.getLogger(f"giris.engine.{self.stage}"),
                                busy=self.busy)
        t0 = time.monotonic()
        options = Options(sp.get("options") or {})
        try:
            self.engine = engine_class(sp["engine"])(options, context)
        except (ValueError, TypeError) as e:
            # an option's value the engine cannot convert (``threads = "four"``, a ramp
            # given high to low): its configuration, refused as such, not a bug restarted
            # in a loop of tracebacks (the same options fail the same way every time)
            raise GirisError(f"an option it cannot use (the last read: {options.last!r}): "
                              f"{type(e).__name__}: {e}", code="bad_config") from e
        self.engine.warmup()
        unread = [k for k in options.unread() if k not in type(self.engine).late_options]
        if unread:  # a typo in the config runs as if unset: say so (a warning: see Options)
            log.warning("stage option(s) its engine never read: a typo?", extra={
                "stage": self.stage, "engine": sp["engine"], "unread": ",".join(unread),
                "read": ",".join(sorted(options.looked_up)) or "none"})
        self.batching = isinstance(self.engine, RenderEngine)
        load_s = time.monotonic() - t0
        self.input = socket(self.ctx, zmq.PULL, rcvhwm=0)
        self.input.bind(sp["input"])
        self.sink = socket(self.ctx, zmq.PUSH, linger=2000, sndhwm=0)
        self.sink.connect(sp["sink"])
        if self.last:
            self.output = self.sink
        else:
            self.output = socket(self.ctx, zmq.PUSH, linger=2000, sndhwm=0)
            self.output.connect(sp["output"])
        send(self.control, P.Message(P.READY, meta={"pid": os.getpid(), "load_s": load_s,
                                                    "kind": str(getattr(self.engine, "stage", ""))}))
        # The supervisor answers with the open sessions to restore before any work is read.
        if not self.control.poll(int(sp.get("ready_timeout", 60) * 1000)):
            raise SystemExit("supervisor did not answer READY")
        reply = recv(self.control)
        self._beat_every(reply.meta.get("heartbeat"))
        for entry, avatar in _with_avatars(reply):
            self.open(entry["token"], int(entry["tag"]), _spec(entry["spec"], avatar), None)
        log.info("ready", extra={"stage": self.stage, "load_s": round(load_s, 3),
                                 "restored": len(self.sessions)})

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.input, zmq.POLLIN)
        self.next_beat = time.monotonic()
        parent = os.getppid()
        while self.running:
            busy = any(s.gen is not None or s.queue for s in self.sessions.values())
            now = time.monotonic()
            if now >= self.next_beat and os.getppid() != parent:  # the supervisor is gone
                break
            self._beat_if_due(now)
            wake = self.next_beat
            if busy:
                wake = min(wake, min((s.not_before for s in self.sessions.values()
                                      if s.gen is not None or s.queue), default=now))
            if self.opening or self.abandoned:
                wake = min(wake, now + 0.005)  # look at the opener's results soon
            timeout = max(0, int((wake - now) * 1000))
            ready = dict(poller.poll(timeout))
            if self.control in ready:
                self.drain_control()
            if self.opening or self.abandoned:
                self.finish_opens()
            if self.input in ready:
                self.drain_input()
            if busy:
                self.step_all()

    def drain_control(self) -> None:
        while True:
            try:
                msg = recv(self.control, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except GirisError as e:
                log.warning("bad control message", extra={"error": str(e)})
                continue
            self.on_control(msg)

    def on_control(self, msg: P.Message) -> None:
        req = msg.meta.get("req")
        avatar = bytes(msg.buffers[0]) if msg.buffers else None
        if msg.type == P.OPEN_SESSION and msg.meta.get("estimate_only"):
            try:
                est = self.engine.estimate(_spec(msg.meta["spec"], avatar))
                self.reply(req, ok=True, estimate=est)
            except Exception as e:  # noqa: BLE001 - reported to the supervisor
                self.reply(req, ok=False, error=_wire(e))
        elif msg.type == P.CHECK:
            refused = None
            try:
                self.engine.check(_spec(msg.meta["spec"], avatar))
            except GirisError as e:  # what open_session would have failed with
                refused = _wire(e)
            except Exception as e:  # noqa: BLE001 - a bug of the engine's check, not a
                # verdict: logged, and the server serves on
                log.exception("engine check failed, [defaults] not judged", extra={"stage": self.stage})
                self._forget_frames(e)
            self.reply(req, ok=True, refused=refused)
        elif msg.type == P.OPEN_SESSION:
            self.open_async(msg.session, int(msg.meta["tag"]), _spec(msg.meta["spec"], avatar), req)
        elif msg.type == P.CLOSE_SESSION:
            self.close(msg.session)
            self.reply(req, ok=True)
        elif msg.type == P.HEARTBEAT:  # a reload changed the interval
            self._beat_every(msg.meta.get("every"))
        elif msg.type == P.STOP:
            self.running = False

    def open(self, token: str, tag: int, spec: dict, req: Any) -> None:
        """Open at once (sessions restored at start, before any work is read)."""
        try:
            state = self.engine.open_session(spec)
        except Exception as e:  # noqa: BLE001 - an unusable spec must not kill the worker
            self._open_failed(req, e)
            return
        self._install(token, tag, spec, state, req)

    def open_async(self, token: str, tag: int, spec: dict, req: Any) -> None:
        """Open on the opener thread; ``finish_opens`` installs it (and replies) when done."""
        pending = self.opening.pop(token, None)
        if pending is not None:
            self.abandoned.append(pending[0])
        self.opening[token] = (self.opener.submit(self.engine.open_session, spec), tag, spec, req)

    def finish_opens(self) -> None:
        # The failure is taken with ``exception()``, not by re-raising it from
        # ``result()``: re-raised here, its traceback would hold this frame, whose
        # ``future`` holds the exception again, a cycle that only the garbage collector
        # breaks, maybe much later, and until then every frame of the failed open with
        # it (a refused 16000x16000 avatar: its 1 GB decoded picture, per attempt).
        for token, (future, tag, spec, req) in list(self.opening.items()):
            if not future.done():
                continue
            del self.opening[token]
            error = CancelledError() if future.cancelled() else future.exception()
            if error is not None and not isinstance(error, (Exception, CancelledError)):
                raise error  # SystemExit, KeyboardInterrupt: not this open's failure
            if error is not None:  # an unusable spec must not kill the worker
                self._open_failed(req, error)
            else:
                self._install(token, tag, spec, future.result(), req)
        for future in [f for f in self.abandoned if f.done()]:
            self.abandoned.remove(future)
            if future.cancelled():
                continue
            error = future.exception()
            if error is None:
                self._close_state(future.result())
            else:
                self._forget_frames(error)

    def _open_failed(self, req: Any, e: BaseException) -> None:
        # Only the message is kept (sent or logged): the traceback's frames (the engine's
        # locals: a decoded picture, a half-built session) go now, before the answer,
        # whatever holds the exception still (a future, a caller's frame).
        self._forget_frames(e)
        if req is not None:
            self.reply(req, ok=False, error=_wire(e))
        else:
            log.warning("could not restore session", extra={"error": str(e)})

    @staticmethod
    def _forget_frames(e: BaseException) -> None:
        """Drop the tracebacks of ``e``, of what it was raised from or while handling, and
        of the members of an exception group."""
        seen: set[int] = set()
        todo: list[BaseException | None] = [e]
        while todo:
            x = todo.pop()
            if x is None or id(x) in seen:
                continue
            seen.add(id(x))
            x.__traceback__ = None
            todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]

    def _install(self, token: str, tag: int, spec: dict, state: Any, req: Any) -> None:
        old = self.sessions.pop(token, None)
        if old is not None:
            self._drop(old)
        self.sessions[token] = WorkerSession(token, tag, state, fps=float(spec.get("fps") or 25),
                                             realtime=bool(spec.get("realtime")),
                                             delay=float(spec.get("playout_delay") or 0.0),
                                             client=int(spec.get("client_tag") or 0))
        if req is not None:
            self.reply(req, ok=True, held=self._held(state))

    def close(self, token: str) -> None:
        pending = self.opening.pop(token, None)
        if pending is not None:  # closed while it was still opening: say so, drop it when done
            self.abandoned.append(pending[0])
            if pending[3] is not None:
                self.reply(pending[3], ok=False, error=GirisError(
                    "session closed while it was opening", code="session_closed").to_wire())
        s = self.sessions.pop(token, None)
        if s is not None:
            self._drop(s)

    def _drop(self, s: WorkerSession) -> None:
        if s.gen is not None:
            s.gen.close()
        if s.current is not None:
            self.pools.release_all(s.current)
        for m in s.queue:
            self.pools.release_all(m)
        s.queue.clear()
        self._free_allocs(s)
        self._close_state(s.state)

    def _close_state(self, state: Any) -> None:
        try:
            self.engine.close_session(state)
        except Exception:  # noqa: BLE001
            log.exception("close_session failed")

    def drain_input(self) -> None:
        for _ in range(MAX_DRAIN):
            try:
                msg = recv(self.input, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except GirisError as e:
                self.stats["errors"] += 1
                log.warning("dropped malformed message", extra={"error": str(e)})
                continue
            s = self.sessions.get(msg.session)
            if s is None:  # closed meanwhile: nothing may linger
                self.pools.release_all(msg)
                continue
            if msg.type == P.CANCEL:
                self.cancel(s, msg)
            else:
                if s.gen is None and not s.queue:
                    s.last_step = time.monotonic()  # idle until now: its turn counts from here
                s.queue.append(msg)

    def cancel(self, s: WorkerSession, msg: P.Message) -> None:
        utt = msg.meta.get("utterance")
        cut = s.current is not None and (utt is None or s.current.meta.get("utterance") == utt)
        if cut:
            self._finish(s)
        keep = deque()
        for m in s.queue:
            if utt is None or m.meta.get("utterance") == utt:
                self.pools.release_all(m)
            else:
                keep.append(m)
        s.queue = keep
        # a live session's clock starts over with what comes next: its frames continue the
        # session's frame count past the cut, and must not wait as if those had been shown;
        # so does the booking of what it made (the booking of another utterance, still
        # being made, stays)
        if self.batching:
            s.clock, s.not_before = None, 0.0
        elif cut or utt is None or utt == s.media_utt:
            s.media, s.not_before = None, 0.0
        try:
            self.engine.cancel(s.state, utt)
        except Exception:  # noqa: BLE001
            log.exception("cancel failed")
        if not self.last:
            send(self.output, msg)

    # ------------------------------------------------------------------ work
    def _held_back(self, s: WorkerSession, now: float) -> bool:
        """Whether the session holds its share of the pool, or its client's sessions
        together theirs (``client_slots``), and must wait for the client to give frames
        back, leaving the other clients' sessions to go on. Past ``block_timeout`` its
        item fails with ``pool_full``, as a full pool does.

        A session's share is ``session_slots``, and of its client's share no more than
        an even part among the client's sessions at work: without that, the live
        sessions of one client that were ahead held all of its slots with frames waiting
        for their time, and a sibling that fell behind could draw none (1-2 s stalls with
        four live sessions of one client)."""
        pool = self.pool
        if pool is None or not self.session_slots or s.gen is None and not s.queue:
            s.held_since = None  # (a wait cut by a cancel must not count against the next)
            return False
        held, share = self._client_held(s, now)
        if pool.owned_by(s.tag) < share and held < self.client_slots:
            s.held_since = None
            if s.client:  # it may take a slot this step: count it for its siblings
                self._client_counts[s.client][0] += 1
            return False
        if s.held_since is None:
            s.held_since = now
        elif now - s.held_since > self.block_timeout:
            s.held_since = None
            if s.gen is None and s.queue:
                self._begin(s, s.queue.popleft())
            self._failed(s, PoolFull(f"session (or its client's sessions) holds {share} "
                                     f"(or {self.client_slots}) slots of {pool.name} its client "
                                     "has not given back", pool=pool.name))
            return True
        s.not_before = now + 0.005  # look again soon; the loop sleeps until then
        return True

    def _client_held(self, s: WorkerSession, now: float) -> tuple[int, int]:
        """(slots the sessions of ``s``'s client hold together, the most ``s`` may hold):
        counted once a step per client (then one more for each session let go on). A
        session of no client (embedded) has ``session_slots`` and no client cap."""
        if not s.client or self.pool is None:
            return 0, self.session_slots
        if self._counts_at != now:
            self._counts_at, self._client_counts = now, {}
        if s.client not in self._client_counts:
            held, working = 0, 0
            for o in self.sessions.values():
                if o.client == s.client:
                    held += self.pool.owned_by(o.tag)
                    working += o.gen is not None or bool(o.queue)  # (s itself is)
            share = min(self.session_slots, max(1, self.client_slots // max(1, working)))
            self._client_counts[s.client] = [held, share]
        held, share = self._client_counts[s.client]
        return held, share

    def step_all(self) -> None:
        """One output of the session that needs it most (see ``_urgency``); the loop
        comes back here after reading its sockets, so a cancel or a new utterance is
        seen between any two outputs."""
        if self.batching:
            return self.step_batched()
        now = time.monotonic()
        ready = [s for s in list(self.sessions.values())
                 if (s.gen is not None or s.queue) and s.not_before <= now and not self._held_back(s, now)]
        if not ready:
            return
        s = min(ready, key=lambda s: self._urgency(s, now))
        s.last_step = now
        out = self._advance(s)
        if out is not None:
            self.route(s, out)

    @staticmethod
    def _urgency(s: WorkerSession, now: float) -> float:
        """When the session's next output is due: earliest deadline first. A live
        session's is when the media it has made so far will have played out (it stalls
        then; an item queued behind one still playing is due then too); a live stream's
        start (its first output, or an item's first after the one before has played
        out), a playout delay after it was asked for (later only starts it later: a
        session about to stall goes first); an offline session's, ``OFFLINE_WAIT_S``
        after its last step (live sessions go first while they are less than that ahead;
        offline sessions take turns).

        Round robin, the old way, gave four live sessions started together their long
        chunks (up to ~1.5 s of speech, ~0.2 s of compute each) in turn whatever how much
        each had left to play: the last ones ran dry, ~0.3-0.5 s stalls."""
        if not s.realtime:
            return s.last_step + OFFLINE_WAIT_S
        start = s.last_step + s.delay
        if s.media is None:
            return start
        t0, p0 = s.media
        due = t0 + s.media_end - p0
        return start if s.fresh and due < now else due

    def _played(self, s: WorkerSession, out: Output, now: float) -> None:
        """Book a live session's audio (or coefficient frames) output: when it will play
        (``s.media``), and how far what was made reaches. A chunk that would have played already (the stage fell
        behind) restarts the stream, as the supervisor's pacing does: a playout delay on."""
        if not (s.realtime and out.tensors and out.type in (P.AUDIO, P.COEFFS)):
            return
        rate = out.meta.get("sample_rate") if out.type == P.AUDIO else s.fps  # samples, frames
        if not isinstance(rate, (int, float)) or rate <= 0:
            return
        end = out.pts + out.tensors[0].shape[0] / rate
        if s.media is None or s.media[0] + (out.pts - s.media[1]) < now:
            s.media = (now + s.delay, out.pts)
        s.media_end = max(end, out.pts)
        # more than LIVE_LEAD_S of speech in hand: the core is the renderer's until then
        # (made all at once, four sessions' speech took the core the renderer needed to
        # draw their frames in time)
        s.fresh = False
        s.media_utt = out.meta.get("utterance")
        s.not_before = self._urgency(s, now) - LIVE_LEAD_S

    def _advance(self, s: WorkerSession) -> Any:
        """The session's next output (starting its next queued item if idle), or None:
        idle, just finished, or failed (the client has been told)."""
        if s.token not in self.sessions:
            return None
        if s.gen is None:
            if not s.queue:
                return None
            self._begin(s, s.queue.popleft())
            if s.gen is None:
                return None
        self.current = s
        try:
            return next(s.gen)  # type: ignore[arg-type]
        except StopIteration:
            self.latencies.append(time.monotonic() - s.started)
            self.stats["processed"] += 1
            self._finish(s)
        except Exception as e:  # noqa: BLE001 - the engine failed this item only
            self._failed(s, e)
        finally:
            self.current = None
        return None

    def step_batched(self) -> None:
        """Renderers: take the next frame of every busy session and draw them in one
        ``render_batch`` call (one grid_sample for all on a GPU)."""
        batch: list[tuple[WorkerSession, Any]] = []
        now = time.monotonic()
        for s in list(self.sessions.values()):
            if s.not_before > now:
                continue  # a live session far enough ahead: leave the core to the others
            if self._held_back(s, now):
                continue
            job = self._advance(s)
            if job is None:
                continue
            if isinstance(job, Output):
                self.route(s, job)
                continue
            self.current = s  # the slot is this session's
            try:
                job.output.tensors = [self.alloc(job.shape, np.uint8)]
            except Exception as e:  # noqa: BLE001 - e.g. every slot busy past the timeout
                self._failed(s, e)
                continue
            finally:
                self.current = None
            batch.append((s, job))
            if s.realtime:
                self._pace(s, job.output.seq, now)
        if not batch:
            return
        try:
            self.engine.render_batch([(s.state, job.row, job.output.tensors[0]) for s, job in batch])
        except Exception as e:  # noqa: BLE001
            for s, _ in batch:
                self._failed(s, e)
            return
        for s, job in batch:
            self.route(s, job.output)

    def _pace(self, s: WorkerSession, k: int, now: float) -> None:
        """Bound how far a live session is drawn ahead of its viewer: frames made too early
        only wait in memory (and take the core from sessions that are behind)."""
        period = 1.0 / s.fps
        if s.clock is None or k < s.clock[1] or s.clock[0] + (k - s.clock[1]) * period < now - 1.0:
            s.clock = (now, k)  # a stream (re)starts, or we fell far behind: start over
        t0, k0 = s.clock
        s.not_before = t0 + (k + 1 - k0) * period - LIVE_LEAD_S

    def _failed(self, s: WorkerSession, e: BaseException) -> None:
        self.stats["errors"] += 1
        if not isinstance(e, GirisError):
            log.exception("engine failed", extra={"stage": self.stage})
        self.error_to_client(s, e)
        self._finish(s)

    def _begin(self, s: WorkerSession, msg: P.Message) -> None:
        try:
            arrays = self.pools.arrays(msg)
        except GirisError as e:
            self.stats["dropped"] += 1
            log.warning("dropped input", extra={"error": str(e)})
            self.pools.release_all(msg)
            return
        item = StageInput(type=msg.type, seq=msg.seq, pts=msg.pts, meta=msg.meta, tensors=arrays)
        s.current = msg
        s.started = time.monotonic()
        # (a live session's booking goes on: an item queued behind one still playing is due
        # when that one has played; after a pause it starts a stream again, see _urgency)
        s.fresh = True
        trace = msg.meta.get("trace")
        if type(trace) is list and len(trace) < MAX_TRACE:  # a traced request: stamp it
            s.trace = (msg.meta.get("utterance"), [*trace, [f"{self.stage} in", s.started]])
        work = self.engine.jobs if self.batching else self.engine.process
        s.gen = iter(work(item, s.state))

    def _finish(self, s: WorkerSession) -> None:
        if s.gen is not None:
            s.gen.close()
        s.gen = None
        if s.current is not None:
            self.pools.release_all(s.current)
        s.current = None
        self._free_allocs(s)

    def _free_allocs(self, s: WorkerSession) -> None:
        for slot in s.allocs.values():
            self.pool.release(slot.index, slot.lease)  # type: ignore[union-attr]
        s.allocs.clear()

    def alloc(self, shape: tuple, dtype: Any) -> np.ndarray:
        """An output buffer inside a pool slot (zero-copy to the consumer)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        s = self.current
        if self.pool is None or s is None or nbytes > self.pool.slot_bytes:
            return np.empty(shape, dtype)
        try:
            slot = self._alloc_slot(s.tag)
        except PoolFull:
            if self.spec.get("backpressure") != "drop":
                raise
            arr = np.empty(shape, dtype)
            self.scratch.add(arr.__array_interface__["data"][0])
            return arr
        arr = slot.array[:nbytes].view(dtype).reshape(shape)
        s.allocs[arr.__array_interface__["data"][0]] = slot
        return arr

    def _alloc_slot(self, tag: int) -> Slot:
        """A free slot; with ``backpressure = "block"``, waiting up to ``block_timeout`` for
        one while still heartbeating: a consumer that holds every slot is not a hung
        worker (it used to get this one killed and restarted after ``worker_timeout``)."""
        pool = self.pool
        assert pool is not None
        if self.spec.get("backpressure") == "drop":
            return pool.alloc(owner=tag, timeout=0.0)
        deadline = time.monotonic() + self.block_timeout
        while True:
            left = deadline - time.monotonic()
            try:
                return pool.alloc(owner=tag, timeout=max(0.0, min(left, self.beat_every / 2)))
            except PoolFull:
                now = time.monotonic()
                if now >= deadline:
                    raise
                self._beat_if_due(now)

    def busy(self) -> int:
        """Sessions with work waiting, other than the one being stepped; 0 asked from
        another thread (a voice loading for a session being opened warms every net it
        has, as if alone)."""
        if threading.get_ident() != self.loop_thread:
            return 0
        return sum(1 for s in list(self.sessions.values())
                   if s is not self.current and (s.gen is not None or s.queue))

    def _beat_every(self, every: Any) -> None:
        """Beat every ``every`` s from now (the supervisor's current interval; None: keep
        it), the first at once: the beat says the interval, and the supervisor judges
        this worker hung by it until then."""
        if isinstance(every, (int, float)) and every > 0 and every != self.beat_every:
            self.beat_every = float(every)
            self.next_beat = time.monotonic()

    def _beat_if_due(self, now: float) -> None:
        if now >= self.next_beat:
            self.heartbeat()
            self.next_beat = now + self.beat_every

    def route(self, s: WorkerSession, out: Output) -> None:
        if s.realtime:
            self._played(s, out, time.monotonic())
        msg = P.Message(type=out.type, session=s.token, seq=out.seq, pts=out.pts, meta=out.meta)
        if s.trace is not None:  # the first output since a traced input carries its stamps
            utt, stamps = s.trace
            s.trace = None
            if out.meta.get("utterance") == utt:  # (not if that utterance ended without one)
                msg.meta = {**out.meta, "trace": [*stamps, [f"{self.stage} out", time.monotonic()]]}
        if self.last and out.meta.get("final"):  # the pipeline's end of this utterance
            msg.meta = {**msg.meta, "end": True}
        client_copy = None
        for t in out.tensors:
            addr = t.__array_interface__["data"][0] if t.nbytes else 0
            if addr in self.scratch:  # backpressure policy "drop": the consumer is behind
                self.scratch.discard(addr)
                self.stats["dropped"] += 1
                self.pools.release_all(msg)  # slots of the tensors before it, never sent
                if msg.meta.get("end"):
                    # its final frame dropped, the utterance never ended (no
                    # ``utterance_done``, its client waiting out its timeout): a ``mark``
                    # carries the end, as for an utterance with no frames
                    send(self.output, P.Message(P.MARK, session=s.token, seq=msg.seq, pts=msg.pts,
                                                meta=msg.meta))
                return
            slot = s.allocs.pop(addr, None)
            if slot is not None:
                # the label says where the bytes are (host shared memory), not where the stage
                # computes: a stage on cuda:0 copies its frames into this CPU pool
                msg.tensors.append(self.pool.ref(slot, t))  # type: ignore[union-attr]
            else:
                msg.add_inline(t)
        self.stats["outputs"] += 1
        if self.last or out.downstream:
            send(self.output, msg)
        if out.to_client and not self.last:
            if any(r.pool for r in msg.tensors):  # one consumer per slot: the client gets a copy
                client_copy = P.Message(msg.type, msg.session, msg.seq, msg.pts, msg.meta)
                for t in out.tensors:
                    client_copy.add_inline(t)
            send(self.sink, client_copy or msg)

    def error_to_client(self, s: WorkerSession, exc: BaseException) -> None:
        msg = P.error(_error(exc), session=s.token)
        msg.meta["stage"] = self.stage
        if s.current is not None and "utterance" in s.current.meta:
            msg.meta["utterance"] = s.current.meta["utterance"]
        send(self.sink, msg)

    # ------------------------------------------------------------------ control replies
    def reply(self, req: Any, **meta: Any) -> None:
        send(self.control, P.Message(P.REPLY, meta={"req": req, **meta}))

    def heartbeat(self) -> None:
        held: dict[str, int] = {}
        for s in self.sessions.values():
            for dev, n in self._held(s.state).items():
                held[dev] = held.get(dev, 0) + int(n)
        lat, self.latencies = self.latencies[-256:], []
        send(self.control, P.Message(P.HEARTBEAT, meta={
            "pid": os.getpid(), "every": self.beat_every, "sessions": len(self.sessions),
            "queued": sum(len(s.queue) for s in self.sessions.values()),
            "held": held, "latencies": lat, **self.stats}))

    def _held(self, state: Any) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in (self.engine.held(state) or {}).items()}
        except Exception:  # noqa: BLE001
            return {}

    def shutdown(self) -> None:
        self.opener.shutdown(wait=True, cancel_futures=True)
        for token in list(self.sessions) + list(self.opening):
            self.close(token)
        self.finish_opens()
        self.pools.close()
        self.ctx.destroy(linger=500)


def _spec(spec: dict, avatar: bytes | None) -> dict:
    spec = dict(spec)
    if avatar is not None:
        spec["avatar"] = avatar
    return spec


def _with_avatars(reply: P.Message) -> Iterator[tuple[dict, bytes | None]]:
    for entry in reply.meta.get("sessions", []):
        i = entry.get("avatar_buffer")
        yield entry, (bytes(reply.buffers[i]) if i is not None else None)


def _error(e: BaseException) -> GirisError:
    if isinstance(e, GirisError):
        return e
    return GirisError(f"{type(e).__name__}: {e}", code="internal")


def _wire(e: BaseException) -> dict:
    return _error(e).to_wire()


def main() -> None:
    spec = json.loads(os.environ["GIRIS_WORKER"])
    setup_logging(spec.get("log_level", "WARNING"), spec.get("log_json", False))
    worker = StageWorker(spec)

    def stop(*_: Any) -> None:
        # In the loop: finish the step and leave it cleanly. While loading (or already
        # on the way out, in an atexit hook) raising would only print a traceback.
        if not worker.running:
            return
        worker.running = False
        if not worker.looping:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    try:
        try:
            worker.start()
        except GirisError as e:
            # a configuration the engine cannot work with: one clear line, not a traceback
            # (the supervisor restarts us and, if it keeps happening, marks the stage failed)
            log.critical("engine cannot start", extra={"stage": spec.get("stage"), "engine": spec.get("engine"),
                                                       "code": e.code, "error": str(e)})
            raise SystemExit(78) from None  # EX_CONFIG
        except Exception as e:  # noqa: BLE001 - a bug or a broken install: logged as the
            # rest is (a bare traceback broke --log-json's one object per line)
            log.critical("engine failed to start", exc_info=True,
                         extra={"stage": spec.get("stage"), "engine": spec.get("engine"),
                                "error": f"{type(e).__name__}: {e}"})
            raise SystemExit(1) from None
        worker.looping = True
        try:
            worker.run()
        except Exception as e:  # noqa: BLE001 - the supervisor restarts us
            log.critical("worker failed", exc_info=True,
                         extra={"stage": spec.get("stage"), "error": f"{type(e).__name__}: {e}"})
            raise SystemExit(1) from None
    finally:
        worker.running = False
        worker.shutdown()


if __name__ == "__main__":
    main()
