"""``python -m perf vad``: the acoustic path for live audio, before (``vad = false``,
``floor_subtract = 0``: loudness alone) / after (the defaults: the background's floor taken
out, the speech gate).

Each signal is sent as live audio (no phonemes) in 20 ms chunks through the real
``visemes`` coeffs engine and the ``prosody`` motion engine, as their stage workers call
them; jawOpen is read after the motion stage (what is rendered). Speech is the real Piper
voice (two passages, one also pitched up x1.6 as a high voice, one in a room and a hall);
the other sounds are those a live microphone picks up. Per signal and sample rate:

* speech: correlation of jawOpen with the clean speech's level (dB, floored at -60),
  mean jawOpen on its voiced frames (level within 25 dB of its peak), in its pauses
  (under -50 dBFS for 7 frames), and per word after a pause (>= 5 frames under -50 dBFS
  then over -40) the frames until jawOpen passes 0.08 (-1: it was open already);
* other sounds: mean and max jawOpen, the share of frames over 0.1, and after the first
  second (the gate's window has heard them by then).

Then the coeffs engine's CPU time per frame with and without the gate, by chunk size.
"""
from __future__ import annotations

import argparse
import math
import time
from functools import lru_cache
from typing import Callable

import numpy as np

from perf.common import emit_json, machine, table

FPS = 25
BEFORE = {"vad": False, "floor_subtract": 0}  # the acoustic path as it was: loudness alone
LEAD_S = 1.0  # silence before and after each signal: the avatar starts and ends at rest
TEXTS = ("Well, I think we should start with the weather. It rained all morning, so the garden "
         "looks greener than ever! Did you remember to call your sister? She wanted to know about "
         "Saturday. Quietly, slowly, the boat drifted toward the shore while birds sang above the old "
         "lighthouse.",
         "Hello there, my friend. How was your day? I walked along the river, and it rained. Numbers "
         "like forty two and seven hundred are easy to say. What time does the last train leave?")


# ------------------------------------------------------------------ signals
def pcm16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 32768), -32768, 32767).astype(np.int16)


def at_dbfs(x: np.ndarray, dbfs: float) -> np.ndarray:
    """``x`` scaled to an RMS of ``dbfs``, as int16."""
    return pcm16(x * 10 ** (dbfs / 20) / np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited (FFT) resampling of int16 audio."""
    if sr_in == sr_out:
        return x.copy()
    n = int(round(len(x) * sr_out / sr_in))
    spec = np.fft.rfft(x.astype(np.float64))
    out = np.zeros(n // 2 + 1, complex)
    k = min(len(out), len(spec))
    out[:k] = spec[:k]
    return np.clip(np.rint(np.fft.irfft(out, n) * n / len(x)), -32768, 32767).astype(np.int16)


def tone(sr: int, seconds: float, hz: float = 440.0, dbfs: float = -12.0) -> np.ndarray:
    return at_dbfs(np.sin(2 * np.pi * hz * np.arange(int(sr * seconds)) / sr), dbfs)


def hum(sr: int, seconds: float, dbfs: float = -30.0) -> np.ndarray:
    """Mains hum through a cheap microphone: 50 Hz and its harmonics."""
    t = np.arange(int(sr * seconds)) / sr
    return at_dbfs(sum(np.sin(2 * np.pi * 50 * h * t + h) / h for h in range(1, 12)), dbfs)


def fan(sr: int, seconds: float, dbfs: float = -35.0) -> np.ndarray:
    """A fan: low-frequency-heavy noise with a slight blade-rate wobble."""
    n = int(sr * seconds)
    spec = np.fft.rfft(np.random.default_rng(4).standard_normal(n))
    spec /= np.maximum(np.fft.rfftfreq(n, 1 / sr), 50.0) ** 0.8
    return at_dbfs(np.fft.irfft(spec, n) * (1 + 0.1 * np.sin(2 * np.pi * 23 * np.arange(n) / sr)), dbfs)


def noise(sr: int, seconds: float, dbfs: float = -20.0) -> np.ndarray:
    return at_dbfs(np.random.default_rng(1).standard_normal(int(sr * seconds)), dbfs)


def beeps(sr: int, seconds: float, hz: float = 1000.0) -> np.ndarray:
    """0.15 s beeps once a second (a phone, a microwave), -15 dBFS while sounding."""
    t = np.arange(int(sr * seconds)) / sr
    return pcm16(((t % 1.0) < 0.15) * math.sqrt(2) * 10 ** (-15 / 20) * np.sin(2 * np.pi * hz * t))


def music(sr: int, seconds: float, dbfs: float = -16.0) -> np.ndarray:
    """Music-like: plucked harmonic notes in eighths at 120 bpm over a chord progression
    (each rings on 0.4 s), bass and kick on the beat, a hi-hat on every eighth."""
    rng = np.random.default_rng(2)
    n = int(sr * seconds)
    t = np.arange(n) / sr
    y = np.zeros(n)
    chords = [[60, 64, 67], [57, 60, 64], [53, 57, 60], [55, 59, 62]]
    for i in range(int(seconds / 0.25) + 1):
        a, b = int(i * 0.25 * sr), min(n, int((i + 2.6) * 0.25 * sr))
        if a >= n:
            break
        tt = t[a:b] - t[a]
        chord = chords[(i // 8) % 4]
        hz = 440 * 2 ** ((chord[rng.integers(3)] + 12 - 69) / 12)
        y[a:b] += 0.3 * np.exp(-6 * tt) * sum(np.sin(2 * np.pi * hz * h * tt) / h for h in range(1, 6))
        if i % 2 == 0:
            bass = 440 * 2 ** ((chord[0] - 24 - 69) / 12)
            y[a:b] += 0.4 * np.exp(-3 * tt) * np.sin(2 * np.pi * bass * tt)
            y[a:b] += 0.8 * np.exp(-30 * tt) * np.sin(2 * np.pi * 60 * tt * (1 + 2 * np.exp(-40 * tt)))
        hat = min(b, a + int(0.03 * sr))
        y[a:hat] += 0.1 * rng.standard_normal(hat - a) * np.exp(-150 * np.arange(hat - a) / sr)
    return at_dbfs(y, dbfs)


def reverb(x: np.ndarray, sr: int, rt60: float, drr_db: float) -> np.ndarray:
    """Room sound: the direct path plus an exponentially decaying noise tail (``rt60``)
    ``drr_db`` below it; the same loudness out."""
    n = int(sr * rt60 * 1.2)
    t = np.arange(n) / sr
    h = np.random.default_rng(5).standard_normal(n) * 10 ** (-3 * t / rt60)
    h[:int(0.005 * sr)] = 0.0
    h *= 10 ** (-drr_db / 20) / np.sqrt(np.sum(h ** 2))
    h[0] = 1.0
    size = len(x) + n
    y = np.fft.irfft(np.fft.rfft(x.astype(np.float64), size) * np.fft.rfft(h, size), size)[:len(x)]
    return pcm16(y * np.sqrt(np.mean(x.astype(np.float64) ** 2) / np.mean(y ** 2)) / 32768)


@lru_cache(maxsize=2)
def piper(which: int) -> tuple[np.ndarray, int]:
    """A passage of the real Piper voice, and its sample rate: the same every run."""
    from giris.workers.engine import EngineContext, StageInput
    from giris.workers.tts_piper import PiperEngine

    # no sampling noise: the same speech every run (VITS draws it at random otherwise)
    voice = PiperEngine({"noise_scale": 0.0, "noise_w_scale": 0.0}, EngineContext(stage="tts"))
    said = voice.process(StageInput("say", 0, 0.0, {"utterance": 1, "text": TEXTS[which]}),
                         voice.open_session({}))
    return np.concatenate([o.tensors[0] for o in said if o is not None]), voice.sample_rate


def speech(sr: int, which: int = 0, pitch: float = 1.0) -> np.ndarray:
    """Piper speech at ``sr``; ``pitch`` > 1 plays it faster (pitch and formants up)."""
    x, voice_sr = piper(which)
    return resample(resample(x, voice_sr, int(round(voice_sr / pitch))), voice_sr, sr) if pitch != 1 \
        else resample(x, voice_sr, sr)


def mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return pcm16((a.astype(np.float64) + b[:len(a)]) / 32768)


SPEECH: dict[str, Callable[[int], tuple[np.ndarray, np.ndarray]]] = {
    # name: sr -> (what the microphone hears, the speech alone)
    "speech": lambda sr: (speech(sr),) * 2,
    "speech, 2nd passage": lambda sr: (speech(sr, 1),) * 2,
    "speech, high voice": lambda sr: (speech(sr, 1, 1.6),) * 2,
    "speech, room (RT60 0.4 s)": lambda sr: (reverb(speech(sr), sr, 0.4, 0.0), speech(sr)),
    "speech, hall (RT60 0.8 s)": lambda sr: (reverb(speech(sr), sr, 0.8, -5.0), speech(sr)),
    "speech + noise floor -55": lambda sr: (mix(speech(sr), noise(sr, 40, -55)), speech(sr)),
    "speech + fan -40": lambda sr: (mix(speech(sr), fan(sr, 40, -40)), speech(sr)),
    "speech + fan -30": lambda sr: (mix(speech(sr), fan(sr, 40, -30)), speech(sr)),
    "speech + hum -40": lambda sr: (mix(speech(sr), hum(sr, 40, -40)), speech(sr)),
    "speech + music -30": lambda sr: (mix(speech(sr), music(sr, 40, -30)), speech(sr)),
    "speech + music -23": lambda sr: (mix(speech(sr), music(sr, 40, -23)), speech(sr)),
}
OTHER: dict[str, Callable[[int], np.ndarray]] = {
    "silence": lambda sr: np.zeros(8 * sr, np.int16),
    "tone 440 Hz -12": lambda sr: tone(sr, 8),
    "tone 150 Hz -20": lambda sr: tone(sr, 8, 150.0, -20.0),
    "hum 50 Hz -30": lambda sr: hum(sr, 8),
    "beeps 1 kHz": lambda sr: beeps(sr, 8),
    "fan -35": lambda sr: fan(sr, 8),
    "fan -20": lambda sr: fan(sr, 8, -20.0),
    "noise -20": lambda sr: noise(sr, 8),
    "noise -50": lambda sr: noise(sr, 8, -50.0),
    "music -16": lambda sr: music(sr, 8),
}


# ------------------------------------------------------------------ harness
def live(pcm: np.ndarray, sr: int, options: dict, chunk_s: float = 0.02) -> tuple[np.ndarray, float]:
    """(jawOpen per frame after the motion stage, coeffs CPU seconds per frame)."""
    from giris.workers.coefficients import INDEX
    from giris.workers.coeffs_visemes import VisemeEngine
    from giris.workers.engine import EngineContext, StageInput
    from giris.workers.motion_prosody import ProsodyMotionEngine

    coeffs = VisemeEngine(options, EngineContext(stage="coeffs"))
    motion = ProsodyMotionEngine({}, EngineContext(stage="motion"))
    cs, ms = coeffs.open_session({}), motion.open_session({"seed": 3})
    step = max(1, int(round(chunk_s * sr)))
    jaw, spent = [], 0.0
    for a in range(0, len(pcm), step):
        meta = {"utterance": 1, "sample_rate": sr, "start_sample": a, "phonemes": None,
                "final": a + step >= len(pcm)}
        t0 = time.process_time()
        outs = list(coeffs.process(StageInput("audio", a // step, a / sr, meta, [pcm[a:a + step]]), cs))
        spent += time.process_time() - t0
        for o in outs:
            for m in motion.process(StageInput("coeffs", o.seq, o.pts, o.meta, o.tensors), ms):
                jaw.append(m.tensors[0][:, INDEX["jawOpen"]])
    jaw = np.concatenate(jaw)
    return jaw, spent / max(len(jaw), 1)


def framed_db(pcm: np.ndarray, sr: int, frames: int) -> np.ndarray:
    """Level (dBFS) over each frame's display interval."""
    x = pcm.astype(np.float64) / 32768
    out = np.full(frames, -100.0)
    for k in range(frames):
        w = x[int(k * sr / FPS):int((k + 1) * sr / FPS)]
        if w.size:
            out[k] = 10 * np.log10(np.mean(w ** 2) + 1e-10)
    return out


def speech_figures(jaw: np.ndarray, db: np.ndarray) -> dict:
    lead = int(LEAD_S * FPS)
    body = slice(lead, len(jaw) - lead)
    voiced = db > db.max() - 25
    pause = np.array([db[max(0, k - 3):k + 4].max() < -50 for k in range(len(db))])
    pause[:lead] = False
    onsets = [k for k in range(lead - 2, len(db)) if db[k] > -40 and (db[max(0, k - 5):k] < -50).all()]
    late = []
    for k in onsets:
        j = k - 1
        while j < len(jaw) and jaw[j] <= 0.08:
            j += 1
        late.append(j - k)
    return {"corr": float(np.corrcoef(jaw[body], np.maximum(db[body], -60))[0, 1]),
            "voiced": float(jaw[voiced].mean()), "pauses": float(jaw[pause].mean()),
            "onset_frames": late}


def other_figures(jaw: np.ndarray) -> dict:
    lead = int(LEAD_S * FPS)
    body = jaw[lead:len(jaw) - lead]
    return {"mean": float(body.mean()), "max": float(body.max()), "over_0_1": float(np.mean(body > 0.1)),
            "later_mean": float(body[FPS:].mean()), "later_max": float(body[FPS:].max())}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf vad")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rates", default="16000,22050,48000")
    ap.add_argument("--no-cost", action="store_true", help="skip the CPU time table")
    args = ap.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",")]
    result: dict = {"speech": {}, "other": {}, "cost_us_per_frame": {}}
    rows = [("speech", "Hz", "corr before", "after", "voiced before", "after", "pauses before", "after",
             "word onsets: frames late before", "after")]
    for name, make in SPEECH.items():
        for sr in rates:
            heard, alone = make(sr)
            pad = np.zeros(int(LEAD_S * sr), np.int16)
            heard, alone = np.concatenate([pad, heard, pad]), np.concatenate([pad, alone, pad])
            b, _ = live(heard, sr, BEFORE)
            a, _ = live(heard, sr, {})
            db = framed_db(alone, sr, len(b))
            fb, fa = speech_figures(b, db), speech_figures(a, db)
            result["speech"][f"{name} @{sr}"] = {"before": fb, "after": fa}
            rows.append((name, str(sr), f"{fb['corr']:.3f}", f"{fa['corr']:.3f}", f"{fb['voiced']:.3f}",
                         f"{fa['voiced']:.3f}", f"{fb['pauses']:.3f}", f"{fa['pauses']:.3f}",
                         " ".join(map(str, fb["onset_frames"])), " ".join(map(str, fa["onset_frames"]))))
    print(f"perf vad — live audio through the coeffs + motion engines, jawOpen as rendered ({machine()})")
    table(rows)
    rows = [("sound", "Hz", "mean before", "after", "max before", "after", ">0.1 before", "after",
             "after 1st s: mean before", "after", "max before", "after")]
    for name, make in OTHER.items():
        for sr in rates:
            pad = np.zeros(int(LEAD_S * sr), np.int16)
            heard = np.concatenate([pad, make(sr), pad])
            fb, fa = other_figures(live(heard, sr, BEFORE)[0]), other_figures(live(heard, sr, {})[0])
            result["other"][f"{name} @{sr}"] = {"before": fb, "after": fa}
            rows.append((name, str(sr), *(f"{f[k]:.3f}" for k in ("mean", "max") for f in (fb, fa)),
                         *(f"{f['over_0_1']:.2f}" for f in (fb, fa)),
                         *(f"{f[k]:.3f}" for k in ("later_mean", "later_max") for f in (fb, fa))))
    print()
    table(rows)
    if not args.no_cost:
        rows = [("coeffs CPU per frame", "Hz", "chunk ms", "before µs", "after µs", "added µs")]
        for sr in rates:
            pcm = np.concatenate([speech(sr), music(sr, 4)])
            for chunk_s in (0.02, 0.1, 0.5):
                off = min(live(pcm, sr, BEFORE, chunk_s)[1] for _ in range(3)) * 1e6
                on = min(live(pcm, sr, {}, chunk_s)[1] for _ in range(3)) * 1e6
                result["cost_us_per_frame"][f"{sr} {chunk_s * 1000:.0f} ms"] = {"without": off, "with": on}
                rows.append(("", str(sr), f"{chunk_s * 1000:.0f}", f"{off:.0f}", f"{on:.0f}",
                             f"{on - off:+.0f}"))
        print()
        table(rows)
        print("CPU time of the coeffs engine alone (process time, best of 3), speech then music")
    if args.json:
        emit_json(result)
    return 0
