"""Live audio (``audio_in``, no phonemes) through the real ``visemes`` coeffs engine, fed as
its stage worker feeds it, in 20 ms chunks: what a live microphone picks up besides the
voice must not move the mouth (``workers/noise_floor.py``).

Speech is the real Piper voice; the other sounds are the benchmark's (``perf/vad.py``).
The acoustic path measured loudness against silence: over a hum the mouth stayed open in
every pause."""
from __future__ import annotations

import numpy as np
import pytest

from giris.workers.coefficients import INDEX
from giris.workers.coeffs_visemes import VisemeEngine
from giris.workers.engine import EngineContext, StageInput
from perf.vad import fan, framed_db, hum, noise, pcm16, piper

JAW = INDEX["jawOpen"]
FPS = 25
AS_IT_WAS = {"floor_subtract": 0}  # the acoustic path as it was: loudness against silence


def live(pcm: np.ndarray, sr: int, options: dict | None = None, chunk_s: float = 0.02) -> np.ndarray:
    """jawOpen per frame of the coeffs stage: ``pcm`` sent as live audio in ``chunk_s`` chunks."""
    engine = VisemeEngine(options or {}, EngineContext(stage="coeffs"))
    state = engine.open_session({})
    step = int(round(chunk_s * sr))
    jaw = []
    for a in range(0, len(pcm), step):
        meta = {"utterance": 1, "sample_rate": sr, "start_sample": a, "phonemes": None,
                "final": a + step >= len(pcm)}
        for out in engine.process(StageInput("audio", a // step, a / sr, meta, [pcm[a:a + step]]), state):
            jaw.append(out.tensors[0][:, JAW])
    return np.concatenate(jaw)


def quiet(sr: int, seconds: float = 0.6) -> np.ndarray:
    return np.zeros(int(sr * seconds), np.int16)


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return pcm16((a.astype(np.float64) + b[:len(a)]) / 32768)


@pytest.fixture(scope="module")
def speech() -> tuple[np.ndarray, int]:
    """Real Piper speech (two sentences, pauses between words and sentences) and its rate."""
    return piper(1)


def pauses_and_voiced(clean: np.ndarray, sr: int, frames: int,
                      after_s: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Frames in a pause of the voice (under -50 dBFS for 7 frames) and voiced frames (within
    25 dB of its peak), both from ``after_s`` on."""
    db = framed_db(clean, sr, frames)
    pause = np.array([db[max(0, k - 3):k + 4].max() < -50 for k in range(frames)])
    voiced = db > db.max() - 25
    pause[:int(after_s * FPS)] = voiced[:int(after_s * FPS)] = False
    return pause, voiced


# ------------------------------------------------------------ steady background
@pytest.mark.parametrize("background", [hum, fan])
def test_the_mouth_closes_in_the_pauses_of_speech_over_a_steady_background(speech, background):
    """Speech over a hum or a fan 40 dB under its peaks: loudness was measured against
    silence, so the mouth stayed ~0.3 open in every pause. It is measured above the
    background now (the lowest level of the last 1.5 s, taken out)."""
    voice, sr = speech
    clean = np.concatenate([quiet(sr, 2.0), voice, quiet(sr)])
    heard = add(clean, background(sr, len(clean) / sr + 1, -40.0))
    jaw, alone = live(heard, sr), live(clean, sr)
    pause, voiced = pauses_and_voiced(clean, sr, len(jaw), after_s=1.6)  # the floor has heard it
    assert pause.sum() > 10 and voiced.sum() > 50
    assert jaw[pause].mean() < 0.1, jaw[pause].mean()  # was ~0.3
    assert jaw[voiced].mean() > 0.8 * alone[voiced].mean()


def test_speech_in_a_quiet_room_is_measured_as_it_was(speech):
    """In silence, or over a floor 55 dB down, nothing on the voiced frames changes; only
    the deepest dip between syllables, where no pause came for 1.5 s, may close a little
    more (it is the floor then)."""
    voice, sr = speech
    clean = np.concatenate([quiet(sr), voice, quiet(sr)])
    for pcm in (clean, add(clean, noise(sr, len(clean) / sr + 1, -55.0))):
        now, before = live(pcm, sr), live(pcm, sr, AS_IT_WAS)
        _, voiced = pauses_and_voiced(clean, sr, len(now))
        assert np.abs(now - before)[voiced].max() < 0.05  # (over the floor: it held the mouth ajar)
        assert np.abs(now - before).mean() < 0.005
