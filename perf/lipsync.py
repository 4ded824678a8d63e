"""``python -m perf lipsync``: lip-sync timing of the ``visemes`` coeffs engine on the real
Piper voice (noise off: the same speech every run), its engines called in-process as their
stage workers call them.

* **Per viseme class**, for every phoneme Piper aligns (its token's first sound; a stress
  mark's time goes to the next token, a length mark extends the last, as the engine reads
  them): the engine's curve of that viseme's weight, sampled at 500 FPS, peaks ``peak``
  after the phoneme's audio onset (``mid``: after the middle of its token) and first
  reaches half that peak ``half`` after the onset (the shape becomes visible: negative
  leads the sound). ``frame``: the same peak at 25 FPS, at the middle of the display
  interval of the frame that shows it; ``shown``: that after the motion stage (its mouth
  filter), as rendered. Medians, with p10..p90.
* **Stops before a pause** (a run of /p t k b d g/ just before a pause of 150 ms or more):
  where the jaw, after the motion stage at 25 FPS, falls under 0.05 after the sound's end
  (the audio's last 5 ms hop at -40 dBFS, not counting a release burst of 10 ms or less
  after 15 ms of quiet: the closure before it ends the sound), per stop. /p b/ ends are
  measured by their lips: ``mouthClose`` on the frame before the pause token, and when
  they fall under 0.1 (released), after the sound's end.

``--save FILE`` writes the figures, ``--baseline FILE`` prints them as the "before" column.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from perf.common import emit_json, pct, table

FPS = 25.0
CURVE_FPS = 500.0
TEXTS = ("I think that's it. That's what I like.",
         "Look at that cat. We cooked, we ate, we slept.",
         "It was good, and that was bad. We said it.",
         "Bob made a map of the big pond. Maybe we should stop.",
         "Please bring the blue bowl, and the red bread. I need it.",
         "Hello there, my friend. How was your day? I walked along the river, and it rained.",
         "Five very fine fish swam through the thick weeds, then vanished.",
         "She read the old card, then she hid. Ed paid, and Fred agreed.",
         "My mother made apple pie. Would you like some more?",
         "The shop opened at nine, but nobody came by until noon.",
         "Take the book. Give me the bag, and the cap. We talked.",
         "That was a big job, Rob. Keep the dog. Stop.")
STOPS = "ptkbdɡ"
BURST_HOPS, QUIET_HOPS = 2, 3  # 5 ms hops: a release burst, the closure's quiet before it
#: the coeffs engine's options (``--set key=value``)
OPTIONS: dict = {}


def piper_chunks(tts, text: str) -> list:
    """Piper's chunks for ``text`` (windows, phonemes, ``phonemes_ahead``) as the coeffs
    stage receives them."""
    from giris.workers.engine import StageInput

    state = tts.open_session({})
    msg = StageInput(type="say", seq=0, pts=0.0, meta={"text": text, "utterance": 1}, tensors=[])
    return [StageInput(type="audio", seq=i, pts=0.0, meta=o.meta, tensors=o.tensors)
            for i, o in enumerate(o for o in tts.process(msg, state) if o is not None)]


def piper_voice(noise: bool = False):
    """The default Piper voice; without its sampling noise (the default here) the same speech
    every run."""
    from giris.workers.engine import EngineContext
    from giris.workers.tts_piper import PiperEngine

    return PiperEngine({} if noise else {"noise_scale": 0, "noise_w_scale": 0}, EngineContext(stage="tts"))


def animate(chunks: list, fps: float = FPS, motion: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """``chunks`` through a fresh coeffs stage (and motion stage): (coefficients, motion)."""
    from giris.workers.coeffs_visemes import VisemeEngine
    from giris.workers.engine import EngineContext, StageInput
    from giris.workers.motion_prosody import ProsodyMotionEngine

    c_engine = VisemeEngine(OPTIONS, EngineContext(stage="coeffs"))
    m_engine = ProsodyMotionEngine({}, EngineContext(stage="motion"))
    cs, ms = c_engine.open_session({"fps": fps}), m_engine.open_session({"seed": 1, "fps": fps})
    coeffs, moved = [], []
    for chunk in chunks:
        for out in c_engine.process(chunk, cs):
            coeffs.append(out.tensors[0])
            if motion:
                msg = StageInput(type="coeffs", seq=out.seq, pts=out.pts, meta=out.meta, tensors=out.tensors)
                moved.extend(o.tensors[0] for o in m_engine.process(msg, ms))
    return np.concatenate(coeffs), (np.concatenate(moved) if motion else None)


def phonemes(chunks: list) -> list[tuple[str, str, float, float]]:
    """(ipa, viseme, start s, end s) of every sounding token, as the engine times them."""
    from giris.workers import visemes as V

    sr = chunks[0].meta["sample_rate"]
    out: list[list] = []
    pending: float | None = None
    for c in chunks:
        for p, s, n in c.meta["phonemes"] or []:
            a, b = (c.meta["start_sample"] + s) / sr, (c.meta["start_sample"] + s + n) / sr
            kind, _, sounds = V.parse(p)
            if kind == "stress":
                pending = a if pending is None else pending
            elif kind == "modifier":
                if out:
                    out[-1][3] = max(out[-1][3], b)
            else:
                vis = V.VISEMES[sounds[0].viseme]
                a, pending = (a if pending is None else min(a, pending)), None
                if vis != "sil":
                    out.append([p, vis, a, b])
                elif out and out[-1][1] != "sil":
                    out.append([p, "sil", a, b])  # kept: a neighbour bound for the peaks
    return [tuple(x) for x in out]


def stops_before_pauses(chunks: list) -> list[tuple[str, float, float, float]]:
    """(stops, sound end, pause token start, pause end) for each run of stops just before a
    pause token: the sound end is where the audio last reaches -40 dBFS (5 ms hops) but for
    a release burst, the pause one of 150 ms or more in the audio."""
    from giris.workers import visemes as V

    sr = chunks[0].meta["sample_rate"]
    pcm = np.concatenate([np.asarray(c.tensors[0]) for c in chunks]).astype(np.float64) / 32768
    hop = int(0.005 * sr)
    level = 20 * np.log10(np.sqrt((pcm[:len(pcm) // hop * hop].reshape(-1, hop) ** 2).mean(1)) + 1e-9)
    phon = [(p, (c.meta["start_sample"] + s) / sr) for c in chunks for p, s, _ in c.meta["phonemes"] or []]
    found = []
    for i in range(1, len(phon)):
        if V.parse(phon[i][0])[0] == "sound" and V.viseme_of(phon[i][0]) == "sil" and phon[i][0] != " " \
                and phon[i - 1][0] in STOPS:
            j = i - 1
            while phon[j - 1][0] in STOPS:
                j -= 1
            h = int(phon[i][1] * sr / hop)
            while h > 0 and level[h - 1] < -40:
                h -= 1
            quiet = silent = h
            while quiet < len(level) and level[quiet] < -40:
                quiet += 1
            # a release burst (<= 10 ms, after >= 15 ms of quiet) is not the sound: the
            # closure before it is where the sound ended
            burst = h - 1
            while burst > 0 and h - burst <= BURST_HOPS and level[burst - 1] >= -40:
                burst -= 1
            if h - burst <= BURST_HOPS and np.all(level[max(burst - QUIET_HOPS, 0):burst] < -40):
                h = burst
                while h > 0 and level[h - 1] < -40:
                    h -= 1
            if (quiet - silent) * hop / sr >= 0.15:
                found.append(("".join(p for p, _ in phon[j:i]), h * hop / sr, phon[i][1], quiet * hop / sr))
    return found


def settles(jaw: np.ndarray, end: float, below: float = 0.05, fps: float = FPS) -> float:
    """Seconds after ``end`` at which the jaw, each frame's from its pts on and linear
    between them, falls under ``below`` (as the lip-sync audits measure it)."""
    k = int(np.ceil((end - 0.12) * fps))
    assert jaw[k] >= below, "the jaw is not open before the sound's end"
    while jaw[k + 1] >= below:
        k += 1
    return k / fps + (jaw[k] - below) / (jaw[k] - jaw[k + 1]) / fps - end


def released(close: np.ndarray, end: float, below: float = 0.1, fps: float = FPS) -> float:
    """Seconds after ``end`` at which the lips, pressed shut (``close``: mouthClose, each
    frame's from its pts on and linear between them) from their most closed frame after
    ``end`` - 40 ms on, fall under ``below``."""
    k = int(np.ceil((end - 0.04) * fps))
    k += int(np.argmax(close[k:k + int(0.2 * fps)]))
    while close[k + 1] >= below:
        k += 1
    return k / fps + (close[k] - below) / (close[k] - close[k + 1]) / fps - end


def peaks(chunks: list) -> dict[str, dict[str, list[float]]]:
    """Per viseme class: each phoneme's offsets (ms), as the module docstring says."""
    from giris.workers.coefficients import VISEME_SLICE
    from giris.workers.coefficients import VISEMES as NAMES

    col = {v: VISEME_SLICE.start + i for i, v in enumerate(NAMES)}
    curve, _ = animate(chunks, CURVE_FPS, motion=False)
    frames, shown = animate(chunks, FPS)
    t = (np.arange(len(curve)) + 0.5) / CURVE_FPS
    tf = (np.arange(len(frames)) + 0.5) / FPS
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    ph = phonemes(chunks)
    for i, (ipa, vis, a, b) in enumerate(ph):
        if vis == "sil" or ipa in STOPS and i + 1 < len(ph) and ph[i + 1][1] == "sil" and ph[i + 1][0] != " ":
            continue  # a stop before a pause is measured as one (``stops_before_pauses``)
        # the peak nearest the token: within it, or up to half a neighbour's token away
        lo = max(a - 0.04, 0.5 * (ph[i - 1][2] + ph[i - 1][3]) if i else 0.0)
        hi = min(b + 0.04, 0.5 * (ph[i + 1][2] + ph[i + 1][3]) if i + 1 < len(ph) else 1e9)
        w = (t >= lo) & (t <= hi)
        y = curve[w, col[vis]]
        k = int(np.argmax(y))
        tp = t[w][k]
        rise = np.nonzero((y[:k + 1] < 0.5 * y[k]))[0]
        th = t[w][rise[-1] + 1] if rise.size else t[w][0]
        wf = (tf >= lo - 0.02) & (tf <= hi + 0.02)
        if wf.any():
            for name, x in (("frame", frames), ("shown", shown)):
                out[vis][name].append(float(1e3 * (tf[wf][int(np.argmax(x[wf, col[vis]]))] - a)))
        out[vis]["peak"].append(float(1e3 * (tp - a)))
        out[vis]["mid"].append(float(1e3 * (tp - 0.5 * (a + b))))
        out[vis]["half"].append(float(1e3 * (th - a)))
        out[vis]["dur"].append(float(1e3 * (b - a)))
    return out


def measure(texts: tuple[str, ...] = TEXTS, noise: bool = False) -> dict:
    from giris.workers.coefficients import INDEX

    tts = piper_voice(noise)
    classes: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    ends: dict[str, list[float]] = defaultdict(list)
    for text in texts:
        chunks = piper_chunks(tts, text)
        for vis, figs in peaks(chunks).items():
            for k, v in figs.items():
                classes[vis][k].extend(v)
        _, motion = animate(chunks)
        for stops, end, token, _ in stops_before_pauses(chunks):
            if any(s in "pb" for s in stops):  # sealed lips: how shut before the pause, how long
                ends["/p b/ mouthClose"].append(float(motion[int(token * FPS) - 1, INDEX["mouthClose"]]))
                ends["/p b/ released"].append(float(1e3 * released(motion[:, INDEX["mouthClose"]], end)))
                ends["/p b/ token after the sound"].append(float(1e3 * (token - end)))
            else:
                ends[f"/{stops[-1]}/"].append(float(1e3 * settles(motion[:, INDEX["jawOpen"]], end)))
    return {"classes": {v: dict(f) for v, f in classes.items()}, "ends": dict(ends)}


def _cell(v: list[float] | None, old: list[float] | None = None) -> str:
    """Median (p10..p90); with ``old``, its median → this one's."""
    if not v:
        return ""
    return f"{pct(old, 50):+.0f} → {pct(v, 50):+.0f}" if old else f"{pct(v, 50):+.0f} ({pct(v, 10):+.0f}..{pct(v, 90):+.0f})"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf lipsync")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", help="write the figures to this file")
    ap.add_argument("--baseline", help="figures saved before (--save): shown as 'before'")
    ap.add_argument("--noise", action="store_true", help="the voice's sampling noise on (runs differ)")
    ap.add_argument("--set", action="append", default=[], help="a coeffs engine option, key=value")
    args = ap.parse_args(argv)
    OPTIONS.update((k, float(v)) for k, v in (kv.split("=", 1) for kv in args.set))
    now = measure(noise=args.noise)
    old = json.load(open(args.baseline)) if args.baseline else None
    if args.save:
        with open(args.save, "w") as f:
            json.dump(now, f)
    from giris.workers.coefficients import VISEMES as NAMES

    keys = ("peak", "mid", "half", "frame", "shown")
    head = ("viseme", "n", "dur ms")
    rows = [head + keys]
    for vis in NAMES:
        if vis not in now["classes"]:
            continue
        f = now["classes"][vis]
        cols = [_cell(f.get(k), old["classes"].get(vis, {}).get(k) if old else None) for k in keys]
        rows.append((vis, str(len(f["peak"])), f"{pct(f['dur'], 50):.0f}", *cols))
    print("perf lipsync — viseme weight vs the phoneme's audio onset, ms, "
          f"{'median before → after' if old else 'median (p10..p90)'}; "
          f"{len(TEXTS)} Piper sentences, noise {'on' if args.noise else 'off'}")
    table(rows)
    rows = [("stop before a pause", "n") + (("before", "after") if old else ("now",))]
    for name in sorted(set(now["ends"]) | set(old["ends"] if old else ())):
        v = now["ends"].get(name, [])
        unit = "" if "mouthClose" in name else " ms"
        fmt = (lambda x: f"{pct(x, 50):.2f} (min {min(x):.2f})") if not unit else \
              (lambda x: f"{pct(x, 50):+.0f} ({min(x):+.0f}..{max(x):+.0f}){unit}")
        cells = ([fmt(old["ends"][name]) if old and old["ends"].get(name) else ""] if old else []) + \
                [fmt(v) if v else ""]
        rows.append((name, str(len(v)), *cells))
    print()
    print("jaw under 0.05 after the sound's end (motion stage, 25 FPS), median (min..max)")
    table(rows)
    if args.json:
        emit_json(now)
    return 0
