"""``prosody`` motion engine: head pose, blinks, brows and emotion from speech prosody.

Why this design:

* **Time is the frame index.** Everything is a function of ``frame / fps`` and a seeded
  random generator, never the wall clock, so a session with ``seed`` replays bit for bit
  and the output does not depend on how fast frames are produced.
* **Idle sway** is a sum of slow incommensurate sinusoids per axis (yaw, pitch, roll) with
  per-session random frequencies and phases: it never repeats visibly, never freezes
  (the sum of incommensurate sines is never constant), and never drifts (zero mean,
  bounded by the sum of amplitudes, a few degrees). Speaking (smoothed loudness) widens
  it a little.
* **Nods and brow raises** are events: the emphasis track crossing 0.5 upwards (a stressed
  syllable) starts a nod, at most one per ``nod_refractory_s`` (0.6 s), and a brow raise,
  at most one per ``brow_refractory_s`` (2.5 s; brows on every stressed syllable look
  frantic). Each event drives a causal impulse response ``(τ/τp)·exp(1-τ/τp)`` (peak 1 at
  ``τp``, decaying back to 0), so the head returns to rest; the drive history is kept
  across chunks so a nod straddling a chunk boundary is continuous. Sign: positive
  ``headPitch`` is chin down (rotation about +x with y up, z towards the viewer).
* **Blinks**: onsets are a renewal process, interval = 2 s + gamma(shape 2) (mean ≈3.4 s
  → ≈17/min, capped at 6 s); shape: 100 ms ease-in close, 40 ms closed, 180 ms ease-out
  open, both eyes. A blink due on a strong emphasis peak (> 0.7) is postponed 250 ms
  (people blink at phrase boundaries more than on stressed syllables).
* **Emotion** is a fixed offset per emotion (smile/frown, brows, eye wide/squint, cheeks,
  a slight head tilt) times intensity, eased in over ``emotion_ramp_s`` when it changes.
* **One Euro filter on every channel** (Casiez et al. 2012): options ``min_cutoff``,
  ``beta``, ``d_cutoff`` for face and head channels; mouth/jaw/viseme channels use
  ``mouth_min_cutoff``/``mouth_beta`` (higher: lip sync must not lag); blink channels
  bypass it (infinite cutoff) so a 100 ms blink stays crisp. The mouth is smoothed while
  it sounds: as the loudness falls below ``mouth_quiet_energy`` (0.3) its minimum cutoff
  rises towards ``mouth_quiet_cutoff`` (300 Hz, a pass-through at 25 FPS), so the mouth
  closes when the sound stops. At 4 Hz alone (α ≈ 0.5 a frame at 25 FPS, and the speed
  term barely helps: its 1 Hz derivative filter takes longer than a closing lasts) the
  jaw halved once a frame after the coefficients had closed it, still above 0.05 some
  35 ms later; in silence there is no jitter to smooth, the coefficients already ease to
  rest by coarticulation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from giris.workers.bases import MotionEngine
from giris.workers.coefficients import (BLENDSHAPES, INDEX, N_BLENDSHAPES, N_CHANNELS, POSE_SLICE,
                                        VISEME_SLICE)
from giris.workers.engine import EngineContext, EngineError
from giris.workers.face_rig import BROW_RANGE
from giris.workers.one_euro import OneEuroFilter

#: blendshape (and head pose) offsets at intensity 1.0. Sized to read at the default
#: intensity (0.6) on a 512² portrait: mouth corners and brows move ≥ 8 px (~0.12 IOD)
#: against neutral. Sad and angry take the portrait's own smile out (the rig's mouthFrown
#: first undoes a smiling rest pose and closes lips parted over teeth); angry presses and
#: rolls the lips thin; happy adds to the smile; surprised lifts the brows and lids.
EMOTIONS: dict[str, dict[str, float]] = {
    "neutral": {},
    "happy": {"mouthSmileLeft": 1.0, "mouthSmileRight": 1.0, "cheekSquintLeft": 1.0,
              "cheekSquintRight": 1.0, "eyeSquintLeft": 0.25, "eyeSquintRight": 0.25,
              "mouthDimpleLeft": 0.6, "mouthDimpleRight": 0.6, "browInnerUp": 0.05,
              "headPitch": -0.02},
    "sad": {"mouthFrownLeft": 1.0, "mouthFrownRight": 1.0, "browInnerUp": 1.0,
            "browDownLeft": 0.08, "browDownRight": 0.08, "mouthShrugLower": 0.6,
            "mouthPressLeft": 0.2, "mouthPressRight": 0.2,
            "eyeLookDownLeft": 0.15, "eyeLookDownRight": 0.15, "eyeSquintLeft": 0.1,
            "eyeSquintRight": 0.1, "headPitch": 0.06},
    "surprised": {"browInnerUp": 0.7, "browOuterUpLeft": 0.7, "browOuterUpRight": 0.7,
                  "eyeWideLeft": 1.0, "eyeWideRight": 1.0, "jawOpen": 0.08, "headPitch": -0.03},
    "angry": {"browDownLeft": 1.0, "browDownRight": 1.0, "eyeSquintLeft": 0.3, "eyeSquintRight": 0.3,
              "noseSneerLeft": 0.3, "noseSneerRight": 0.3, "mouthPressLeft": 0.5,
              "mouthPressRight": 0.5, "mouthRollLower": 0.5, "mouthRollUpper": 0.2,
              "mouthFrownLeft": 1.0, "mouthFrownRight": 1.0, "mouthShrugLower": 0.3,
              "headPitch": 0.03},
}
_EMOTION_VEC: dict[str, np.ndarray] = {}
for _name, _offs in EMOTIONS.items():
    _v = np.zeros(N_CHANNELS)
    for _ch, _val in _offs.items():
        _v[INDEX[_ch]] = _val
    _EMOTION_VEC[_name] = _v

_BLINK = (INDEX["eyeBlinkLeft"], INDEX["eyeBlinkRight"])
#: brow-raise channels: the rig moves them BROW_RANGE × as far per unit as it first did
_BROW_UP = [INDEX[n] for n in ("browInnerUp", "browOuterUpLeft", "browOuterUpRight")]
_YAW, _PITCH, _ROLL, _TX, _TY, _TZ = (INDEX[n] for n in ("headYaw", "headPitch", "headRoll",
                                                         "headTx", "headTy", "headTz"))
_MOUTH = np.zeros(N_CHANNELS, bool)
_MOUTH[[i for i, n in enumerate(BLENDSHAPES) if n.startswith(("mouth", "jaw", "tongue", "cheekPuff"))]] = True
_MOUTH[VISEME_SLICE] = True

#: blink timing (seconds)
BLINK_CLOSE, BLINK_HOLD, BLINK_OPEN = 0.10, 0.04, 0.18
BLINK_LEN = BLINK_CLOSE + BLINK_HOLD + BLINK_OPEN
#: idle sway per axis (yaw, pitch, roll): base frequencies (Hz) and amplitudes (rad)
SWAY_FREQ = np.array([[0.05, 0.11, 0.23], [0.07, 0.13, 0.29], [0.04, 0.09, 0.19]])
SWAY_AMP = np.array([[0.025, 0.012, 0.006], [0.010, 0.006, 0.003], [0.012, 0.006, 0.003]])
_HIST_S = 2.0  # seconds of (events, energy) history kept for the causal kernels
POSE_LIMIT = np.array([0.35, 0.35, 0.35, 0.2, 0.2, 0.2])


def blink_shape(u: np.ndarray) -> np.ndarray:
    """Eyelid closure 0..1 at ``u`` seconds after a blink's onset: fast close, slow open."""
    u = np.asarray(u, np.float64)
    close = np.sin(0.5 * math.pi * np.clip(u / BLINK_CLOSE, 0.0, 1.0)) ** 2
    opening = np.cos(0.5 * math.pi * np.clip((u - BLINK_CLOSE - BLINK_HOLD) / BLINK_OPEN, 0.0, 1.0)) ** 2
    v = np.where(u < BLINK_CLOSE, close, opening)
    return np.where((u < 0) | (u >= BLINK_LEN), 0.0, v)


def _impulse(fps: float, peak_s: float, n: int) -> np.ndarray:
    """Causal response (τ/τp)·exp(1 - τ/τp): rises to 1 at ``peak_s``, decays back to 0."""
    tau = np.arange(n) / fps
    return (tau / peak_s) * np.exp(1.0 - tau / peak_s)


@dataclass
class MotionSession:
    spec: dict
    rng: np.random.Generator
    emotion: str = "neutral"
    intensity: float = 1.0
    sway_freq: np.ndarray = field(default_factory=lambda: SWAY_FREQ.copy())
    sway_phase: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    filt: OneEuroFilter | None = None
    #: (frames, 3) past (nod events, brow events, energy), newest last; sized on first use
    hist: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    last_emphasis: float = 0.0
    last_nod: float = -math.inf
    last_brow: float = -math.inf
    emo: np.ndarray = field(default_factory=lambda: np.zeros(N_CHANNELS))
    next_blink: float | None = None
    postponed: int = 0
    blinks: list[float] = field(default_factory=list)
    last_frame: int | None = None


def _intensity(value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise EngineError(f"intensity must be a number in 0..1, not {value!r}", code="bad_input") from None
    if not math.isfinite(x):
        raise EngineError(f"intensity must be a number in 0..1, not {value!r}", code="bad_input")
    return min(max(x, 0.0), 1.0)


def _emotion(name: Any) -> str:
    key = str(name or "neutral").lower()
    if key not in EMOTIONS:
        raise EngineError(f"unknown emotion {name!r}; known: {', '.join(EMOTIONS)}", code="unknown_emotion")
    return key


def _settings(spec: Mapping[str, Any]) -> tuple[np.random.Generator, str, float]:
    """A session's random generator (from ``seed``), emotion and intensity: what
    ``open_session`` takes from its spec and ``check`` judges, by the same rules."""
    seed = spec.get("seed")
    try:
        rng = np.random.default_rng(None if seed is None else int(seed))
    except (TypeError, ValueError):
        raise EngineError(f"seed must be a non-negative integer, not {seed!r}", code="bad_input") from None
    return rng, _emotion(spec.get("emotion")), _intensity(spec.get("intensity", 1.0))


class ProsodyMotionEngine(MotionEngine):
    """Adds head pose, blinks, brow raises and emotion to coefficient frames, smoothed.

    Options: ``min_cutoff`` (1.5 Hz), ``beta`` (1.0), ``d_cutoff`` (1.0 Hz) — One Euro for
    face and head; ``mouth_min_cutoff`` (4.0 Hz), ``mouth_beta`` (2.0) for mouth/jaw/visemes,
    ``mouth_quiet_cutoff`` (300 Hz) their minimum cutoff in silence, reached linearly as the
    loudness falls from ``mouth_quiet_energy`` (0.3) to 0 (0 Hz: no change);
    ``nod_gain`` (0.05 rad per nod), ``brow_gain`` (1.0), ``sway_gain`` (1.0),
    ``nod_refractory_s`` (0.6 s), ``brow_refractory_s`` (2.5 s),
    ``blink_interval_s`` (mean 3.4 s), ``emotion_ramp_s`` (0.3 s).
    Session spec: ``emotion`` (neutral), ``intensity`` (1.0), ``seed`` (random if absent).
    Per utterance (coeffs meta): ``emotion``, ``intensity``.
    """

    def __init__(self, options: Mapping[str, Any], context: EngineContext) -> None:
        super().__init__(options, context)
        o = self.options
        self.min_cutoff = float(o.get("min_cutoff", 1.5))
        self.beta = float(o.get("beta", 1.0))
        self.d_cutoff = float(o.get("d_cutoff", 1.0))
        self.mouth_min_cutoff = float(o.get("mouth_min_cutoff", 4.0))
        #: frames over which an utterance's end eases the mouth to where the coefficients are
        self.close_frames = max(1, int(o.get("close_frames", 2)))
        self.mouth_beta = float(o.get("mouth_beta", 2.0))
        self.mouth_quiet_cutoff = float(o.get("mouth_quiet_cutoff", 300.0))
        self.mouth_quiet_energy = max(float(o.get("mouth_quiet_energy", 0.3)), 1e-6)
        self.nod_gain = float(o.get("nod_gain", 0.05))
        self.brow_gain = float(o.get("brow_gain", 1.0))
        self.sway_gain = float(o.get("sway_gain", 1.0))
        self.blink_interval_s = float(o.get("blink_interval_s", 3.4))
        self.emotion_ramp_s = float(o.get("emotion_ramp_s", 0.3))
        self.nod_refractory_s = float(o.get("nod_refractory_s", 0.6))
        self.brow_refractory_s = float(o.get("brow_refractory_s", 2.5))

    # ---------------------------------------------------------------- sessions
    def open_session(self, spec: Mapping[str, Any]) -> MotionSession:
        rng, emotion, intensity = _settings(spec)
        s = MotionSession(spec=dict(spec), rng=rng, emotion=emotion, intensity=intensity)
        s.sway_freq = SWAY_FREQ * rng.uniform(0.8, 1.25, SWAY_FREQ.shape)
        s.sway_phase = rng.uniform(0.0, 2 * math.pi, SWAY_FREQ.shape)
        s.emo = _EMOTION_VEC[s.emotion] * s.intensity  # start in the session's mood
        s.filt = self._filter()
        return s

    def check(self, spec: Mapping[str, Any]) -> None:
        _settings(spec)

    def estimate(self, spec: Mapping[str, Any]) -> dict[str, int]:
        return {"cpu": 32 * 1024}

    def close_session(self, state: MotionSession) -> None:
        state.blinks.clear()
        state.filt = None

    def _filter(self) -> OneEuroFilter:
        mc = np.where(_MOUTH, self.mouth_min_cutoff, self.min_cutoff)
        beta = np.where(_MOUTH, self.mouth_beta, self.beta)
        mc[list(_BLINK)] = np.inf  # blinks bypass the filter: they must stay crisp
        # brow weights are 1/BROW_RANGE of what they were for the same pixels: the speed
        # term scales up by as much, so the filter smooths the brows as it did
        beta[_BROW_UP] *= BROW_RANGE
        return OneEuroFilter(mc, beta, self.d_cutoff)

    # ----------------------------------------------------------------- animate
    def animate(self, coeffs: np.ndarray, prosody: np.ndarray, first_frame: int, fps: float,
                state: MotionSession, meta: Mapping[str, Any]) -> np.ndarray:
        emotion = _emotion(meta["emotion"]) if meta.get("emotion") else state.emotion
        intensity = _intensity(meta["intensity"]) if meta.get("intensity") is not None else state.intensity
        n = coeffs.shape[0]
        if n == 0:
            return coeffs
        m = max(2, int(math.ceil(_HIST_S * fps)))
        if state.last_frame is not None and first_frame != state.last_frame + 1:
            state.hist = np.zeros((0, 3))  # a gap or a replay: the past no longer leads here
            state.filt = None
        if state.hist.shape[0] != m:
            state.hist = np.zeros((m, 3))
        if state.filt is None:
            state.filt = self._filter()
        t = (first_frame + np.arange(n)) / fps
        energy = np.clip(prosody[:, 0], 0.0, 1.0).astype(np.float64)
        emphasis = np.clip(prosody[:, 2], 0.0, 1.0).astype(np.float64)

        # causal kernels over (history + this chunk): nods and brows on emphasis events,
        # a 1 s moving average of loudness for the speaking sway
        nods, brows = self._events(t, emphasis, state)
        full = np.concatenate([state.hist, np.stack([nods, brows, energy], axis=1)])
        conv = lambda x, h: np.convolve(x, h)[m:m + n]  # noqa: E731  (outputs for new rows)
        nod = conv(full[:, 0], _impulse(fps, 0.18, m))
        brow = conv(full[:, 1], _impulse(fps, 0.25, m))
        w = max(1, min(m, int(round(fps))))
        speaking = conv(full[:, 2], np.ones(w) / w)
        state.hist = full[-m:].copy()
        state.last_emphasis = float(emphasis[-1])

        out = coeffs.astype(np.float64)
        # idle sway (+ a little more while speaking), never constant, zero mean
        phase = 2 * math.pi * state.sway_freq[None] * t[:, None, None] + state.sway_phase[None]
        sway = (SWAY_AMP[None] * np.sin(phase)).sum(axis=2) * self.sway_gain   # (n, 3)
        sway *= (1.0 + 0.6 * speaking)[:, None]
        out[:, _YAW] += sway[:, 0]
        out[:, _PITCH] += sway[:, 1] + self.nod_gain * nod
        out[:, _ROLL] += sway[:, 2]
        out[:, _TX] += 0.15 * sway[:, 0]
        out[:, _TY] -= 0.3 * self.nod_gain * nod
        out[:, _TZ] += 0.02 * speaking

        # brows on emphasis (weights over BROW_RANGE: the rig's brow tables are that much
        # larger, so the raise is as many pixels as before, float for float)
        b = self.brow_gain * np.clip(brow, 0.0, 1.5)
        out[:, INDEX["browInnerUp"]] += (0.35 / BROW_RANGE) * b
        out[:, INDEX["browOuterUpLeft"]] += (0.25 / BROW_RANGE) * b
        out[:, INDEX["browOuterUpRight"]] += (0.25 / BROW_RANGE) * b

        # emotion, eased towards the target
        target = _EMOTION_VEC[emotion] * intensity
        ease = np.exp(-(np.arange(1, n + 1) / fps) / max(self.emotion_ramp_s, 1e-3))[:, None]
        emo = target + (state.emo - target) * ease
        state.emo = emo[-1].copy()
        out += emo

        filtered = state.filt.filter_block(out, 1.0 / fps, self._cutoffs(state.filt, energy))
        if meta.get("final"):
            # the utterance's last frame shows the mouth as the coefficients leave it (at
            # rest): the filter lagged a last close made in one step (live audio in 20 ms
            # chunks ended mid-word with the jaw at 0.19, held on screen after); the frames
            # before it are eased there, and the filter goes on from where they end
            k = min(n, self.close_frames)
            r = (np.arange(1, k + 1) / k)[:, None]
            filtered[n - k:, _MOUTH] += r * (out[n - k:, _MOUTH] - filtered[n - k:, _MOUTH])
            state.filt.x_prev[_MOUTH] = filtered[-1, _MOUTH]
            state.filt.dx_prev[_MOUTH] = 0.0
        blink = self._blinks(t, emphasis, fps, state)
        for i in _BLINK:
            filtered[:, i] = np.maximum(filtered[:, i], blink)
        filtered[:, :N_BLENDSHAPES] = np.clip(filtered[:, :N_BLENDSHAPES], 0.0, 1.0)
        filtered[:, VISEME_SLICE] = np.clip(filtered[:, VISEME_SLICE], 0.0, 1.0)
        filtered[:, POSE_SLICE] = np.clip(filtered[:, POSE_SLICE], -POSE_LIMIT, POSE_LIMIT)
        state.last_frame = first_frame + n - 1
        return filtered.astype(np.float32)

    def _cutoffs(self, filt: OneEuroFilter, energy: np.ndarray) -> np.ndarray | None:
        """Per-frame minimum cutoffs: the mouth's rise towards ``mouth_quiet_cutoff`` as
        the loudness falls below ``mouth_quiet_energy`` (None: the filter's own)."""
        if not self.mouth_quiet_cutoff > self.mouth_min_cutoff:
            return None
        quiet = 1.0 - np.clip(energy / self.mouth_quiet_energy, 0.0, 1.0)
        if not quiet.any():
            return None
        rows = np.repeat(np.broadcast_to(filt.min_cutoff, (N_CHANNELS,))[None, :], energy.shape[0], axis=0)
        rows[:, _MOUTH] += quiet[:, None] * (self.mouth_quiet_cutoff - self.mouth_min_cutoff)
        return rows

    # ------------------------------------------------------------------ events
    def _events(self, t: np.ndarray, emphasis: np.ndarray, state: MotionSession
                ) -> tuple[np.ndarray, np.ndarray]:
        """Nod and brow impulses where emphasis crosses 0.5 upwards, with refractory gaps."""
        nods, brows = np.zeros(t.shape[0]), np.zeros(t.shape[0])
        prev = np.concatenate([[state.last_emphasis], emphasis[:-1]])
        for i in np.flatnonzero((emphasis >= 0.5) & (prev < 0.5)):
            if t[i] - state.last_nod >= self.nod_refractory_s:
                nods[i], state.last_nod = 1.0, float(t[i])
            if t[i] - state.last_brow >= self.brow_refractory_s:
                brows[i], state.last_brow = 1.0, float(t[i])
        return nods, brows

    # ------------------------------------------------------------------ blinks
    def _blinks(self, t: np.ndarray, emphasis: np.ndarray, fps: float, state: MotionSession) -> np.ndarray:
        """Schedule blink onsets up to the end of this chunk and draw their shapes."""
        end = t[-1] + 0.5 / fps
        if state.next_blink is None:
            state.next_blink = float(t[0] + state.rng.uniform(0.5, 3.0))
        while state.next_blink <= end:
            s = state.next_blink
            i = int(round((s - t[0]) * fps))
            if 0 <= i < t.shape[0] and emphasis[i] > 0.7 and state.postponed < 2:
                state.next_blink += 0.25
                state.postponed += 1
                continue
            state.postponed = 0
            state.blinks.append(s)
            # 2 s refractory + gamma(2): unimodal, right-skewed like human inter-blink intervals
            extra = state.rng.gamma(2.0, max(self.blink_interval_s - 2.0, 0.1) / 2.0)
            state.next_blink = s + min(2.0 + float(extra), 6.0)
        out = np.zeros(t.shape[0])
        for s in state.blinks:
            out = np.maximum(out, blink_shape(t - s))
        state.blinks = [s for s in state.blinks if s + BLINK_LEN > end]
        return out
