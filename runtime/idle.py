"""The avatar alive between utterances: ``session.idle()`` streams silence into it.

A live avatar that stops getting audio stops getting frames, and a player shows the last
one frozen. The motion stage animates silence as it does speech (blinks, the slow sway,
the mouth at rest), so an idle stream is live audio of silence, sent by a thread at the
pace the session is played (a live session: the wall clock, a little ahead; an offline
one: as fast as the server's audio budget takes it). On the wire it is ``audio_in``
marked ``idle``, and the frames come as any utterance's.

A ``say``, an ``idle`` or a ``send_audio`` of a new utterance on the session stops
feeding it. In a live session the idle stream plays on until the new utterance's first
frame takes over on the server: its frames due before that one still play, the rest are
dropped, and its stream ends (``utterance_done``, ``cancelled``), so the picture never
stops between them and the speech is not queued behind up to :data:`LEAD_S` of idle
frames. An offline session's idle stream is cut at once (a cancel; a loop over it
ends). ``stop()`` ends it gracefully instead. Like any stream, one that is not read
holds the frames that came for it (a zero-copy session's pool share): leave a loop over
it with ``close()``, ``stop()`` or the next ``say``.
"""
from __future__ import annotations

import threading
import time
import weakref
from typing import TYPE_CHECKING

import numpy as np

from giris.runtime.client import Speech
from giris.runtime.errors import BadInput, GirisError

if TYPE_CHECKING:
    from giris.runtime.client import Session

#: the silence's sample rate (the acoustic path's cost grows with it; silence has no band)
RATE = 16000
#: audio a live session's idle stream keeps sent ahead of the wall clock: enough for the
#: pipeline's latency and a hiccup of this thread, little to drop when speech takes over
LEAD_S = 0.3
#: an offline session's: it runs at OFFLINE_SPEED × real time, within the audio budget
#: (4× over a 12 s burst, see ``supervisor/sessions.py``)
OFFLINE_LEAD_S = 8.0
OFFLINE_SPEED = 3.0


class Idle(Speech):
    """What :meth:`Session.idle` returns: the idle utterance's items (frames, the silence
    as audio chunks and, where wanted, coefficients; then its ``utterance_done``),
    iterable like :meth:`Session.say`'s. Leaving the loop early or ``close()`` (from any
    thread) cancels it; ``stop()`` ends it after what was sent."""

    def __init__(self, session: "Session", seconds: float | None, chunk_s: float) -> None:
        if seconds is not None and not (isinstance(seconds, (int, float)) and 0 < seconds < 86400):
            raise BadInput(f"idle seconds must be a positive number (or None: until stopped), got {seconds!r}")
        if not (isinstance(chunk_s, (int, float)) and 0.02 <= chunk_s <= 2.0):
            raise BadInput(f"idle chunk_s must be in 0.02..2 s, got {chunk_s!r}")
        self.session = session
        self.chunk = int(round(chunk_s * RATE))
        self.total = None if seconds is None else max(1, int(round(seconds * RATE)))
        first = self.chunk if self.total is None else min(self.chunk, self.total)
        self.sent = first
        self.ended = self.total is not None and first >= self.total
        self.utterance = session.send_audio(np.zeros(first, np.int16), RATE, final=self.ended, idle=True)
        self.error: GirisError | None = None
        self._lock = threading.Lock()  # one sender at a time (the feeder, stop, cut)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()
        #: its input can never go on (its last chunk sent, or cut, closed, failed)
        self._over = self.ended
        super().__init__(session, self.utterance, session.stream(self.utterance, cancel_on_exit=True))
        if not self.ended:
            self._start()

    def _start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_feed, args=(weakref.ref(self), self._t0,
                                        bool(self.session.spec.get("realtime"))),
                                        name="giris-idle", daemon=True)
        self._thread.start()

    def resume(self) -> None:
        """Feed it again after :meth:`halt` (the speech it made way for was refused), on
        its own clock, as if it had never stopped."""
        with self._lock:
            if self._over or not self.ended:
                return
            self.ended = False
            self._start()

    def stop(self) -> None:
        """End the idle stream once what was sent has played (its ``utterance_done``
        comes, ``complete``)."""
        self._halt()
        with self._lock:
            if not self._over:
                self.ended = self._over = True
                self._send(np.zeros(RATE // 25, np.int16), final=True)  # one frame closes it

    def halt(self) -> None:
        """Stop feeding it; what was sent plays (a live session's next utterance takes
        over from it on the server, its stream then ending ``cancelled``)."""
        self._halt()
        with self._lock:
            self.ended = True

    def cut(self) -> None:
        """End it now (speech comes): cancelled on the server, what waits there for its
        pacing slot dropped, and what already came of it dropped here (its zero-copy
        frames given back); a loop over it ends."""
        self._halt()
        with self._lock:
            self.ended = self._over = True
            self.session._abandon(self.utterance)  # (once: it knows what it abandoned)

    def close(self) -> None:
        self._halt()
        self.ended = self._over = True
        super().close()

    def _let_go(self) -> None:
        """Stop feeding without waiting for the thread (for an event loop: no join): it
        sees the flag and ends by itself, holding the stream only weakly."""
        self._stop.set()
        self.ended = self._over = True
        self._thread = None  # nothing for close() to join, should it be collected on a loop

    # ------------------------------------------------------------------ feeding
    def _halt(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(5.0)

    def _send(self, pcm: np.ndarray, final: bool) -> None:
        try:
            self.session.send_audio(pcm, RATE, utterance=self.utterance, final=final)
            self.sent += len(pcm)
        except GirisError as e:  # the session or the server is gone, or a limit: say so
            self.error = e
            self.ended = self._over = True
            try:
                self.session.cancel(self.utterance)  # its reader gets the end, then the error
            except GirisError:
                pass


def _feed(ref: "weakref.ref[Idle]", t0: float, realtime: bool) -> None:
    """Send the next chunk when it is due; a weak reference, so an Idle let go without
    ``close()`` is collected (and cancelled) rather than fed forever."""
    speed, lead = (1.0, LEAD_S) if realtime else (OFFLINE_SPEED, OFFLINE_LEAD_S)
    while True:
        idle = ref()
        if idle is None or idle._stop.is_set() or idle.ended:
            return
        due = t0 + (idle.sent / RATE - lead) / speed  # `lead` seconds of audio ahead
        stop = idle._stop
        del idle
        wait = due - time.monotonic()
        if wait > 0 and stop.wait(min(wait, 0.5)):
            return
        if wait > 0.5:
            continue
        idle = ref()
        if idle is None:
            return
        with idle._lock:
            if idle.ended or stop.is_set():
                return
            n = idle.chunk if idle.total is None else min(idle.chunk, idle.total - idle.sent)
            final = idle.total is not None and idle.sent + n >= idle.total
            if final:
                idle.ended = idle._over = True
            idle._send(np.zeros(n, np.int16), final=final)
        del idle

