"""Live audio (``audio_in``, no phonemes) through the real ``visemes`` coeffs engine, fed as
its stage worker feeds it, in 20 ms chunks: what a live microphone picks up besides the
voice must not move the mouth (``workers/noise_floor.py``, ``workers/voice_activity.py``).

Speech is the real Piper voice; the other sounds are the benchmark's (``perf/vad.py``).
The acoustic path opened the mouth for any sound: a steady tone or music held it open
wider than speech does on average, and over a hum the mouth stayed open in every pause."""
from __future__ import annotations

import math

import numpy as np
import pytest

from giris.workers.coefficients import INDEX
from giris.workers.coeffs_visemes import VisemeEngine
from giris.workers.engine import EngineContext, StageInput
from perf.vad import beeps, fan, framed_db, hum, music, noise, pcm16, piper, resample, tone

JAW = INDEX["jawOpen"]
FPS = 25
AS_IT_WAS = {"vad": False, "floor_subtract": 0}  # the acoustic path before the gate and floor


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
        now, before = live(pcm, sr, {"vad": False}), live(pcm, sr, AS_IT_WAS)
        _, voiced = pauses_and_voiced(clean, sr, len(now))
        assert np.abs(now - before)[voiced].max() < 0.05  # (over the floor: it held the mouth ajar)
        assert np.abs(now - before).mean() < 0.005


# ------------------------------------------------------------------ speech gate
@pytest.mark.parametrize("sound", [tone, hum, fan, noise])
@pytest.mark.parametrize("sr", [16000, 48000])
def test_a_steady_sound_leaves_the_mouth_shut(sound, sr):
    """A tone, a hum, a fan or steady noise does not dip as syllables do: once the gate's
    window (0.6 s) has heard it the mouth is shut within a second, a pure tone at once
    (the mouth eases shut over a few frames). All but white noise held it ~0.5 open."""
    jaw = live(np.concatenate([quiet(sr), sound(sr, 3.0), quiet(sr)]), sr)
    body = jaw[15:15 + 75]
    settled = 5 if sound is tone else 25
    assert body[settled:].max() < 0.02, (sound.__name__, body.round(2))


@pytest.mark.parametrize("sound", [hum, fan])
@pytest.mark.parametrize("sr", [16000, 48000])
@pytest.mark.parametrize("silence_s", [1.0, 1.013])
def test_a_steady_sound_that_starts_after_silence_closes_the_mouth_soon(sound, sr, silence_s):
    """A hum or a fan that starts after silence: its onset counts as speech (the first
    frame of a word must open), and the silence before it counted as its dip until that
    left the gate's 0.6 s window, so the mouth stood ~0.45 open for 0.6 s. Only the
    frames since the onset count now: closed from 0.16 s on (the jaw eases shut after)."""
    jaw = live(np.concatenate([quiet(sr, silence_s), sound(sr, 2.0)]), sr)
    body = jaw[int(round(silence_s * FPS)):][:15]  # its first 0.6 s
    assert body.mean() < 0.25 and body[10:].max() < 0.1, (sound.__name__, body.round(2))  # was 0.38-0.45


@pytest.mark.parametrize("sr", [16000, 48000])
def test_beeps_open_the_mouth_for_a_frame_at_most(sr):
    """0.15 s beeps once a second (a phone, a microwave) opened the mouth for 3-4 frames
    each; now only a beep's first frame may (half its window is the silence before)."""
    jaw = live(beeps(sr, 5.0), sr)
    for second in range(5):
        assert (jaw[second * FPS:(second + 1) * FPS] > 0.1).sum() <= 1, jaw.round(2)


@pytest.mark.parametrize("sr", [16000, 22050, 48000])
def test_music_barely_moves_the_mouth(sr):
    """Music-like sound dips 10-16 dB (speech 20-50) and holds each note's pitch: once the
    window has heard it the mouth is nearly shut. It was 0.55 open on average."""
    pcm = np.concatenate([quiet(sr), music(sr, 6.0)])
    after = live(pcm, sr)[15 + FPS:]
    assert after.mean() < 0.05 and np.mean(after > 0.1) < 0.2, (after.mean(), np.mean(after > 0.1))
    assert live(pcm, sr, AS_IT_WAS)[15 + FPS:].mean() > 0.4  # what was taken away


@pytest.mark.parametrize("sr", [16000, 22050, 48000])
def test_speech_moves_the_mouth_as_it_did(speech, sr):
    """Real speech passes the gate untouched: the same jaw frame by frame, the first frame
    of each word after a pause included (no added latency)."""
    voice, voice_sr = speech
    pcm = np.concatenate([quiet(sr), resample(voice, voice_sr, sr), quiet(sr)])
    gated, plain = live(pcm, sr), live(pcm, sr, {"vad": False})
    assert np.abs(gated - plain).max() < 0.02
    db = framed_db(pcm, sr, len(plain))
    onsets = [k for k in range(5, len(db)) if db[k] > -40 and (db[k - 5:k] < -50).all()]
    assert len(onsets) >= 3
    for k in onsets:
        assert np.allclose(gated[k - 1:k + 3], plain[k - 1:k + 3], atol=1e-3), k
    assert plain[db > db.max() - 25].mean() > 0.2


def test_speech_over_music_still_moves_the_mouth(speech):
    """Speech with music 7 dB under it (a radio in the room): the voice's gliding pitch
    keeps the gate open while it speaks; in its pauses the music alone moves the mouth
    much less than it did."""
    voice, sr = speech
    clean = np.concatenate([quiet(sr, 2.0), voice, quiet(sr)])
    heard = add(clean, music(sr, math.ceil(len(clean) / sr) + 1, -30.0))
    gated, plain = live(heard, sr), live(heard, sr, AS_IT_WAS)
    pause, voiced = pauses_and_voiced(clean, sr, len(gated), after_s=1.0)
    assert gated[voiced].mean() > 0.8 * plain[voiced].mean()
    assert gated[pause].mean() < 0.5 * plain[pause].mean(), (gated[pause].mean(), plain[pause].mean())


def test_the_gate_can_be_turned_off_and_checks_its_options():
    pcm = np.concatenate([quiet(16000), tone(16000, 2.0)])
    assert live(pcm, 16000, AS_IT_WAS)[40:].min() > 0.3  # the acoustic path as it was
    with pytest.raises(ValueError, match="vad_dip_db"):
        VisemeEngine({"vad_dip_db": [24, 16]}, EngineContext(stage="coeffs"))


def test_the_gate_does_not_depend_on_how_the_audio_is_chunked(speech):
    voice, sr = speech
    pcm = np.concatenate([quiet(sr), voice, music(sr, 2.0), tone(sr, 1.0), voice[:sr]])
    for chunk_s in (0.01, 0.1):
        # the acoustic path's own windows are cut at a chunk's end, so frames differ a
        # little with the chunking: the gate adds nothing to that
        plain = np.abs(live(pcm, sr, {"vad": False}, chunk_s) - live(pcm, sr, {"vad": False}, 0.5)).mean()
        assert np.abs(live(pcm, sr, chunk_s=chunk_s) - live(pcm, sr, chunk_s=0.5)).mean() < plain + 0.01


def test_a_live_tone_leaves_the_mouth_shut_and_speech_opens_it_through_a_server(make_server, speech):
    """``audio_in`` through a real server (the ``visemes`` coeffs stage in its worker): a
    2 s tone held the mouth ~0.5 open in the coefficients a client's rig gets; now shut,
    and the speech after it opens it as before."""
    from giris.runtime.client import Coefficients
    from tests.conftest import small_stages

    srv = make_server({"stages": small_stages(coeffs={"engine": "visemes"})})
    s = srv.client().open_session(want=["audio", "coeffs"])
    sr = 16000
    voice, voice_sr = speech
    said = resample(voice[:int(5.5 * voice_sr)], voice_sr, sr)  # the live-audio budget: bursts of 12 s
    pcm = np.concatenate([quiet(sr), tone(sr, 2.0), quiet(sr, 0.4), said, quiet(sr)])
    step = sr // 10  # 0.1 s a message, as a client streams a microphone
    utt = None
    for a in range(0, len(pcm), step):
        utt = s.send_audio(pcm[a:a + step], sr, utterance=utt, final=a + step >= len(pcm))
    jaw: dict[int, float] = {}
    for item in s.stream(utt, timeout=30):
        if isinstance(item, Coefficients):
            for j, row in enumerate(item.values):
                jaw[item.first_frame + j] = float(row[JAW])
    s.close()
    frames = np.array([jaw[k] for k in range(math.ceil(len(pcm) * FPS / sr))])
    held = frames[15 + 5:15 + 50]       # the tone, from its 6th frame
    spoken = frames[15 + 50 + 10:-15]   # the speech
    assert held.max() < 0.02, held.round(2)
    assert spoken.max() > 0.4 and np.mean(spoken > 0.1) > 0.4


def test_sliding_windows_do_not_depend_on_chunking():
    """The floor's and the gate's history (``workers/sliding_history.py``): each frame's
    window is the same whether the frames come one at a time or many, silence before."""
    from giris.workers.sliding_history import slide

    x = np.random.default_rng(0).normal(size=(2, 40))
    silence = np.array([[-70.0], [0.0]])
    whole = np.concatenate([np.broadcast_to(silence, (2, 6)), x], axis=1)
    expected = np.stack([whole[:, k:k + 7] for k in range(40)], axis=1)
    kept, got, a = np.zeros((2, 0)), [], 0
    for size in (1, 0, 5, 1, 13, 20):
        windows, kept = slide(kept, x[:, a:a + size], 7, silence)
        got.append(windows.copy())
        a += size
    assert np.array_equal(np.concatenate(got, axis=1), expected)
    windows, kept = slide(np.zeros(0), np.arange(3.0), 1, -70.0)  # a window of one frame
    assert np.array_equal(windows, [[0.0], [1.0], [2.0]]) and kept.shape == (0,)


def test_live_audio_keeps_no_state_that_nothing_reads(speech):
    """The background's floor is tracked only where it is subtracted (``floor_subtract``
    above 0), and the quiet track (where a stop before a pause falls silent) only on the
    phoneme path: both ran on every live frame for nothing."""
    voice, sr = speech
    pcm = voice[:2 * sr]
    engine = VisemeEngine({"floor_subtract": 0}, EngineContext(stage="coeffs"))
    state = engine.open_session({})
    step = sr // 50
    for a in range(0, len(pcm), step):
        meta = {"utterance": 1, "sample_rate": sr, "start_sample": a, "phonemes": None, "final": False}
        list(engine.process(StageInput("audio", a // step, a / sr, meta, [pcm[a:a + step]]), state))
    assert state.floor.levels.size == 0 and state.quiet.size == 0
    assert state.voice.hist.shape[1] > 0  # the gate is in use and keeps its history


def test_each_window_of_live_audio_is_transformed_once(speech, monkeypatch):
    """The viseme shape and the speech gate read the same window wherever a frame's window
    is whole: one FFT serves both (each took its own, so every frame had two). Only the
    windows cut at a chunk's end (``workers/frame_spectra.py``) take a second one."""
    from giris.workers.frame_spectra import frame_spectra, hann

    voice, sr = speech
    rows, rfft = [], np.fft.rfft

    def counted(a, *args, **kwargs):
        if np.ndim(a) == 2:  # frames (not the gate's one-off analysis of its window)
            rows.append(np.shape(a)[0])
        return rfft(a, *args, **kwargs)

    monkeypatch.setattr(np.fft, "rfft", counted)
    frames = live(voice[:3 * sr], sr, chunk_s=0.5)
    assert len(rows) == 6 and sum(rows) < 1.3 * len(frames), (rows, len(frames))  # was 12, 2 × frames
    monkeypatch.undo()

    buf = np.random.default_rng(3).normal(size=3000).astype(np.float32)
    centers = np.array([100, 1500, 2700, 2990])
    centred, ending = frame_spectra(buf, centers, 1024)
    z = np.concatenate([np.zeros(1024), buf, np.zeros(2048)])
    for i, c in enumerate(centers):
        a = c - 512
        assert np.allclose(centred[i], np.abs(np.fft.rfft(z[1024 + a:2048 + a] * hann(1024))) ** 2)
        a = min(a, len(buf) - 1024)  # the gate's window ends at the last sample at most
        assert np.allclose(ending[i], np.abs(np.fft.rfft(z[1024 + a:2048 + a] * hann(1024))) ** 2)


def test_a_live_chunk_that_covers_no_frame_is_not_analysed(speech, monkeypatch):
    """In 20 ms chunks at 25 FPS every other chunk covers no frame: it ran the whole
    acoustic path on empty arrays, whose results nothing read; now it only keeps its
    samples."""
    voice, sr = speech
    levels, level = [], VisemeEngine._level

    def counted(buf, centers, period):
        levels.append(centers.shape[0])
        return level(buf, centers, period)

    monkeypatch.setattr(VisemeEngine, "_level", staticmethod(counted))
    frames = live(voice[:sr], sr)
    assert len(frames) == 25 and levels == [1] * 25, levels  # was 50 calls, every other one empty
