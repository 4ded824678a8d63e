"""Results on their way to clients: frames, audio, coefficients and events.

Frames arrive as pool references. A zero-copy session gets the reference and releases
the slot itself; any other client gets the bytes and the slot is freed at once. Live
(``realtime``) sessions are paced to the wall clock: frame ``k`` leaves at
``t0 + (k - k0) / fps``; an offline consumer takes frames as fast as they come.

This module also keeps each utterance's books: its end (``utterance_done``), and what a
stage restart or failure cut from it.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

from giris.runtime import protocol as P
from giris.runtime.errors import GirisError, StageFailed
from giris.supervisor.sessions import SessionRecord, Utterance
from giris.workers.coefficients import frame_range

if TYPE_CHECKING:
    from giris.supervisor.process import WorkerHandle
    from giris.supervisor.supervisor import Supervisor

log = logging.getLogger("giris.delivery")

#: what stages before the last one send the client, each ending with a ``final`` message
CLIENT_STREAMS = frozenset({P.AUDIO, P.COEFFS})
#: how long an utterance whose frames have ended waits for those streams' ends
STREAM_GRACE_S = 1.0
#: a live stream that starts while others start too (their utterances asked for less than
#: ``CROWD_WINDOW_S`` ago) starts this much later per other one, at most ``CROWD_MAX_S``:
#: the first second of speech costs the voice the most (each clause's front, small
#: windows), and four live sessions started at once on two cores each ran dry once or
#: twice in it with 0.12 s in hand; with ~0.4 s, none did
CROWD_DELAY_S = 0.1
CROWD_WINDOW_S = 1.0
CROWD_MAX_S = 0.4


class Delivery:
    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup
        #: (due, order, token, message, refs to release after sending)
        self.paced: list[tuple[float, int, str, P.Message, list]] = []
        self._order = itertools.count()
        #: token -> (t0, k0, last_due, utterance): frame k0 is due at t0 (k0 None until a
        #: frame anchors it); ``utterance`` that of the last frame
        self.clock: dict[str, tuple[float, int | None, float, Any]] = {}
        self.frames_out = 0
        self.errors: dict[str, int] = {}

    # ------------------------------------------------------------------ results
    def on_result(self, msg: P.Message) -> None:
        sup = self.sup
        rec = sup.registry.lookup(msg.session)
        utt = rec.utterances.get(msg.meta.get("utterance")) if rec else None
        if rec is None or utt is None or utt.cancelled:
            sup.pools.release_all(msg)  # closed, cancelled or finished: nothing may linger
            return
        now = time.monotonic()
        utt.last_progress = now
        if type(msg.meta.get("trace")) is list:
            msg.meta["trace"].append(["supervisor", now])
        want = rec.spec.get("want", ())
        if msg.type == P.EVENT:  # an engine error for this utterance ends it, everywhere
            self.count_error(str(msg.meta.get("code", "internal")))
            # the other stages drop the rest of it: they made it on (a live one at its pace,
            # ~10 s for a long text), and the session's next utterance waited behind it.
            # The error and the end go at once, and what of it waits for its pacing slot is
            # dropped (a reader stops at the error; zero-copy frames held their slots until
            # their time, and the next utterance failed with pool_full for want of them)
            sup.gateway.stop_stages(rec, utt.id)
            sup.gateway.to(rec.client, msg)
            self.utterance_done(rec, utt, complete=False, at_once=True, error=msg.meta.get("code"))
            return
        if msg.type == P.AUDIO:
            start = int(msg.meta.get("start_sample", 0))
            end = start + (msg.tensors[0].shape[0] if msg.tensors else 0)
            rec.audio_end = max(rec.audio_end, end)
            rec.audio_chunks = max(rec.audio_chunks, msg.seq + 1)
            if utt.audio_start is None:
                utt.audio_start, utt.sample_rate = start, int(msg.meta.get("sample_rate", 0))
            utt.audio_stop = max(utt.audio_stop, end)
            if "audio" in want:
                self.send(rec, msg)
        elif msg.type == P.COEFFS:
            if "coeffs" in want:
                self.send(rec, msg)
        elif msg.type == P.FRAME and not self.take(msg, 0 if rec.zero_copy and "frames" in want else None):
            pass  # lost with its renderer: not counted, not sent (its end still counts below)
        elif msg.type == P.FRAME:
            utt.frames += 1
            utt.first_seq = msg.seq if utt.first_seq is None else min(utt.first_seq, msg.seq)
            utt.last_seq = max(utt.last_seq, msg.seq)
            rec.frames_out += 1
            rec.last_frame = max(rec.last_frame, msg.seq)
            self.frames_out += 1
            if utt.first_frame_at is None:
                utt.first_frame_at = now
                if sup.metrics is not None:
                    sup.metrics.on_first_frame(now - utt.said_at)
            if sup.metrics is not None:
                sup.metrics.on_frame()
            if "frames" in want:
                self.send_frame(rec, msg)
            else:
                sup.pools.release_all(msg)
        if msg.meta.get("final"):
            if msg.type in CLIENT_STREAMS:
                utt.finals.add(msg.type)
            if msg.type in (P.FRAME, P.MARK) or msg.meta.get("end"):  # the last stage's end
                utt.ended_at = now
            self.maybe_done(rec, utt, now)

    def maybe_done(self, rec: SessionRecord, utt: Utterance, now: float) -> None:
        """Done when the last stage ended the utterance and the streams the stages before it
        send the client (audio, coefficients) ended too. They come on other connections:
        a stage's copy for the client may reach us after the frames it led to, and a client
        that stops reading at ``utterance_done`` would lose it. A stream whose end never
        comes (an engine that sends none) is given up after ``STREAM_GRACE_S``."""
        if utt.ended_at is None:
            return
        if self.streams() <= utt.finals or now - utt.ended_at > STREAM_GRACE_S:
            self.utterance_done(rec, utt, complete=self.whole(rec, utt))

    def whole(self, rec: SessionRecord, utt: Utterance) -> bool:
        """Whether ``utt`` reached the client whole: never cut by a stage restart, or cut
        by one after the first stage and still every frame of its audio came. Every
        utterance in flight at a restart was reported incomplete, even with all its frames
        (60 of 60, a render restart between two of its chunks), and ``giris say`` failed."""
        if not utt.interrupted:
            return True
        if utt.source_cut or utt.audio_start is None or utt.sample_rate <= 0 or utt.first_seq is None:
            return False
        if P.AUDIO not in utt.finals:
            return False
        fps = float(rec.spec.get("fps", 25))
        want = frame_range(utt.audio_start, utt.audio_stop - utt.audio_start, utt.sample_rate, fps)
        return (len(want) > 0 and utt.frames == len(want) and utt.first_seq == want.start
                and utt.last_seq == want.stop - 1)

    def streams(self) -> frozenset[str]:
        """The streams whose ends an utterance waits for: those the pipeline makes (one
        that stops at tts has no coefficients to wait for)."""
        offers = self.sup.offers()
        if offers is None:
            return CLIENT_STREAMS
        return frozenset(t for t, name in ((P.AUDIO, "audio"), (P.COEFFS, "coeffs")) if name in offers)

    def take(self, msg: P.Message, holder: int | None = None) -> bool:
        """Hold the pool slots of ``msg`` for the supervisor (its pid as their holder; or
        ``holder``: 0 for a zero-copy client, which gives them back itself), or say False
        when they are gone.

        Held, they are the supervisor's from here: a renderer that dies while the frame
        waits (in the outbox for a client slow to read) no longer takes them with it (its
        slots are reclaimed by holder pid): the frames a copy-taking client had not read
        yet were lost, though counted in ``utterance_done`` and ``last_frame``. Gone: a
        frame its renderer sent just before it died, read here after its slots were
        reclaimed (``on_worker_exit``); a zero-copy client got the stale reference, and
        its read raised ``StaleReference`` out of the user's loop. Such a frame is dropped
        here (any slot of it still held given back) and not counted."""
        try:
            for r in msg.tensors:
                if r.pool is not None:
                    pool = self.sup.pools.get(r.pool)
                    pool.check(r)  # a stale reference raises, saying why
                    pool.hold(r.slot, r.lease, pid=holder)
        except GirisError as e:
            log.warning("frame lost with its renderer", extra={"error": str(e)})
            self.sup.pools.release_all(msg)
            return False
        return True

    def send_frame(self, rec: SessionRecord, msg: P.Message) -> None:
        if rec.zero_copy:  # the client holds its slots (take), until it releases them
            self.send(rec, msg)
            return
        if not rec.realtime:  # copied out of its slot when it leaves (see the outbox)
            self.sup.gateway.to(rec.client, msg, inline=True)
            return
        out = self.sup.gateway.outbox.copied(msg)  # a live frame waits for its time as a copy
        if out is not None:
            self.sup.pools.release_all(msg)
            self.send(rec, out)

    def send(self, rec: SessionRecord, msg: P.Message) -> None:
        if not rec.realtime or msg.type == P.AUDIO:
            # A live player's audio is its clock and goes out as it comes (up to the voice's
            # lead, ~1 s, ahead of its frames): held behind the paced frames before it, it
            # came 1-38 ms before its own first frame, with nothing in hand for a jitter
            # buffer. A player schedules audio and frames by pts (README).
            self.sup.gateway.to(rec.client, msg)
            return
        now = time.monotonic()
        delay = float(rec.spec.get("playout_delay", 0.0))
        t0, k0, last_due, last_utt = self.clock.get(rec.token, (now, None, now, None))
        utt = msg.meta.get("utterance")
        if msg.type == P.FRAME:
            fps = float(rec.spec.get("fps", 25))
            first = rec.utterances.get(utt)
            if first is not None and first.frames == 1 and self.take_over(rec, utt, now + delay):
                t0, k0, last_due, last_utt = self.clock.get(rec.token, (now, None, now, None))
            due = t0 + (msg.seq - (k0 or 0)) / fps
            starts = k0 is None or utt != last_utt
            if (k0 is None or starts and due < now + delay or due < now - 1.5 / fps
                    or due > now + 5.0 + delay):
                # the stream (re)starts: anchor the clock a playout delay ahead. So does
                # an utterance that would follow the one before with less than that in
                # hand: it would have none for its own start-up (a pause between two
                # utterances is speech; a stall in one is not). A stream's start (not a
                # late frame's) also gets the cushion for the others starting with it
                crowd = self.crowd_delay(rec, now, delay) if starts else 0.0
                t0, k0 = now + delay + crowd, msg.seq
                due = t0
            last_utt = utt
        else:
            due = last_due  # events and audio keep their place behind paced frames
        due = max(due, last_due)
        self.clock[rec.token] = (t0, k0, due, last_utt)
        if due <= now and not self.paced:
            self.sup.gateway.to(rec.client, msg, droppable=msg.type == P.FRAME)
        else:
            heapq.heappush(self.paced, (due, next(self._order), rec.token, msg, []))

    def take_over(self, rec: SessionRecord, utterance: Any, at: float) -> bool:
        """A live utterance's first frame takes over from the session's idle streams that
        its request stopped (``Utterance.yields``, ``stopped``; one started after it
        follows it): their frames due before ``at`` (where this one's first frame
        will be) still play, the rest are dropped, their stages stop, and each ends
        (``cancelled``) right after its last frame kept. The client cut them as it spoke
        before: nothing was shown for 160-270 ms, the idle frames already made dropped
        and the new ones not yet due. Whether any did."""
        idle = [u for u in rec.utterances.values()
                if u.yields and u.stopped and u.id != utterance and not u.cancelled]
        if not idle:
            return False
        ids = {u.id for u in idle}
        keep, last, dropped = [], None, {}
        for p in self.paced:
            if p[2] != rec.token:
                keep.append(p)
            elif p[3].meta.get("utterance") in ids and p[0] >= at:
                self.sup.pools.release_all(p[3])
                if p[3].type == P.FRAME:
                    dropped[p[3].meta["utterance"]] = dropped.get(p[3].meta["utterance"], 0) + 1
            elif p[0] >= at:
                # the speech's own coefficients, queued behind the idle frames just dropped
                # (with coefficients wanted, its first frame and the idle's end waited for
                # that tail: a 320 ms gap): they go with its first frame, in their order
                keep.append((at, *p[1:]))
            else:
                keep.append(p)
                last = p[0] if last is None else max(last, p[0])
        heapq.heapify(keep)
        self.paced = keep
        for u in idle:
            u.frames -= dropped.get(u.id, 0)
            self.utterance_done(rec, u, complete=False, due=0.0 if last is None else last, cancelled=True)
        # the clock starts over at this utterance (k0 None: anchored a playout delay out)
        t0, _, _, _ = self.clock.get(rec.token, (at, None, at, None))
        self.clock[rec.token] = (t0, None, last if last is not None else time.monotonic(), None)
        return True

    def crowd_delay(self, rec: SessionRecord, now: float, delay: float) -> float:
        """The cushion a live stream starting now gets for the others starting with it
        (none for a session that asked for no playout delay)."""
        if delay <= 0:
            return 0.0
        crowd = sum(1 for r in self.sup.registry if r is not rec and r.realtime
                    and any(now - u.said_at < CROWD_WINDOW_S for u in r.utterances.values()))
        return min(CROWD_MAX_S, crowd * CROWD_DELAY_S)

    def next_due(self) -> float:
        if not self.paced:
            return 1.0
        return max(0.0, self.paced[0][0] - time.monotonic())

    def tick(self, now: float) -> None:
        while self.paced and self.paced[0][0] <= now + 0.0005:
            _, _, token, msg, _ = heapq.heappop(self.paced)
            rec = self.sup.registry.lookup(token)
            if rec is not None:  # a live frame its client cannot take now is late: dropped
                self.sup.gateway.to(rec.client, msg, droppable=msg.type == P.FRAME)
        lost_after = self.sup.config.timeouts.lost_after
        for rec in self.sup.registry:
            oldest = True
            for utt in rec.live_utterances():
                if utt.ended_at is not None:
                    self.maybe_done(rec, utt, now)
                    continue
                # Only the oldest utterance still being made can be lost: those behind it
                # wait for it (a tts makes a session's utterances in turn), and one queued
                # behind a long one was declared lost lost_after into the restart though
                # it was made after it. Their wait starts when the one before them ends
                # (utterance_done refreshes it).
                if oldest and utt.interrupted and now - utt.last_progress > lost_after:
                    self.count_error("utterance_lost")
                    self.utterance_done(rec, utt, complete=False, lost=True)
                oldest = False

    def flush(self) -> None:
        self.tick(float("inf"))
        self.paced.clear()

    def drop_paced(self, rec: SessionRecord, utterance: int | None = None) -> int:
        """Take what waits for its pacing slot out of the queue: the session's items of
        ``utterance`` (all of them when None); the frames among them, counted. Zero-copy
        frames give their slots back (the client never saw them). The session's clock
        starts over, so what comes next leaves a playout delay after it is made, not behind
        the dropped frames' slots."""
        keep, dropped, frames = [], 0, 0
        for p in self.paced:
            if p[2] == rec.token and (utterance is None or p[3].meta.get("utterance") == utterance):
                dropped += 1
                if p[3].type == P.FRAME:
                    frames += 1
                    self.sup.pools.release_all(p[3])  # inline copies have no pool refs
            else:
                keep.append(p)
        if dropped:
            heapq.heapify(keep)
            self.paced = keep
        left = [p[0] for p in self.paced if p[2] == rec.token]
        if not left:
            self.clock.pop(rec.token, None)
        elif rec.token in self.clock:  # another utterance still waits: keep its order
            t0, k0, _, last_utt = self.clock[rec.token]
            self.clock[rec.token] = (t0, k0, max(left), last_utt)
        return frames

    def playing(self, rec: SessionRecord, utterance: int | None) -> dict[int, P.Message]:
        """The session's utterances (``utterance``, or all when None) that its stages are
        done with but whose frames and ``utterance_done`` still wait in the pacing queue,
        each with that ``utterance_done``: a live utterance is drawn up to
        ``LIVE_LEAD_S`` ahead, and once its last frame is made it is no longer the
        session's (``utterance_done`` is queued behind its frames). ``cancel`` found
        nothing to cut then (``cancelled: []``) and up to a second and a half of its
        frames played on after it."""
        return {p[3].meta["utterance"]: p[3] for p in self.paced
                if p[2] == rec.token and p[3].type == P.EVENT
                and p[3].meta.get("kind") == "utterance_done"
                and (utterance is None or p[3].meta.get("utterance") == utterance)}

    def cut_playing(self, rec: SessionRecord, playing: dict[int, P.Message]) -> None:
        """Cut the utterances ``playing`` (see :meth:`playing`) as a cancel cuts one still
        being made: what of them waits for its pacing slot is dropped and their
        ``utterance_done`` (``cancelled``, not complete; ``frames``: those the client got)
        goes at once."""
        for uid, done in playing.items():
            frames = int(done.meta.get("frames", 0)) - self.drop_paced(rec, uid)
            meta = {k: v for k, v in done.meta.items() if k not in ("kind", "complete", "frames")}
            self.sup.gateway.to(rec.client, P.event("utterance_done", session=rec.token, **{
                **meta, "frames": frames, "complete": False, "cancelled": True}))

    def forget(self, rec: SessionRecord) -> None:
        self.drop_paced(rec)  # every item of the session, and its clock

    # ------------------------------------------------------------------ utterances
    def utterance_done(self, rec: SessionRecord, utt: Utterance, complete: bool,
                       at_once: bool = False, due: float | None = None, **extra: Any) -> None:
        """End ``utt``: paced after its frames, or answered at once (``at_once``, or cut
        short by its client), or paced at ``due`` (an idle stream a takeover ended: its
        frames due before the speech still play, then its end)."""
        if rec.utterances.pop(utt.id, None) is None:
            return
        now = time.monotonic()
        for u in rec.utterances.values():  # the next one's wait for progress starts now
            u.last_progress = max(u.last_progress, now)
        if utt.frames == 0 and due is None:
            # one that would have taken over from the idle streams it stopped ended without
            # a frame (an error, a cancel): they, no longer fed by their client, end too
            for u in [u for u in rec.utterances.values() if u.yields and u.stopped]:
                self.utterance_done(rec, u, complete=False, cancelled=True)
        ev = P.event("utterance_done", session=rec.token, utterance=utt.id, frames=utt.frames,
                     complete=complete, **extra)
        if due is not None:
            utt.cancelled = True  # what of it the stages still send is dropped on arrival
            heapq.heappush(self.paced, (due, next(self._order), rec.token, ev, []))
        elif at_once or extra.get("cancelled"):
            # Cut short by the client: answered at once, never paced. What of it still waits
            # for its pacing slot is dropped, so nothing of the utterance follows its end (a
            # client may stop reading here) and the next utterance does not wait behind it.
            # ``frames`` counts those the client got.
            utt.cancelled = True
            ev.meta["frames"] = utt.frames - self.drop_paced(rec, utt.id)
            self.sup.gateway.to(rec.client, ev)
        else:
            self.send(rec, ev)

    def stage_down(self, w: "WorkerHandle") -> None:
        """A stage died: what is in flight may be cut; mark it so it cannot hang a client."""
        source = bool(self.sup.workers) and self.sup.workers[0] is w
        for rec in self.sup.registry:
            for utt in rec.utterances.values():
                utt.interrupted = True
                utt.source_cut = utt.source_cut or source
                utt.last_progress = time.monotonic()

    def stage_restarted(self, w: "WorkerHandle") -> None:
        source = self.sup.workers and self.sup.workers[0] is w
        for rec in self.sup.registry:
            self.send(rec, P.event("stage_restarted", session=rec.token, stage=w.stage,
                                   restarts=w.restarts, last_frame=rec.last_frame,
                                   interrupted=sorted(rec.utterances)))
            if not source:
                continue
            for utt in rec.live_utterances():
                # The text of a say whose audio had not ended died with the first stage:
                # nothing more of it can come, so it ends now, not after ``lost_after``
                # (its client waited 5 s for nothing). The stages behind drop what they
                # hold of it.
                if utt.interrupted and utt.from_text and P.AUDIO not in utt.finals:
                    self.sup.gateway.stop_stages(rec, utt.id)
                    self.count_error("utterance_lost")
                    self.utterance_done(rec, utt, complete=False, lost=True)

    def stage_failed(self, w: "WorkerHandle") -> None:
        """A stage failed for good: each utterance in flight ends with the error (in its
        own stream, ``meta.utterance``) and ``utterance_done`` at once. A session with
        nothing in flight is told nothing: one session-level error went to every session,
        so a second stream in flight waited out its timeout (only the first reader raised
        it), and an idle session's next say, after the stage was back, raised it."""
        err = StageFailed(f"stage {w.stage} crashed {w.restarts + 1} times: failed, {w.retry_note()}",
                          stage=w.stage)
        for rec in self.sup.registry:
            for utt in rec.live_utterances():
                self.count_error("stage_failed")
                self.sup.gateway.end_utterance(rec, utt, err)

    def count_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1
        if self.sup.metrics is not None:
            self.sup.metrics.on_error(code)
