"""Speech-likeness gate for the ``visemes`` engine's acoustic path (live audio, no phonemes).

The acoustic path opens the mouth by loudness, so any sound used to move it: a steady
440 Hz tone or music held it open wider than speech does, a fan or a hum held it half
open. This gate gives each frame a weight in [0, 1] (how much it sounds like speech) that
scales the frame's loudness, and nothing else: where it is 1 the mouth moves exactly as
before. It uses only the samples the frame's own analysis already has (no look-ahead
beyond it, so no added latency) and costs an inverse FFT per frame, and a second FFT
where the frame's own window is cut at the chunk's end (:mod:`giris.workers.frame_spectra`).

Why these cues (each answers a sound that held the mouth open; all measured on real Piper
speech, reverberant and noisy speech, tones, hum, fan noise, noise and music-like sound):

* **Level dips.** Speech is made of syllables: its level rises and falls by 20-50 dB at
  2-8 Hz (the syllabic modulation of speech, Houtgast & Steeneken 1985), and a stop or a
  pause drops it to the background. A tone, a hum, a fan or steady noise keeps its level
  within a few dB. The depth is the max - min of the speech-band level (80 Hz - 4 kHz,
  from the frame's FFT) over the last ``vad_window_s`` (0.6 s). Below ``vad_still_db``
  (4-8 dB) a sound is steady: closed whatever else it shows. From ``vad_dip_db``
  (16-24 dB) it is speech on its own; music-like sound dips 10-16 dB, speech in a
  reverberant room or over music may dip less than that, hence the next cue.
* **Gliding pitch.** Voiced speech has a pitch that moves all the time (intonation,
  jitter); instruments hold each note's pitch and jump between notes. Each frame's pitch
  comes from the normalised autocorrelation of its spectrum (150 Hz - 4 kHz, Wiener-
  Khinchin; corrected for the window, Boersma 1993); a pair of voiced frames glides when
  the pitch moved by 0.3-15 %. The share of gliding pairs in the window, from
  ``vad_glide`` (0.07-0.2), is speech evidence that survives reverberation and a music
  background (Piper speech: median 0.33; the music-like test signal: 0-0.07).
* **Onsets.** A sound that starts ``vad_onset_db`` (10-16 dB) above everything in the
  last 0.2 s counts as speech at once, so the first frame of a word after a pause opens
  the mouth as before (the cues above need the window to fill).
* **A sound's own frames.** The silence before a sound is not the sound's dip: a hum or
  a fan that starts after silence dipped 40 dB in the window, so it held the mouth open
  for 0.6 s, until the silence left it. Once the frames since the last onset began span
  ``_OWN_S`` (0.16 s; the onset's first frame is left out, its window is cut by the
  onset), a sound whose speech-band level moved under ``vad_own_db`` (6-12 dB) over them
  and that was not voiced on ``_VOICED_SHARE`` (20-50 %) of them is closed: a hum, a fan,
  steady noise. A word's first syllable can be as level (Piper's "Hello": 4 dB over its
  first 0.16 s), but it is voiced; reverberant speech, whose pitch is found less often,
  dips 8 dB and more by then. Music is voiced, so it still waits for the window.
* **Pure tones** (a beep, a test tone, a whistle) put nearly all their energy into one
  spectral line: a frame whose 4 strongest adjacent bins (a Hann window's main lobe,
  wherever the tone falls between bins) hold ``vad_tone_peak`` (0.99-0.997) of its
  speech-band energy is closed at once (tones: 0.999 and up; Piper speech: at most 0.984).
* **Hold.** The weight follows the evidence up at once and falls with ``vad_release_s``
  (0.11 s), so it does not flicker between frames.

Options (of the ``visemes`` engine; pairs are the ramp's 0 and 1 points): ``vad`` (true),
``vad_window_s``, ``vad_still_db``, ``vad_dip_db``, ``vad_glide``, ``vad_onset_db``,
``vad_own_db``, ``vad_tone_peak``, ``vad_release_s``. All arithmetic is vectorised over the
frames of a chunk; a session's state is a few past frames' levels, glides, onsets and
voicing, so chunking does not change the result. ``python -m perf vad`` measures it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from giris.workers.frame_spectra import hann
from giris.workers.sliding_history import SILENT_DB, slide

_QUIET_S = 0.2              # an onset rises above everything this long before it
_GLIDE = (0.003, 0.15)      # |Δ ln f0| between voiced frames that counts as a glide
_CLARITY = 0.5              # normalised autocorrelation peak that makes a frame voiced
_F0 = (70.0, 500.0)         # pitch range searched (Hz)
_VOICE_BAND = (150.0, 4000.0)  # autocorrelation band: not a fan's or a hum's low rumble
_SPEECH_BAND = (80.0, 4000.0)
_OWN_S = 0.16               # a sound's own frames since its onset are judged once this many
_VOICED_SHARE = (0.2, 0.5)  # share of voiced frames since an onset that spares it that check
_LEVEL, _BAND, _GLIDED, _START, _VOICED = range(5)   # rows of GateState.hist
_SILENCE = np.array([[SILENT_DB], [SILENT_DB], [0.0], [0.0], [0.0]])  # before a session began

Ramp = tuple[float, float]


@dataclass
class GateState:
    #: the last frames (oldest first): level and speech-band level (dBFS), whether the
    #: pitch glided, whether a run of onsets began there, whether it was voiced (0/1);
    #: empty in a new session, which has heard silence
    hist: np.ndarray = field(default_factory=lambda: np.zeros((5, 0)))
    f0: float = 0.0          # the last frame's pitch (0: unvoiced)
    onset: bool = False      # whether the last frame was an onset (a rise can span two)
    weight: float = 0.0      # the last frame's weight before the tone check (for the hold)


def _ramp_option(o: Mapping[str, Any], key: str, default: Ramp) -> Ramp:
    lo, hi = (float(v) for v in o.get(key, default))
    if not hi > lo:
        raise ValueError(f"{key} must be [low, high] with low < high, not {[lo, hi]}")
    return lo, hi


class SpeechGate:
    """Per-frame speech likeness of live audio; ``None`` where ``options['vad']`` is false."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        o = options
        self.window_s = float(o.get("vad_window_s", 0.6))
        self.still = _ramp_option(o, "vad_still_db", (4.0, 8.0))
        self.dip = _ramp_option(o, "vad_dip_db", (16.0, 24.0))
        self.glide = _ramp_option(o, "vad_glide", (0.07, 0.2))
        self.onset = _ramp_option(o, "vad_onset_db", (10.0, 16.0))
        self.own = _ramp_option(o, "vad_own_db", (6.0, 12.0))
        self.tone = _ramp_option(o, "vad_tone_peak", (0.99, 0.997))
        self.release_s = max(float(o.get("vad_release_s", 0.11)), 1e-3)

    def weights(self, power: np.ndarray, nfft: int, sr: int, db: np.ndarray,
                fps: float, state: GateState) -> np.ndarray:
        """Weight in [0, 1] per frame; ``power`` is each frame's spectrum as the gate reads
        it (:func:`giris.workers.frame_spectra.frame_spectra`: no look-ahead), ``db`` its
        level (dBFS) over its display interval."""
        n = db.shape[0]
        if n == 0:
            return np.zeros(0)
        m = max(2, int(round(self.window_s * fps)))
        q = min(m - 1, max(1, int(round(_QUIET_S * fps))))
        peak, f0, band = _spectral(power, nfft, sr)

        prev = np.concatenate(([state.f0], f0[:-1]))
        state.f0 = float(f0[-1])
        step = np.abs(np.log((f0 + 1e-3) / (prev + 1e-3)))
        glided = (f0 * prev > 0) & (step >= _GLIDE[0]) & (step <= _GLIDE[1])

        level = np.maximum(db, SILENT_DB)
        rise = db - slide(state.hist[_LEVEL, -q:], level, q + 1, SILENT_DB)[0][:, :q].max(axis=1)
        onset = rise >= self.onset[0]
        start = onset & ~np.concatenate(([state.onset], onset[:-1]))
        state.onset = bool(onset[-1])
        new = np.stack([level, np.maximum(band, SILENT_DB), glided, start, f0 > 0])
        w, state.hist = slide(state.hist, new, m, _SILENCE)
        depth = np.ptp(w[_BAND], axis=1)
        share = w[_GLIDED].mean(axis=1)
        evidence = _ramp(depth, self.still) * np.maximum(_ramp(depth, self.dip), _ramp(share, self.glide))

        # a sound's own frames (module docstring): those after the first of the last run of
        # onsets in the window (its own window is cut by the onset), once they span _OWN_S
        began = (w[_START] * np.arange(1, m + 1)).max(axis=1) - 1  # -1: none in the window
        count = m - 1 - began
        judged = (began >= 0) & (count >= max(1, int(round(_OWN_S * fps))))
        if judged.any():
            own = np.arange(m) > began[:, None]
            b = w[_BAND]
            own_depth = np.where(own, b, SILENT_DB).max(axis=1) - np.where(own, b, -SILENT_DB).min(axis=1)
            voiced = (w[_VOICED] * own).sum(axis=1) / np.maximum(count, 1)
            keep = np.maximum(_ramp(own_depth, self.own), _ramp(voiced, _VOICED_SHARE))
            evidence = np.where(judged, evidence * keep, evidence)
        evidence = np.maximum(evidence, _ramp(rise, self.onset))
        # instant rise, exponential fall: g_k = max(e_k, r g_{k-1}), in closed form (logs)
        lr = -1.0 / (self.release_s * fps)
        j = np.arange(n)
        held = np.maximum(np.maximum.accumulate(np.log(evidence + 1e-6) - lr * j),
                          np.log(state.weight + 1e-6) + lr) + lr * j
        g = np.exp(held)
        state.weight = float(g[-1])
        g *= 1.0 - _ramp(peak, self.tone)
        g[g < 1e-4] = 0.0
        return g


def _spectral(power: np.ndarray, nfft: int, sr: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame, from its power spectrum: the share of the speech band's energy in its
    strongest 4 bins, the pitch (Hz, 0 if unvoiced) and the speech-band level (dBFS)."""
    band, voice, wac, lo, hi, scale = _analysis(nfft, sr)
    p = power[:, band]
    total = p.sum(axis=1)
    peak = (p[:, :-3] + p[:, 1:-2] + p[:, 2:-1] + p[:, 3:]).max(axis=1) / (total + 1e-20)
    level = 10.0 * np.log10(total * scale + 1e-12)
    ac = np.fft.irfft(power * voice, nfft, axis=1)[:, :hi + 1]
    r = ac[:, lo - 1:] / (ac[:, :1] * wac + 1e-20)   # normalised, lags lo - 1 .. hi
    rows = np.arange(0, r.size, r.shape[1])
    top = r[:, 1:-1].argmax(axis=1)
    flat = r.ravel()
    a, b, c = flat[rows + top], flat[rows + top + 1], flat[rows + top + 2]
    # parabolic interpolation of the peak; a peak at the search's edge is no pitch
    off = np.minimum(np.maximum(0.5 * (a - c) / np.minimum(a - 2 * b + c, -1e-12), -1.0), 1.0)
    f0 = np.where((b > _CLARITY) & (b > a) & (b >= c), sr / (lo + top + off), 0.0)
    return peak, f0, level


@lru_cache(maxsize=16)
def _analysis(nfft: int, sr: int) -> tuple:
    """Speech-band slice, voicing band, the window's own autocorrelation over the lags
    searched, those lags' bounds, and the level scale."""
    f = np.fft.rfftfreq(nfft, 1.0 / sr)
    w = hann(nfft)
    lo, hi = int(sr / _F0[1]), min(int(np.ceil(sr / _F0[0])), nfft // 2 - 2)
    wac = np.fft.irfft(np.abs(np.fft.rfft(w)) ** 2, nfft)
    wac = np.maximum(wac / wac[0], 1e-3)[lo - 1:hi + 1]
    band = slice(int(np.searchsorted(f, _SPEECH_BAND[0])), int(np.searchsorted(f, _SPEECH_BAND[1])))
    voice = ((f >= _VOICE_BAND[0]) & (f < _VOICE_BAND[1])).astype(np.float64)
    scale = 2.0 / (nfft * np.sum(w ** 2))  # Parseval: mean square of the windowed samples
    return band, voice, wac, lo, hi, scale


def _ramp(x: np.ndarray, lohi: Ramp) -> np.ndarray:
    lo, hi = lohi
    return np.minimum(np.maximum((x - lo) / (hi - lo), 0.0), 1.0)
