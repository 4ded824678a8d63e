"""``visemes`` coeffs engine: phoneme timings + audio → per-frame visemes and blendshapes.

Why this design:

* **Coarticulation (Cohen & Massaro 1993).** A mouth never hits each phoneme's shape in
  turn; each segment exerts a *dominance* ``α·exp(-d/reach)`` that decays with the
  distance ``d`` from its core, and the frame's shape is the dominance-weighted mean of
  the targets. Lip closures (p b m) and lip-teeth contacts (f v) dominate strongly so they
  are always seen; /h/, schwa and the glottal stop are weak and borrow their neighbours'
  shapes; lip rounding reaches further ahead than the rest (anticipatory rounding).
  Tables live in :mod:`giris.workers.visemes`.
* **Streaming.** The last ~0.4 s of segments and the last half window of audio are kept
  in the session, so frames after a chunk boundary see the previous chunk's phonemes and
  samples (carry-over coarticulation and loudness are exactly continuous). Anticipation
  of the *next* chunk comes from the phonemes a chunk carries ahead (``phonemes_ahead``:
  Piper chunks are windows of one clause, whose phonemes are all known): they shape this
  chunk's last frames and are forgotten, to be read again as the next chunk's own. A
  chunk without them (the end of a clause, live audio) anticipates nothing.
* **Audio envelope.** Opening channels (jaw, lip raise/lower, stretch, funnel) are scaled
  by the frame's loudness, so whispered or quiet words open less; closures are not
  scaled (a /p/ closure is silent yet must be seen). Loudness is RMS over one frame period
  around the frame's instant, in dB relative to a slowly decaying running peak (an
  automatic gain control that works for Piper's normalised audio and for a quiet mic).
* **A frame's instant is the middle of its display interval.** Frame ``k`` has pts
  ``k / fps`` and stays on screen until ``(k + 1) / fps``, so it shows the mouth at
  ``(k + frame_phase) / fps`` (``frame_phase`` 0.5): phonemes are evaluated there and its
  loudness window is the interval itself. At ``k / fps`` every frame showed the sound of
  half a frame (20 ms at 25 FPS) earlier than the sound heard while it is on screen, and
  the mouth closed that much late after speech. The window of a chunk's last frame is
  cut at the chunk's last sample (the next samples are not here yet).
* **Pauses close at once.** A pause (``sil``) is at full dominance from its first instant,
  not from a quarter of the way in like a sound's core: the mouth settles while the sound
  stops, and the last sound's carry-over alone shapes the release.
* **A silent stop before a pause ends with its sound.** Piper gives a stop before a pause
  (/t/ in "that's it.", /k/ in "I like.") its whole closure, ~0.1 s in which nothing is
  heard; the stop's pose held the jaw ~0.1 open through it and closed only at the pause.
  Where such stops and the sound before them fall ``stop_quiet_db`` under the running
  peak for ``_QUIET_RUN_S`` (or to the pause), they end there and the pause starts: the
  mouth settles as the sound dies. A voiced stop (/d/ in "good,") murmurs through its
  closure ~25-30 dB under the vowel (the voice bar): from ``_MURMUR_LEAD_S`` before its
  token on (Piper's alignment often gives the vowel the closure's start), ``stop_voiced_db``
  under the peak is quiet enough (the murmur held /d/'s pose: the jaw settled ~27 ms late).
  Where the audio does not tell in time (a loud murmur, noise), the stops let go
  ``stop_hold_s`` after their token starts. Lips (/p b m/ among or before the stops) shut as the sound
  stops (or at their token), stay shut for a closure, ``stop_hold_s``, and are let go to
  rest, the release: they were held pressed to the pause token (up to 150 ms after the
  sound), a frozen pose. An /f v/ before the stops keeps its whole time. The quiet is
  read from the audio in 5 ms hops, kept as long as the segments.
* **Audio-only path** (``phonemes is None``, live ``audio_in``): RMS → openness; spectral
  shape (low-band ratio → voicing, high-band ratio → fricative /s/, spectral centroid →
  rounded vs spread lips) → viseme weights, lightly smoothed. numpy FFT only. Loudness
  alone opened the mouth for any sound, so it is measured above the steady background
  (:mod:`giris.workers.noise_floor`: a hum or a fan held the mouth ajar in every pause)
  and weighed by how much the frame sounds like speech
  (:mod:`giris.workers.voice_activity`: level dips, gliding pitch, onsets, a pure-tone
  check; a steady tone or music held the mouth wider than speech does): a tone, a hum,
  a fan, a beep leave the mouth shut, music nearly; speech moves it as before (the gate
  passes it at 1, with no look-ahead).
* **Utterance end.** On the final chunk the last frames ease to ``sil`` and the very last
  frame is exactly closed.

Everything is vectorised over frames × segments; a 1-second chunk takes well under 1 ms.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from giris.workers import visemes as V
from giris.workers.bases import CoeffsEngine
from giris.workers.coefficients import N_BLENDSHAPES, N_VISEMES, VISEME_SLICE, VISEMES, zeros
from giris.workers.engine import EngineContext
from giris.workers.frame_spectra import frame_spectra
from giris.workers.noise_floor import FloorState, NoiseFloor
from giris.workers.voice_activity import GateState, SpeechGate

_REACH_AHEAD = np.array([V.REACH_AHEAD[v] for v in VISEMES])
_REACH_AFTER = np.array([V.REACH_AFTER[v] for v in VISEMES])
_MUST_SHOW = np.array([v in V.MUST_SHOW for v in VISEMES])
_ONEHOT = np.eye(N_VISEMES)
_SIL_EPS = 0.02          # background dominance of silence, where no segment reaches
_KEEP_S = 0.4            # how much past-segment history a session keeps across chunks
_DB_FLOOR = -90.0
_HOP_S = 0.005           # resolution of the "has the sound stopped" track (stops before pauses)
_QUIET_RUN_S = 0.03      # a quiet stretch this long inside a stop is its silent closure
_MURMUR_LEAD_S = 0.03    # a voiced closure's murmur may start this far ahead of its token

# segment columns: start_s, end_s, viseme, dominance, voiced, vowel, stress, stop, pause
Segment = tuple[float, float, int, float, float, float, float, float, float]
_VOICED, _STOP, _PAUSE = 4, 7, 8
_PP = V.VISEME_INDEX["PP"]
_NO_HOPS = np.zeros(0, np.float32)


@dataclass
class VisemeSession:
    spec: dict
    #: session-clock sample where the previous chunk ended (None: nothing yet)
    next_sample: int | None = None
    sample_rate: int = 0
    #: the last samples before ``next_sample`` (windows around the next frames need them)
    tail: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    #: running loudness peak (dBFS) of the automatic gain control
    peak_db: float = -20.0
    #: recent segments of this utterance (carry-over coarticulation across chunks)
    segments: list[Segment] = field(default_factory=list)
    #: a stress mark seen but not yet attached to a vowel, and where its time began
    pending_stress: float = 0.0
    pending_start: float | None = None
    #: audio-only path: smoothed viseme weights and slow loudness average
    weights: np.ndarray = field(default_factory=lambda: _ONEHOT[V.SIL].copy())
    slow_energy: float = 0.0
    #: recent ``_HOP_S`` hops of audio, how far (dB) each is under the running peak;
    #: hop ``quiet_first + i`` is session samples ``[(quiet_first + i) * hop, +hop)``.
    #: Phoneme path only (its stops read it from their own chunks on): live audio empties it
    quiet: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    quiet_first: int = 0
    #: audio-only path: recent frames of the background's floor and of the speech gate
    floor: FloorState = field(default_factory=FloorState)
    voice: GateState = field(default_factory=GateState)


class VisemeEngine(CoeffsEngine):
    """Phonemes (or audio alone) → 73-channel frames + (energy, voicing, emphasis).

    Options: ``core_fraction`` (0.5: share of a segment at full dominance),
    ``gain_floor``/``gain_ceiling`` (0.5/1.1: opening scale at silence/full loudness),
    ``range_db`` (40: loudness range below the running peak mapped to 0..1),
    ``peak_decay_db_s`` (3: how fast the running peak forgets), ``min_peak_db`` (-35: the
    running peak never falls below this, so room noise is not amplified to speech),
    ``dominance_shape`` (1.5: exponent ``c`` of the dominance fall-off ``exp(-(d/reach)^c)``),
    ``close_frames`` (3: frames eased to closed at the end of an utterance),
    ``smoothing`` (0.5: audio-only weight EMA), ``frame_phase`` (0.5: where in its display
    interval ``[k, k + 1) / fps`` frame ``k`` is sampled), ``stop_quiet_db`` (30: how far
    under the running peak a stop before a pause counts as silent, its pose then given
    up to the pause), ``stop_voiced_db`` (22: the same within a voiced stop, whose closure
    murmurs), ``stop_hold_s`` (0.08: how long lips shut by a stop before a pause stay so,
    a typical closure, and the longest a stop's pose is held there). Audio-only path:
    ``floor_window_s`` / ``floor_subtract`` / ``floor_keep_db`` (1.5 / 2 / 25: the steady
    background taken out of its loudness, :mod:`giris.workers.noise_floor`; 0 subtracts
    nothing), ``vad`` (true: its speech gate; the ``vad_*`` options are in
    :mod:`giris.workers.voice_activity`). Session spec: ``fps`` (25).
    """

    def __init__(self, options: Mapping[str, Any], context: EngineContext) -> None:
        super().__init__(options, context)
        o = self.options
        self.core_fraction = float(o.get("core_fraction", 0.5))
        self.shape = float(o.get("dominance_shape", 1.5))
        self.gain_floor = float(o.get("gain_floor", 0.5))
        self.gain_ceiling = float(o.get("gain_ceiling", 1.1))
        self.range_db = float(o.get("range_db", 40.0))
        self.headroom_db = 6.0
        self.min_peak_db = float(o.get("min_peak_db", -35.0))
        self.peak_decay_db_s = float(o.get("peak_decay_db_s", 3.0))
        self.close_frames = int(o.get("close_frames", 3))
        self.smoothing = float(o.get("smoothing", 0.5))
        self.frame_phase = min(max(float(o.get("frame_phase", 0.5)), 0.0), 1.0)
        self.stop_quiet_db = float(o.get("stop_quiet_db", 30.0))
        self.stop_voiced_db = float(o.get("stop_voiced_db", 22.0))
        self.stop_hold_s = float(o.get("stop_hold_s", 0.08))
        self.voice = SpeechGate(o) if o.get("vad", True) else None
        self.floor = NoiseFloor(o)
        # audio-only path's EMA rates: the viseme weights, then the slow loudness average
        self._ema_rates = (self.smoothing,) * N_VISEMES + (0.05,)

    # ---------------------------------------------------------------- sessions
    def open_session(self, spec: Mapping[str, Any]) -> VisemeSession:
        return VisemeSession(spec=dict(spec))

    def estimate(self, spec: Mapping[str, Any]) -> dict[str, int]:
        return {"cpu": 64 * 1024}

    def cancel(self, state: VisemeSession, utterance: int) -> None:
        """A cancelled utterance never sends its final chunk: drop its coarticulation."""
        self._forget_utterance(state)

    def close_session(self, state: VisemeSession) -> None:
        state.segments.clear()
        state.tail = np.zeros(0, np.float32)

    def warmup(self) -> None:
        s = self.open_session({})
        pcm = (3000 * np.sin(np.arange(22050) * 0.06)).astype(np.int16)
        self.frames(pcm, 22050, 0, [["h", 0, 5000], ["ə", 5000, 17050]], range(0, 25), 25.0, s, True)
        self.frames(pcm, 22050, 22050, None, range(25, 50), 25.0, s, True)

    # ------------------------------------------------------------------ frames
    def frames(self, pcm: np.ndarray, sample_rate: int, start_sample: int, phonemes: list | None,
               frames: range, fps: float, state: VisemeSession, final: bool,
               ahead: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        sr = int(sample_rate)
        x = np.asarray(pcm).reshape(-1)
        x = x * np.float32(1 / 32768) if x.dtype.kind in "iu" else x.astype(np.float32)
        hop = max(1, int(round(sr * _HOP_S)))
        if state.next_sample != start_sample or state.sample_rate != sr:
            state.tail = np.zeros(0, np.float32)  # a gap or a restart: nothing to carry over
            self._forget_utterance(state)
            state.quiet, state.quiet_first = _NO_HOPS, -(-start_sample // hop)
        state.sample_rate = sr
        n = len(frames)
        k = np.arange(frames.start, frames.stop, dtype=np.float64) + self.frame_phase
        t = k / fps  # the middle of each frame's display interval (module docstring)
        buf = np.concatenate([state.tail, x])
        origin = start_sample - state.tail.shape[0]
        period = max(1, int(round(sr / fps)))
        nfft = 1 << max(6, (period - 1).bit_length())
        centers = np.rint(k * sr / fps).astype(np.int64) - origin

        end = start_sample + x.shape[0]
        # a chunk may start no phoneme (a long vowel or pause fills it) and still be speech
        # whose phonemes are known: only None means "no phonemes, read the sound"
        if phonemes is not None:
            db = self._level(buf, centers, period)
            prior_peak = state.peak_db
            energy, peak = self._loudness(db, fps, state)
            self._track_quiet(buf, origin, end, hop, t, peak, prior_peak, state)
            weights, voicing, emphasis = self._from_phonemes(phonemes, sr, start_sample, x.shape[0],
                                                             t, fps, energy, state, ahead)
        else:  # live audio has no stops to settle: the quiet track starts again at a
            state.quiet, state.quiet_first = _NO_HOPS, end // hop  # phoneme chunk
            if n == 0:  # a chunk that covers no frame (every other one in 20 ms chunks at
                self._carry(buf, nfft, end, final, state)  # 25 FPS): its samples are kept
                return zeros(0), np.zeros((0, 3), np.float32)
            db = self._level(buf, centers, period)
            # loudness above the steady background (a hum, a fan), not silence, ...
            energy, _ = self._loudness(self.floor.clean(db, fps, state.floor), fps, state)
            centred, ending = frame_spectra(buf, centers, nfft, ending=self.voice is not None)
            if self.voice is not None:  # ... and only speech moves the mouth
                energy = energy * self.voice.weights(ending, nfft, sr, db, fps, state.voice)
            weights, voicing, emphasis = self._from_audio(centred, nfft, sr, energy, state)

        gain = self.gain_floor + (self.gain_ceiling - self.gain_floor) * energy
        blend = weights @ V.POSE_MATRIX
        blend[:, V.OPENING_MASK] *= gain[:, None]
        coeffs = zeros(n)
        coeffs[:, :N_BLENDSHAPES] = np.clip(blend, 0.0, 1.0)
        coeffs[:, VISEME_SLICE] = weights
        if final and n:
            m = min(self.close_frames, n)
            r = (np.arange(1, m + 1) / m)[:, None]  # ..., 2/3, 1: last frame fully closed
            coeffs[n - m:] = (1.0 - r) * coeffs[n - m:] + r * zeros(1)
        prosody = np.stack([energy, voicing, emphasis], axis=1).astype(np.float32)
        self._carry(buf, nfft, end, final, state)
        return coeffs, prosody

    def _carry(self, buf: np.ndarray, nfft: int, end: int, final: bool, state: VisemeSession) -> None:
        """What the next chunk needs: the last samples (the gate's windows end at the last
        sample: a whole one behind it), where this chunk ended, and, after an utterance's
        final chunk, a closed mouth and no coarticulation."""
        state.tail = buf[-nfft:].copy()
        state.next_sample = end
        if final:
            self._forget_utterance(state)

    @staticmethod
    def _forget_utterance(state: VisemeSession) -> None:
        state.segments = []
        state.pending_stress, state.pending_start = 0.0, None
        state.weights = _ONEHOT[V.SIL].copy()

    # ---------------------------------------------------------------- loudness
    @staticmethod
    def _level(buf: np.ndarray, centers: np.ndarray, period: int) -> np.ndarray:
        """RMS level per frame (dBFS) over one frame period around its instant."""
        n = centers.shape[0]
        if n == 0:
            return np.zeros(0)
        # a chunk's last frame stays on screen into the next chunk, whose samples are not
        # here yet: its window is cut at the last sample, and keeps a quarter period at least
        lo = np.clip(np.minimum(centers - period // 2, buf.shape[0] - period // 4), 0, buf.shape[0])
        hi = np.clip(centers + (period - period // 2), 0, buf.shape[0])
        sq = np.empty(buf.shape[0] + 1, np.float32)
        np.multiply(buf, buf, out=sq[:-1])
        sq[-1] = 0.0
        lin = np.append(buf, np.float32(0.0))
        # windows are (nearly) contiguous: one reduceat over [lo0, hi0, lo1, hi1, ...]
        bounds = np.empty(2 * n, np.int64)
        bounds[0::2], bounds[1::2] = lo, hi
        sums = np.add.reduceat(sq, bounds)[0::2].astype(np.float64)
        means = np.add.reduceat(lin, bounds)[0::2].astype(np.float64)
        sums[hi <= lo] = 0.0
        means[hi <= lo] = 0.0
        width = np.maximum(hi - lo, 1)
        # about its mean, per window: a microphone's DC offset is no sound (+100 counts,
        # -50 dBFS and inaudible, held the mouth as open as speech does)
        rms = np.sqrt(np.maximum(sums / width - (means / width) ** 2, 0.0))
        return np.maximum(20.0 * np.log10(rms + 1e-12), _DB_FLOOR)

    def _loudness(self, db: np.ndarray, fps: float,
                  state: VisemeSession) -> tuple[np.ndarray, np.ndarray]:
        """Normalised loudness per frame (its level in dB against a decaying running peak),
        and that running peak (dBFS)."""
        n = db.shape[0]
        if n == 0:
            return np.zeros(0), np.zeros(0)
        # running peak p_k = max(floor, db_k, p_{k-1} - d), closed form (max-plus scan)
        d = self.peak_decay_db_s / fps
        j = np.arange(n)
        peak = np.maximum(np.maximum.accumulate(db + d * j) - d * j, state.peak_db - d * (j + 1))
        peak = np.maximum(peak, self.min_peak_db)
        state.peak_db = float(peak[-1])
        energy = (db - (peak - self.range_db)) / (self.range_db - self.headroom_db)
        return _clip01(energy), peak

    def _track_quiet(self, buf: np.ndarray, origin: int, end: int, hop: int, t: np.ndarray,
                     peak: np.ndarray, prior_peak: float, state: VisemeSession) -> None:
        """Append the hops completed by this chunk to ``state.quiet`` (how far each hop's RMS
        is under the running peak of the last frame sampled before it), kept as far back as
        the session's segments: where a stop before a pause falls silent is read from it
        (:meth:`_settle_stops`)."""
        sr = state.sample_rate
        # what no kept segment can reach is let go (a stop's chain starts at one of them)
        since = min([s[0] for s in state.segments] + [origin / sr])
        drop = min(max(0, int(since * sr) // hop - state.quiet_first), state.quiet.shape[0])
        state.quiet, state.quiet_first = state.quiet[drop:], state.quiet_first + drop
        nxt = state.quiet_first + state.quiet.shape[0]
        if nxt * hop < origin:  # its samples are gone (cannot happen while the tail is kept)
            state.quiet, nxt = _NO_HOPS, -(-origin // hop)
            state.quiet_first = nxt
        last = end // hop  # hops [nxt, last) are complete now
        if last > nxt:
            x = buf[nxt * hop - origin:last * hop - origin].reshape(-1, hop)
            mean = x.mean(axis=1)  # about the mean: a DC offset is no sound
            var = np.maximum(np.einsum("ij,ij->i", x, x) / hop - mean * mean, 0.0)
            db = 10.0 * np.log10(var + 1e-24)
            mid = (np.arange(nxt, last) + 0.5) * hop / sr
            i = np.searchsorted(t, mid, side="right") - 1
            ref = np.where(i >= 0, peak[np.maximum(i, 0)] if peak.size else prior_peak, prior_peak)
            state.quiet = np.concatenate([state.quiet, (ref - db).astype(np.float32)])

    def _sound_end(self, lo: float, hi: float, heard: bool, state: VisemeSession,
                   voiced_from: float = np.inf) -> float | None:
        """Where the sound falls silent in ``[lo, hi)`` seconds: the start of the first quiet
        run that lasts ``_QUIET_RUN_S`` (a faint release burst after the closure does not
        undo it) or, when the audio up to ``hi`` is all ``heard``, reaches ``hi`` (a chunk
        cut just after a dip would close the mouth mid-sound); None if it sounds on, or
        the hops are not known. Quiet is ``stop_quiet_db`` under the running peak, and
        ``stop_voiced_db`` from ``voiced_from`` on: a voiced stop's closure murmurs."""
        sr = state.sample_rate
        hop = max(1, int(round(sr * _HOP_S)))
        h0 = max(int(np.ceil(lo * sr / hop)), state.quiet_first)
        h1 = min(int(np.floor(hi * sr / hop)), state.quiet_first + state.quiet.shape[0])
        if h1 <= h0:
            return None
        murmur = np.arange(h0, h1) * hop >= voiced_from * sr
        q = state.quiet[h0 - state.quiet_first:h1 - state.quiet_first] >= np.where(
            murmur, self.stop_voiced_db, self.stop_quiet_db)
        need = max(1, int(round(_QUIET_RUN_S * sr / hop)))
        run = 0
        for i, quiet in enumerate(q):
            run = run + 1 if quiet else 0
            if run and (run >= need or heard and i == q.shape[0] - 1):
                return (h0 + i - run + 1) * hop / sr
        return None

    def _settle_stops(self, segs: list[Segment], avail: float, state: VisemeSession) -> list[Segment]:
        """Stops just before a pause end where their sound does (module docstring): the
        stops, and the sound before them (whose token often outlasts its fading voice),
        are cut where the audio falls silent (``stop_hold_s`` into the stops at the
        latest), and the pause starts there. Lips shut among or before them (/p b m/)
        stay shut ``stop_hold_s`` from where the sound stops, then the pause starts; an
        /f v/ before them is kept whole. ``segs``: this chunk's and its neighbours'
        segments; ``avail``: the session time (s) the audio is heard up to."""
        out: list[Segment] = list(segs)
        gone: set[int] = set()
        for i in range(1, len(out)):
            if not out[i][_PAUSE] or not out[i - 1][_STOP]:
                continue
            j = i - 1
            while j > 0 and out[j - 1][_STOP]:
                j -= 1
            first = j
            lips = any(int(out[k][2]) == _PP for k in range(max(j - 1, 0), i))
            if j > 0 and int(out[j - 1][2]) != V.SIL and not _MUST_SHOW[int(out[j - 1][2])]:
                j -= 1  # the sound before the stops may fade out before its token ends
            voiced = [out[k][0] for k in range(j, i) if out[k][_STOP] and out[k][_VOICED]]
            heard = self._sound_end(out[j][0], min(out[i][0], avail), out[i][0] <= avail, state,
                                    voiced[0] - _MURMUR_LEAD_S if voiced else np.inf)
            heard = np.inf if heard is None else heard
            if lips:  # shut as the sound stops (or at their token), held for the closure, let go
                j = first
                end = min(out[first][0], heard) + self.stop_hold_s
            else:  # the closure is not seen: settle as the sound stops, or after a closure
                end = min(out[first][0] + self.stop_hold_s, heard)
            if end >= out[i][0]:
                continue
            for k in range(j, i):
                if out[k][0] < end:
                    out[k] = (out[k][0], min(out[k][1], end)) + out[k][2:]
                else:
                    gone.add(k)  # silent from its start: not seen at all
            out[i] = (min(out[i][0], end),) + out[i][1:]
        return [s for k, s in enumerate(out) if k not in gone]

    # ----------------------------------------------------------- phoneme path
    def _segments(self, phonemes: list, sr: int, start_sample: int, state: VisemeSession) -> list[Segment]:
        """Phoneme tokens → segments (seconds on the session clock), stress attached to vowels."""
        segs = state.segments
        for item in phonemes:
            try:
                ipa, rel, count = str(item[0]), int(item[1]), int(item[2])
            except (TypeError, ValueError, IndexError):
                continue  # a malformed entry loses its phoneme, not the chunk
            s0 = (start_sample + rel) / sr
            s1 = s0 + max(count, 0) / sr
            kind, stress, sounds = V.parse(ipa)
            if kind == "stress":
                state.pending_stress = max(state.pending_stress, stress)
                if state.pending_start is None:
                    state.pending_start = s0
                continue
            if kind == "modifier":
                if segs and segs[-1][1] <= s1:
                    segs[-1] = (segs[-1][0], s1) + segs[-1][2:]
                continue
            if state.pending_start is not None:
                s0 = min(s0, state.pending_start)
                state.pending_start = None
            stress = max(stress, state.pending_stress)
            dur = s1 - s0
            a = s0
            for snd in sounds:
                b = a + dur * snd.share
                st = 0.0
                if stress and snd.vowel:
                    st, stress, state.pending_stress = stress, 0.0, 0.0
                segs.append((a, b, snd.viseme, snd.dominance, float(snd.voiced), float(snd.vowel), st,
                             float(snd.stop), float(snd.pause)))
                a = b
            if sounds and VISEMES[sounds[0].viseme] == "sil":
                state.pending_stress = 0.0  # a stress mark never jumps over a pause
        return segs

    def _from_phonemes(self, phonemes: list, sr: int, start_sample: int, n_samples: int,
                       t: np.ndarray, fps: float, energy: np.ndarray, state: VisemeSession,
                       ahead: list | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        segs = self._segments(phonemes, sr, start_sample, state)
        n = t.shape[0]
        every = segs
        if ahead:  # parsed on a scratch copy: the next chunk brings them again as its own
            scratch = VisemeSession(spec={}, segments=[], pending_stress=state.pending_stress,
                                    pending_start=state.pending_start)
            every = segs + self._segments(ahead, sr, start_sample, scratch)
        every = self._settle_stops(every, (start_sample + n_samples) / sr, state)
        if every and n:
            S = np.asarray(every, np.float64)
            s0, s1, vis, dom = S[:, 0], S[:, 1], S[:, 2].astype(np.int64), S[:, 3]
            center, dur = 0.5 * (s0 + s1), s1 - s0
            half = self.core_fraction * 0.5 * dur
            half = np.where(_MUST_SHOW[vis], np.maximum(half, 0.5 / fps), half)
            # a pause is at full dominance from its start: the mouth settles as the sound stops
            core0 = np.where(vis == V.SIL, s0, center - half)
            ahead = np.maximum(core0[None, :] - t[:, None], 0.0)             # segment still to come
            after = np.maximum(t[:, None] - (center + half)[None, :], 0.0)   # segment already past
            c = self.shape
            D = dom * np.exp(-(ahead / _REACH_AHEAD[vis]) ** c - (after / _REACH_AFTER[vis]) ** c)
            W = D @ _ONEHOT[vis]
            total = D.sum(axis=1)
            voiced = (D @ S[:, 4]) / (total + 1e-9)
            stressed = S[:, 6] > 0
            if stressed.any():
                sigma = np.maximum(0.5 * dur[stressed], 0.05)
                bumps = S[stressed, 6] * np.exp(-0.5 * ((t[:, None] - center[stressed]) / sigma) ** 2)
                emphasis = bumps.max(axis=1)
            else:
                emphasis = np.zeros(n)
        else:
            W, voiced, emphasis = np.zeros((n, N_VISEMES)), np.zeros(n), np.zeros(n)
        W[:, V.SIL] += _SIL_EPS
        W /= W.sum(axis=1, keepdims=True)
        voicing = voiced * _clip01(energy * 3.0)
        emphasis = _clip01(emphasis * _clip01(0.3 + energy))
        # keep only what can still reach the next chunk
        horizon = (start_sample + n_samples) / sr - _KEEP_S
        state.segments = [s for s in segs if s[1] > horizon]
        return W, voicing, emphasis

    # ------------------------------------------------------------- audio path
    def _from_audio(self, power: np.ndarray, nfft: int, sr: int, energy: np.ndarray,
                    state: VisemeSession) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Acoustic features (``power``: each frame's spectrum, centred on its instant) →
        viseme weights (no phonemes: live audio; never a chunk without frames)."""
        n = power.shape[0]
        bands, freqs = _analysis(nfft, sr)
        b = power @ bands                                          # (n, 4) band energies
        total = b[:, 0] + 1e-12
        low, high = b[:, 1] / total, b[:, 2] / total
        centroid = (power @ freqs) / (b[:, 3] + 1e-12)

        act = _clip01((energy - 0.05) / 0.35)                     # speaking at all
        voiced = _clip01((low - 0.25) / 0.45)
        fric = _clip01((high - 0.25) / 0.4) * (1.0 - voiced)
        rnd = _clip01((1100.0 - centroid) / 700.0)                # dark spectrum: rounded lips
        spread = _clip01((centroid - 1400.0) / 1000.0)            # bright: spread lips
        neutral = _clip01(1.0 - rnd - spread)
        vowel = act * (1.0 - fric)
        opn, shut = energy, 1.0 - energy
        raw = np.zeros((n, N_VISEMES + 1))
        raw[:, _COL["sil"]] = 1.0 - act
        raw[:, _COL["SS"]] = act * fric
        raw[:, _COL["aa"]] = vowel * neutral * opn
        raw[:, _COL["DD"]] = vowel * neutral * shut
        raw[:, _COL["E"]] = vowel * spread * opn
        raw[:, _COL["ih"]] = vowel * spread * shut
        raw[:, _COL["oh"]] = vowel * rnd * opn
        raw[:, _COL["ou"]] = vowel * rnd * shut
        raw[:, :N_VISEMES] /= raw[:, :N_VISEMES].sum(axis=1, keepdims=True) + 1e-12
        raw[:, N_VISEMES] = energy

        # light temporal smoothing (spectral features jitter) carried across chunks; the
        # last column is a slow loudness average (for emphasis = loudness above it)
        y0 = np.concatenate([state.weights, [state.slow_energy]])
        smooth = _ema(raw, self._ema_rates, y0)
        W, slow = smooth[:, :N_VISEMES], smooth[:, N_VISEMES]
        state.weights, state.slow_energy = W[-1].copy(), float(slow[-1])
        voicing = voiced * act
        emphasis = _clip01((energy - slow - 0.1) / 0.3) * voicing
        return W, voicing, emphasis


_COL = {v: i for i, v in enumerate(VISEMES)}


def _clip01(x: np.ndarray) -> np.ndarray:
    return np.minimum(np.maximum(x, 0.0), 1.0)


@lru_cache(maxsize=16)
def _analysis(nfft: int, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """Band-sum matrix (total, <900 Hz, >3 kHz, 80 Hz-4 kHz) and centroid weights."""
    f = np.fft.rfftfreq(nfft, 1.0 / sr)
    bands = np.stack([(f >= 80) & (f < 8000), (f >= 80) & (f < 900), (f >= 3000) & (f < 8000),
                      (f >= 80) & (f < 4000)], axis=1).astype(np.float64)
    return bands, f * bands[:, 3]


@lru_cache(maxsize=64)
def _ema_matrix(n: int, a: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """L[i, j, c] = a_c (1 - a_c)^(i-j) for j <= i, and the decay of the start value."""
    av = np.asarray(a)
    lag = np.arange(n)[:, None] - np.arange(n)[None, :]
    L = np.where(lag[..., None] >= 0, av * (1.0 - av) ** np.maximum(lag, 0)[..., None], 0.0)
    return L, (1.0 - av) ** (np.arange(n)[:, None] + 1)


def _ema(x: np.ndarray, a: tuple[float, ...], y0: np.ndarray, block: int = 64) -> np.ndarray:
    """Exponential moving average y_i = a x_i + (1 - a) y_{i-1} over rows, without a
    Python loop per frame (closed form per block of rows; per-column ``a``)."""
    out = np.empty_like(x)
    for s in range(0, x.shape[0], block):
        xb = x[s:s + block]
        L, decay = _ema_matrix(xb.shape[0], a)
        out[s:s + block] = np.einsum("ijc,jc->ic", L, xb) + decay * y0
        y0 = out[s + xb.shape[0] - 1]
    return out
