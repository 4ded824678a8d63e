"""Stages 02 and 03: visemes from phonemes/audio, the One Euro filter, prosody-driven motion."""
from __future__ import annotations

import math

import numpy as np
import pytest

from giris.workers import visemes as V
from giris.workers.coefficients import INDEX, N_CHANNELS, VISEME_SLICE, frame_range, zeros
from giris.workers.coeffs_visemes import VisemeEngine
from giris.workers.engine import EngineContext, EngineError, StageInput
from giris.workers.motion_prosody import EMOTIONS, ProsodyMotionEngine, blink_shape
from giris.workers.one_euro import OneEuroFilter, smoothing_factor
from perf.lipsync import animate, piper_chunks, piper_voice, settles, stops_before_pauses

SR = 22050
FPS = 25.0
JAW, SIL, PP = INDEX["jawOpen"], INDEX["viseme_sil"], INDEX["viseme_PP"]


# ------------------------------------------------------------------ helpers
def utterance(tokens: list[tuple[str, float]], amp: float = 0.3) -> tuple[np.ndarray, list]:
    """Phoneme list [[ipa, start, n]] and a voice-like signal: harmonics while sounding,
    silence on pauses/punctuation."""
    phon, pos = [], 0
    for ipa, sec in tokens:
        n = int(round(sec * SR))
        phon.append([ipa, pos, n])
        pos += n
    t = np.arange(pos) / SR
    voice = sum(np.sin(2 * np.pi * 140 * h * t) / h for h in range(1, 6))
    mask = np.zeros(pos)
    for ipa, a, n in phon:
        if V.viseme_of(ipa) != "sil" or ipa in "ˈˌː":
            mask[a:a + n] = 1.0
    pcm = (amp * 32767 * 0.6 * voice * mask).astype(np.int16)
    return pcm, phon


HELLO_WORLD = [("^", 0.05), ("h", 0.06), ("ə", 0.06), ("l", 0.06), ("ˈ", 0.01), ("o", 0.12),
               ("ʊ", 0.08), (",", 0.40), ("w", 0.06), ("ˈ", 0.01), ("ɜ", 0.10), ("ː", 0.06),
               ("l", 0.06), ("d", 0.06), (".", 0.15), ("$", 0.02)]


def audio_msg(pcm: np.ndarray, start: int, phon: list | None, final: bool, seq: int = 0,
              ahead: list | None = None) -> StageInput:
    meta = {"utterance": 1, "sample_rate": SR, "start_sample": start, "final": final,
            "phonemes": phon, "text": ""}
    if ahead is not None:
        meta["phonemes_ahead"] = ahead
    return StageInput(type="audio", seq=seq, pts=start / SR, meta=meta, tensors=[pcm])


def run_coeffs(engine: VisemeEngine, state, chunks: list[tuple],
               start: int = 0) -> tuple[np.ndarray, np.ndarray, list]:
    """Feed chunks ``(pcm, phonemes[, ahead])`` through ``engine.process`` like the stage
    worker; return stacked outputs."""
    coeffs, prosody, outs = [], [], []
    for i, (pcm, phon, *ahead) in enumerate(chunks):
        msg = audio_msg(pcm, start, phon, final=i == len(chunks) - 1, seq=i, ahead=(ahead or [None])[0])
        got = list(engine.process(msg, state))
        expected = frame_range(start, len(pcm), SR, FPS)
        if len(expected) or i == len(chunks) - 1:
            assert len(got) == 1
            assert got[0].tensors[0].shape == (len(expected), N_CHANNELS)
            assert got[0].tensors[1].shape == (len(expected), 3)
            assert got[0].meta["first_frame"] == expected.start
            coeffs.append(got[0].tensors[0])
            prosody.append(got[0].tensors[1])
            outs.append(got[0])
        start += len(pcm)
    return np.concatenate(coeffs), np.concatenate(prosody), outs


def split(pcm: np.ndarray, phon: list, cut_at: list[int]) -> list[tuple[np.ndarray, list]]:
    """Split an utterance into chunks at phoneme indices (phoneme starts relative to chunk)."""
    bounds = [0] + [phon[i][1] for i in cut_at] + [len(pcm)]
    chunks = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        chunks.append((pcm[a:b], [[p, s - a, n] for p, s, n in phon if a <= s < b]))
    return chunks


def frame_at(seconds: float) -> int:
    return int(round(seconds * FPS))


@pytest.fixture
def coeffs_engine() -> VisemeEngine:
    return VisemeEngine({}, EngineContext(stage="coeffs"))


@pytest.fixture
def motion_engine() -> ProsodyMotionEngine:
    return ProsodyMotionEngine({}, EngineContext(stage="motion"))


# ------------------------------------------------------------- viseme table
ESPEAK_EN = ("p b t d k ɡ f v θ ð s z ʃ ʒ h m n ŋ l ɹ w j ʔ ɾ ɫ "
             "i ɪ e ɛ æ ɑ ɒ ɔ o ʊ u ʌ ə ɚ ɜ ɐ a ᵻ ɝ").split()


def test_table_covers_espeak_english_phonemes():
    for sym in ESPEAK_EN:
        assert sym in V.IPA_TO_VISEME, sym
    for tok, vis in {"tʃ": "CH", "dʒ": "CH", "aɪ": "aa", "aʊ": "aa", "eɪ": "E", "oʊ": "oh",
                     "ɔɪ": "oh", "əʊ": "E", "ɪə": "ih", "ʊə": "ou", "ɜː": "E", "ˈɑː": "aa",
                     "n̩": "nn", "l̩": "nn", "iː": "ih", "uː": "ou"}.items():
        assert V.viseme_of(tok) == vis, tok
    assert [V.VISEMES[s.viseme] for s in V.parse("oʊ")[2]] == ["oh", "ou"]


def test_table_maps_the_classic_visemes():
    expect = {"p": "PP", "b": "PP", "m": "PP", "f": "FF", "v": "FF", "θ": "TH", "ð": "TH",
              "t": "DD", "k": "kk", "ʃ": "CH", "s": "SS", "n": "nn", "ɹ": "RR", "ɑ": "aa",
              "ɛ": "E", "ɪ": "ih", "ɔ": "oh", "u": "ou", " ": "sil", ",": "sil", ".": "sil",
              "^": "sil", "$": "sil", "_": "sil", "?": "sil"}
    for sym, vis in expect.items():
        assert V.viseme_of(sym) == vis, sym
    assert V.parse("ˈ")[0] == "stress" and V.parse("ˈ")[1] == 1.0
    assert V.parse("ː")[0] == "modifier" and V.parse("\u0329")[0] == "modifier"
    assert V.viseme_of("Q") == V.DEFAULT_VISEME  # unknown symbol: sensible default
    assert V.POSE_MATRIX.shape == (15, 52) and V.POSE_MATRIX.max() <= 1.0
    assert "| `PP` |" in V.table_markdown()


def test_piper_phonemizer_output_is_fully_known():
    """Every symbol espeak-ng (as Piper runs it) emits for English text is in the table."""
    pytest.importorskip("piper")
    import os

    import piper
    from piper.phonemize_espeak import EspeakPhonemizer

    data = os.path.join(os.path.dirname(piper.__file__), "espeak-ng-data")
    if not os.path.isdir(data):
        pytest.skip("no espeak-ng data")
    text = ("The quick brown fox jumps over the lazy dog. Why would you measure the thing, judge? "
            "Church, ring, button, bottle, hour, pure, cure, boy, cat, caught, bird, father, water, "
            "nation, vision, either, kitten, anyway, zoo, yes, thank you, pleasure, hmm.")
    seen = {ch for sent in EspeakPhonemizer(data).phonemize("en-us", text) for ch in sent}
    for ch in seen:
        kind, _, sounds = V.parse(ch)
        if kind == "sound":
            assert ch in V.IPA_TO_VISEME, ch


# -------------------------------------------------------------- coeffs path
def test_jaw_opens_on_vowels_and_closes_in_pauses_and_at_the_end(coeffs_engine):
    pcm, phon = utterance(HELLO_WORLD)
    c, p, _ = run_coeffs(coeffs_engine, coeffs_engine.open_session({}), [(pcm, phon)])
    assert c.shape == (len(frame_range(0, len(pcm), SR, FPS)), N_CHANNELS)
    starts = {}
    for ipa, a, n in phon:
        starts.setdefault(ipa, (a + n / 2) / SR)
    o_frame = frame_at(starts["o"])
    e_frame = frame_at(starts["ɜ"])
    pause = frame_at(starts[","])
    assert c[o_frame, JAW] > 0.25 and c[e_frame, JAW] > 0.25
    assert c[pause, JAW] < 0.05 and c[pause, SIL] > 0.8
    assert c[-1, JAW] == 0.0 and c[-1, SIL] == 1.0
    assert c[o_frame, INDEX["viseme_oh"]] > 0.4
    assert c[frame_at(starts["ʊ"]), INDEX["mouthPucker"]] > 0.3     # rounding on ʊ
    assert np.all((c[:, :52] >= 0) & (c[:, :52] <= 1))
    assert np.allclose(c[:, 52:67].sum(axis=1), 1.0, atol=1e-5)     # viseme weights normalised
    # prosody: loud and voiced on vowels, quiet in the pause; emphasis on the stressed vowel
    energy, voicing, emphasis = p.T
    assert energy[o_frame] > 0.8 and energy[pause] < 0.05
    assert voicing[o_frame] > 0.8 and voicing[pause] < 0.05
    assert emphasis[o_frame] > 0.7 and emphasis[frame_at(starts["ə"])] < 0.4
    assert np.all((p >= 0) & (p <= 1))


@pytest.mark.parametrize("consonant", ["m", "b", "p"])
def test_bilabials_close_the_lips(coeffs_engine, consonant):
    toks = [("ɑ", 0.15), (consonant, 0.06), ("ɑ", 0.15), (".", 0.1)]
    pcm, phon = utterance(toks)
    c, _, _ = run_coeffs(coeffs_engine, coeffs_engine.open_session({}), [(pcm, phon)])
    mid = frame_at((phon[1][1] + phon[1][2] / 2) / SR)
    vowel = frame_at((phon[0][1] + phon[0][2] / 2) / SR)
    assert c[mid, PP] > 0.5
    assert c[mid, INDEX["mouthClose"]] > 0.3 and c[mid, INDEX["mouthPressLeft"]] > 0.2
    assert c[mid, JAW] < 0.5 * c[vowel, JAW]
    assert c[vowel, INDEX["viseme_aa"]] > 0.6


@pytest.mark.parametrize("early", [0.0, 0.025])
def test_a_voiced_stops_murmur_before_a_pause_is_its_closure(coeffs_engine, early):
    """A voiced stop before a pause (/d/ in "good,") murmurs through its closure, ~25-30 dB
    under the vowel (the voice bar): that murmur was taken for sound, 30 dB under the
    peak being silence, so the /d/ pose held the jaw ~0.09 open through it and the jaw
    settled +27-37 ms after the sound on Piper's speech. It is the closure: the mouth
    settles as the vowel stops, as after a silent /t/, also where the murmur starts
    ``early`` in the vowel's token (Piper's alignment often has it so)."""
    toks = [("^", 0.05), ("ɡ", 0.05), ("ʌ", 0.15), ("d", 0.12), (",", 0.3), ("$", 0.02)]
    pcm, phon = utterance(toks)
    a, n = phon[3][1] - int(early * SR), phon[3][2] + int(early * SR)
    bar = 0.3 * 32767 * 0.6 * 10 ** (-27 / 20) * np.sin(2 * np.pi * 140 * np.arange(n) / SR)
    pcm[a:a + n] = bar.astype(np.int16)  # the voice bar: 140 Hz, 27 dB under the vowel
    c, _, _ = run_coeffs(coeffs_engine, coeffs_engine.open_session({}), [(pcm, phon)])
    vowel, closure = frame_at(0.15), int((a / SR + 0.04) * FPS)  # sampled ~50 ms into the murmur
    assert c[vowel, JAW] > 0.3
    assert c[closure, JAW] < 0.05, np.round(c[vowel:closure + 3, JAW], 3)
    # the same stop voiceless (silent closure) settled as it does now
    pcm[a:a + n] = 0
    c2, _, _ = run_coeffs(coeffs_engine, coeffs_engine.open_session({}), [(pcm, phon)])
    assert abs(c2[closure, JAW] - c[closure, JAW]) < 0.02


def test_lips_shut_before_a_pause_close_hold_then_let_go(coeffs_engine):
    """A /p/ before a pause ("stop.") closes the lips as the sound stops and holds them for
    a closure (``stop_hold_s``, 80 ms), then lets them go to rest: they stayed pressed
    shut to the pause token, which Piper puts up to 150 ms after the sound (a frozen
    pose, then a late release)."""
    toks = [("^", 0.05), ("ɑ", 0.15), ("p", 0.25), (".", 0.3), ("$", 0.02)]
    pcm, phon = utterance(toks)
    c, _, _ = run_coeffs(coeffs_engine, coeffs_engine.open_session({}), [(pcm, phon)])
    close = c[:, INDEX["mouthClose"]]
    onset = phon[2][1] / SR  # 0.2 s: the sound stops, the closure starts
    shut = [k for k in range(len(c)) if onset + 0.01 <= (k + 0.5) / FPS <= onset + 0.06]
    assert close[shut].min() > 0.4, np.round(close, 2)
    let_go = [k for k in range(len(c)) if onset + 0.16 <= (k + 0.5) / FPS < (phon[3][1]) / SR]
    assert let_go and close[let_go].max() < 0.1, np.round(close, 2)


def test_a_stop_whose_closure_is_heard_lets_go_after_its_hold(coeffs_engine):
    """A stop before a pause whose closure is not quiet enough to read (a loud voice bar,
    noise) held its pose to the pause token; the closure is shown for ``stop_hold_s``
    (80 ms), then the mouth settles."""
    toks = [("^", 0.05), ("ɑ", 0.15), ("d", 0.25), (".", 0.3), ("$", 0.02)]
    pcm, phon = utterance(toks)
    a, n = phon[2][1], phon[2][2]
    bar = 0.3 * 32767 * 0.6 * 10 ** (-12 / 20) * np.sin(2 * np.pi * 140 * np.arange(n) / SR)
    pcm[a:a + n] = bar.astype(np.int16)  # a murmur only 12 dB under the vowel
    c, _, _ = run_coeffs(coeffs_engine, coeffs_engine.open_session({}), [(pcm, phon)])
    onset = a / SR
    let_go = [k for k in range(len(c)) if onset + 0.14 <= (k + 0.5) / FPS < phon[3][1] / SR]
    assert let_go and c[let_go, JAW].max() < 0.05, np.round(c[:, JAW], 3)
    assert c[let_go, INDEX["viseme_DD"]].max() < 0.2


def test_chunked_equals_unchunked(coeffs_engine):
    pcm, phon = utterance(HELLO_WORLD)
    whole, pw, _ = run_coeffs(coeffs_engine, coeffs_engine.open_session({}), [(pcm, phon)])
    cuts = [4, 8, 12]  # mid-word, at the pause, mid-word
    parts, pp, outs = run_coeffs(coeffs_engine, coeffs_engine.open_session({}), split(pcm, phon, cuts))
    assert [o.meta["first_frame"] for o in outs] == sorted(o.meta["first_frame"] for o in outs)
    assert parts.shape == whole.shape
    diff = np.abs(parts - whole)
    # carry-over (previous chunk's phonemes and samples) is kept in the session, so frames
    # after a boundary are the same; only the look-ahead into a chunk not yet received is
    # missing, in the frames just before each boundary (lip rounding reaches ~0.2 s ahead)
    t = np.arange(len(whole)) / FPS
    ahead = np.zeros(len(whole), bool)
    for i in cuts:
        b = phon[i][1] / SR
        ahead |= (t > b - 0.25) & (t < b)
    assert diff[~ahead].max() < 0.02
    assert diff[:, JAW].max() < 0.15
    assert diff.mean() < 0.01
    # loudness is the frame's display interval [k, k + 1) / fps: the frame on screen across
    # a cut sees only the samples before it (here one voiced sample less: -38 dB, 0.06)
    across = np.zeros(len(whole), bool)
    for i in cuts:
        across[int(phon[i][1] * FPS // SR)] = True
    assert np.abs(pp[~across, 0] - pw[~across, 0]).max() < 0.05
    assert np.abs(pp[:, 0] - pw[:, 0]).max() < 0.1


def test_chunks_that_carry_the_phonemes_ahead_equal_one_chunk(coeffs_engine):
    """Piper's windows cut anywhere (mid-phoneme too) and carry the phonemes that start
    just after them: the frames are then those of the unchunked utterance, anticipation
    of the next chunk included; a window in which no phoneme starts is still speech."""
    pcm, phon = utterance(HELLO_WORLD)
    whole, pw, _ = run_coeffs(coeffs_engine, coeffs_engine.open_session({}), [(pcm, phon)])
    reach = int(0.3 * SR)
    bounds = [0, 4096, 10000, 17000, 23000, len(pcm)]  # 10000..17000: inside the pause
    chunks = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        own = [[p, s - a, n] for p, s, n in phon if a <= s < b]
        ahead = [[p, s - a, n] for p, s, n in phon if b <= s < b + reach]
        chunks.append((pcm[a:b], own, ahead))
    assert any(not own for _, own, _ in chunks)
    parts, pp, _ = run_coeffs(coeffs_engine, coeffs_engine.open_session({}), chunks)
    assert parts.shape == whole.shape
    # loudness windows at a chunk's very end see only its own samples: the opening of
    # the frame just before a cut may differ a little; visemes do not
    assert np.abs(parts - whole)[:, VISEME_SLICE].max() < 1e-4  # (past 0.4 s a segment is let go)
    assert np.abs(parts - whole).max() < 0.05
    # without them, the frames before each cut lose their anticipation
    blind = [(c, own) for c, own, _ in chunks]
    parts_blind, _, _ = run_coeffs(coeffs_engine, coeffs_engine.open_session({}), blind)
    assert np.abs(parts_blind - whole).max() > np.abs(parts - whole).max()


def test_frame_count_matches_frame_range_for_odd_chunks(coeffs_engine):
    pcm, phon = utterance(HELLO_WORLD)
    state = coeffs_engine.open_session({})
    start = 0
    for i, (chunk, ph) in enumerate(split(pcm, phon, [1, 2, 3, 5, 7, 11, 14])):
        out = list(coeffs_engine.process(audio_msg(chunk, start, ph, final=False), state))
        n = len(frame_range(start, len(chunk), SR, FPS))
        assert sum(o.tensors[0].shape[0] for o in out) == n
        start += len(chunk)
    # an empty final chunk still ends the utterance, with no rows
    out = list(coeffs_engine.process(audio_msg(np.zeros(0, np.int16), start, [], final=True), state))
    assert len(out) == 1 and out[0].tensors[0].shape == (0, N_CHANNELS) and out[0].meta["final"]


def test_pass_through_style_and_robust_tokens(coeffs_engine):
    pcm, phon = utterance([("ʔ", 0.05), ("ɑ", 0.1), ("Q", 0.05), ("˞", 0.02), ("ǃ", 0.03),
                           ("1", 0.02), ("oʊ", 0.1), ("ˈaɪ", 0.1), ("…", 0.1)])
    phon.append(["bogus"])  # a malformed entry must not break the chunk
    msg = audio_msg(pcm, 0, phon, final=True)
    msg.meta.update(emotion="happy", intensity=0.5)
    out = list(coeffs_engine.process(msg, coeffs_engine.open_session({"fps": 30})))
    assert out[0].meta["emotion"] == "happy" and out[0].meta["intensity"] == 0.5
    assert out[0].meta["fps"] == 30.0
    assert out[0].tensors[0].shape[0] == len(frame_range(0, len(pcm), SR, 30.0))
    assert np.isfinite(out[0].tensors[0]).all()


def voice_like(seconds: float, formant: float = 500.0, amp: float = 0.5) -> np.ndarray:
    """A voice-like sound for the acoustic path: harmonics of a pitch gliding about 130 Hz,
    shaped by one formant (500 Hz: dark, 2.6 kHz: bright), in syllables four times a
    second. The path's speech gate takes it for speech; a steady tone it keeps shut."""
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(130 + 20 * np.sin(2 * np.pi * 1.3 * t)) / SR
    x = sum(np.exp(-0.5 * ((h * 130 - formant) / 300) ** 2) * np.sin(h * phase) for h in range(1, 30))
    return (amp * 32767 * x / np.abs(x).max() * ((t % 0.25) < 0.17)).astype(np.int16)


def test_audio_only_silence_is_closed_and_a_voice_opens_the_jaw(coeffs_engine):
    silence = np.zeros(SR, np.int16)
    state = coeffs_engine.open_session({})
    c, p, _ = run_coeffs(coeffs_engine, state, [(silence, None), (voice_like(1.0), None), (silence, None)])
    quiet, loud, after = c[:25], c[25:50], c[50:]
    assert np.all(quiet[:, JAW] < 0.01) and np.all(quiet[:, SIL] > 0.99)
    assert np.percentile(loud[5:, JAW], 75) > 0.3   # open on the syllables
    assert np.percentile(p[30:50, 0], 75) > 0.8 and np.percentile(p[30:50, 1], 75) > 0.5   # loud, voiced
    assert after[-1, JAW] == 0.0 and after[5:, JAW].max() < 0.05
    # dark (low) sound rounds the lips, bright (high) sound spreads them
    cb, _, _ = run_coeffs(coeffs_engine, coeffs_engine.open_session({}), [(voice_like(1.0, 2600.0), None)])
    assert loud[10:20, INDEX["mouthFunnel"]].mean() > cb[10:20, INDEX["mouthFunnel"]].mean() + 0.1
    assert cb[10:20, INDEX["mouthStretchLeft"]].mean() > loud[10:20, INDEX["mouthStretchLeft"]].mean()


def test_a_microphones_dc_offset_is_no_sound(coeffs_engine):
    """A constant offset (+100 counts: -50 dBFS, inaudible) held the mouth as open as
    speech; with speech on +300, it stayed open in the pauses."""
    for dc in (100, 300, -2000):
        c, _, _ = run_coeffs(coeffs_engine, coeffs_engine.open_session({}),
                             [(np.full(SR, dc, np.int16), None)])
        assert c[:, JAW].max() < 0.01, dc
    voice = voice_like(1.0, amp=0.3)
    pause = np.zeros(SR, np.int16)
    c, _, _ = run_coeffs(coeffs_engine, coeffs_engine.open_session({}),
                         [(voice + 300, None), (pause + 300, None), (voice + 300, None)])
    assert np.percentile(c[5:25, JAW], 75) > 0.3 and c[35:50, JAW].max() < 0.01


def test_audio_only_chunking_is_continuous(coeffs_engine):
    rng = np.random.default_rng(0)
    t = np.arange(2 * SR) / SR
    sig = (np.sin(2 * np.pi * 3 * t) > 0) * np.sin(2 * np.pi * 180 * t) + 0.02 * rng.standard_normal(t.size)
    pcm = (0.4 * 32767 * sig).astype(np.int16)
    whole, _, _ = run_coeffs(coeffs_engine, coeffs_engine.open_session({}), [(pcm, None)])
    cuts = [0, 7000, 15000, 30001, len(pcm)]
    parts, _, _ = run_coeffs(coeffs_engine, coeffs_engine.open_session({}),
                             [(pcm[a:b], None) for a, b in zip(cuts[:-1], cuts[1:])])
    assert parts.shape == whole.shape
    assert np.abs(parts - whole).mean() < 0.01


# ------------------------------------------------------------------ One Euro
def test_one_euro_alpha_matches_the_paper():
    # fc = 1 Hz at 25 Hz: tau = 1/(2π), alpha = 1 / (1 + tau/Te)
    tau = 1 / (2 * math.pi)
    assert smoothing_factor(1.0, 0.04) == pytest.approx(1 / (1 + tau / 0.04))
    assert smoothing_factor(1.0, 0.04) == pytest.approx(0.2008493, abs=1e-6)
    assert smoothing_factor(np.inf, 0.04) == 1.0


def test_one_euro_constant_input_passes_unchanged():
    f = OneEuroFilter(min_cutoff=0.5, beta=0.7, d_cutoff=1.0)
    x = np.array([0.3, -2.0, 7.5])
    for i in range(50):
        assert np.allclose(f(x, i / 30), x)


def test_one_euro_with_beta_zero_is_a_first_order_low_pass():
    fc, rate = 2.0, 1000.0
    f = OneEuroFilter(min_cutoff=fc, beta=0.0)
    f.filter(0.0, 1 / rate)
    a = 1 / (1 + (1 / (2 * math.pi * fc)) * rate)
    ys = np.array([f.filter(1.0, 1 / rate) for _ in range(1000)]).ravel()
    k = np.arange(1, 1001)
    assert np.allclose(ys, 1 - (1 - a) ** k)                              # exact discrete form
    t = k / rate
    assert np.abs(ys - (1 - np.exp(-2 * math.pi * fc * t))).max() < 0.01    # ≈ RC step response


def test_one_euro_higher_beta_lags_less_on_a_ramp():
    lags = []
    for beta in (0.0, 0.05, 1.0):
        f = OneEuroFilter(min_cutoff=1.0, beta=beta, d_cutoff=1.0)
        ys = [f(10.0 * i / 60, i / 60)[()] for i in range(120)]
        lags.append(10.0 * 119 / 60 - ys[-1])
    assert lags[0] > lags[1] > lags[2] > 0


def test_one_euro_block_per_channel_and_reset():
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((40, 3))
    mc, beta = np.array([1.0, 3.0, np.inf]), np.array([0.0, 0.5, 0.0])
    a, b = OneEuroFilter(mc, beta, 1.0), OneEuroFilter(mc, beta, 1.0)
    block = np.concatenate([a.filter_block(xs[:15], 0.04), a.filter_block(xs[15:], 0.04)])
    single = np.stack([b.filter(x, 0.04) for x in xs])
    assert np.allclose(block, single)
    assert np.allclose(block[:, 2], xs[:, 2])          # infinite cutoff passes through
    assert not np.allclose(block[:, 0], xs[:, 0])
    a.reset()
    assert np.allclose(a.filter(xs[7], 0.04), xs[7])   # first sample after reset passes


# -------------------------------------------------------------------- motion
def animate_silence(engine, state, seconds: float, chunk: int = 25, first: int = 0, meta=None):
    n = int(seconds * FPS)
    outs = []
    for f in range(first, first + n, chunk):
        m = min(chunk, first + n - f)
        outs.append(engine.animate(zeros(m), np.zeros((m, 3), np.float32), f, FPS, state, meta or {}))
    return np.concatenate(outs)


def test_pose_is_bounded_and_never_constant(motion_engine):
    out = animate_silence(motion_engine, motion_engine.open_session({"seed": 3}), 10.0)
    pose = out[:, INDEX["headYaw"]:INDEX["headRoll"] + 1]
    assert np.abs(pose).max() < math.radians(6)
    for axis in range(3):
        assert pose[:, axis].std() > math.radians(0.15)
        windows = pose[:, axis].reshape(10, 25)
        assert np.all(np.ptp(windows, axis=1) > 1e-4)      # moving in every second
    long = animate_silence(motion_engine, motion_engine.open_session({"seed": 3}), 120.0, chunk=50)
    yaw = long[:, INDEX["headYaw"]]
    assert abs(yaw.mean()) < math.radians(1.0) and np.abs(yaw).max() < math.radians(6)   # no drift


def test_blink_rate_and_shape(motion_engine):
    out = animate_silence(motion_engine, motion_engine.open_session({"seed": 11}), 60.0)
    left, right = out[:, INDEX["eyeBlinkLeft"]], out[:, INDEX["eyeBlinkRight"]]
    assert np.array_equal(left, right)
    onsets = np.flatnonzero((left[1:] > 0.5) & (left[:-1] <= 0.5))
    assert 12 <= len(onsets) <= 24                               # ~15–20 per minute
    gaps = np.diff(onsets) / FPS
    assert gaps.min() >= 1.9 and gaps.max() <= 6.1
    assert left.max() == pytest.approx(1.0)
    # shape: closing (rise) takes fewer frames than opening (fall)
    u = np.arange(0, 0.4, 0.001)
    v = blink_shape(u)
    peak = u[np.argmax(v >= 0.999)]
    close_t = peak - u[np.argmax(v > 0.01)]
    open_t = u[len(v) - 1 - np.argmax(v[::-1] > 0.01)] - u[len(v) - 1 - np.argmax(v[::-1] >= 0.999)]
    assert close_t < open_t
    # and at 25 fps: the lid moves further per frame closing than opening, in every blink
    for i in onsets[1:-1]:
        steps = np.diff(left[i - 3:i + 12])
        assert steps.max() > 1.2 * -steps.min()


def test_emotions_offset_the_right_channels(motion_engine):
    base = animate_silence(motion_engine, motion_engine.open_session({"seed": 5}), 2.0)
    expect = {"happy": ["mouthSmileLeft", "cheekSquintRight"], "sad": ["mouthFrownLeft", "browInnerUp"],
              "surprised": ["eyeWideLeft", "browOuterUpRight"], "angry": ["browDownLeft", "noseSneerRight"]}
    for emo, channels in expect.items():
        s = motion_engine.open_session({"seed": 5, "emotion": emo, "intensity": 1.0})
        out = animate_silence(motion_engine, s, 2.0)
        for ch in channels:
            assert out[-1, INDEX[ch]] > base[-1, INDEX[ch]] + 0.2, (emo, ch)
        touched = {INDEX[c] for c in EMOTIONS[emo]}
        others = [i for i in range(N_CHANNELS) if i not in touched]
        assert np.allclose(out[:, others], base[:, others], atol=1e-6), emo
    half = animate_silence(motion_engine, motion_engine.open_session(
        {"seed": 5, "emotion": "happy", "intensity": 0.5}), 2.0)
    full = animate_silence(motion_engine, motion_engine.open_session(
        {"seed": 5, "emotion": "happy", "intensity": 1.0}), 2.0)
    sm = INDEX["mouthSmileLeft"]
    assert half[-1, sm] == pytest.approx(0.5 * full[-1, sm], abs=0.01)


def test_unknown_emotion_is_an_error(motion_engine):
    with pytest.raises(EngineError) as e:
        motion_engine.open_session({"emotion": "bored"})
    assert e.value.code == "unknown_emotion"
    state = motion_engine.open_session({"seed": 1})
    msg = StageInput(type="coeffs", seq=0, pts=0.0,
                     meta={"utterance": 2, "fps": FPS, "first_frame": 0, "final": False, "emotion": "smug"},
                     tensors=[zeros(5), np.zeros((5, 3), np.float32)])
    with pytest.raises(EngineError) as e:
        list(motion_engine.process(msg, state))
    assert e.value.code == "unknown_emotion"


def test_check_judges_a_spec_as_a_session_open_does(motion_engine):
    """``check`` (asked of the server's ``[defaults]``) takes what a session takes: any
    case of an emotion, ``""`` for neutral; and refuses what it refuses."""
    from giris.workers.engine import Engine

    for spec in ({"emotion": "Happy"}, {"emotion": ""}, {"intensity": 7}, {}):
        motion_engine.check(spec)
        motion_engine.open_session(spec)
    for spec, code in (({"emotion": "bored"}, "unknown_emotion"), ({"seed": -1}, "bad_input"),
                       ({"intensity": "lots"}, "bad_input")):
        for judge in (motion_engine.check, motion_engine.open_session):
            with pytest.raises(EngineError) as e:
                judge(spec)
            assert e.value.code == code

    class Listed(Engine):  # a third-party engine that lists its values: still judged
        def accepts(self) -> dict[str, list[str]]:
            return {"emotion": ["calm"]}

    listed = Listed({}, EngineContext(stage="motion"))
    listed.check({"emotion": "calm"})
    with pytest.raises(EngineError) as e:
        listed.check({"emotion": "wild"})
    assert str(e.value) == "emotion 'wild' is not one this engine knows: calm"


def test_per_utterance_emotion_via_process(motion_engine):
    state = motion_engine.open_session({"seed": 2, "emotion": "neutral"})
    sm = INDEX["mouthSmileLeft"]

    def send(first: int, meta: dict) -> np.ndarray:
        msg = StageInput(type="coeffs", seq=first, pts=first / FPS,
                         meta={"utterance": 1, "fps": FPS, "first_frame": first, "final": False, **meta},
                         tensors=[zeros(25), np.zeros((25, 3), np.float32)])
        (out,) = list(motion_engine.process(msg, state))
        assert out.type == "coeffs" and out.to_client and out.meta["first_frame"] == first
        assert out.tensors[0].shape == (25, N_CHANNELS) and out.tensors[0].dtype == np.float32
        return out.tensors[0]

    assert send(0, {})[-1, sm] < 0.01
    assert send(25, {"emotion": "happy", "intensity": 0.8})[-1, sm] > 0.35
    assert send(50, {})[-1, sm] < 0.05                     # back to the session's emotion


def test_motion_is_deterministic_and_chunking_invariant(motion_engine):
    rng = np.random.default_rng(4)
    n = 200
    coeffs = zeros(n)
    coeffs[:, JAW] = np.clip(np.sin(np.arange(n) / 3) * 0.5, 0, 1)
    prosody = np.zeros((n, 3), np.float32)
    prosody[:, 0] = rng.uniform(0, 1, n)
    prosody[:120:20, 2] = 1.0        # stressed syllables for 4.8 s, then none
    prosody[1:120:20, 2] = 0.5

    def run(seed: int, sizes: list[int]) -> np.ndarray:
        s = motion_engine.open_session({"seed": seed})
        outs, f = [], 0
        for m in sizes:
            outs.append(motion_engine.animate(coeffs[f:f + m], prosody[f:f + m], f, FPS, s, {}))
            f += m
        return np.concatenate(outs)

    a, b = run(7, [n]), run(7, [n])
    assert np.array_equal(a, b)
    assert not np.allclose(a, run(8, [n]))
    assert np.allclose(a, run(7, [13, 50, 1, 36, 100]), atol=1e-5)
    # nods (chin down = +pitch) and brow raises follow emphasis, then return to rest
    plain = run(7, [n])
    prosody[:, 2] = 0
    calm = run(7, [n])
    nod = plain[:, INDEX["headPitch"]] - calm[:, INDEX["headPitch"]]
    assert nod[25:30].max() > 0.02 and abs(nod[-1]) < 0.01
    brow = plain[:, INDEX["browInnerUp"]] - calm[:, INDEX["browInnerUp"]]
    assert brow[3:12].max() > 0.15 and brow[-1] < 0.05
    assert plain[5:12, INDEX["browOuterUpLeft"]].max() > calm[5:12, INDEX["browOuterUpLeft"]].max() + 0.1
    assert np.all(np.abs(a[:, INDEX["headYaw"]:]) <= 0.35)
    assert np.all((a[:, :67] >= 0) & (a[:, :67] <= 1))


def through_motion(motion_engine, tokens) -> tuple[np.ndarray, np.ndarray, list]:
    """An utterance of ``tokens`` through a fresh coeffs stage and then ``motion_engine``:
    (the coefficients, the motion stage's frames, the phonemes)."""
    c_engine = VisemeEngine({}, EngineContext(stage="coeffs"))
    pcm, phon = utterance(tokens)
    c, _, outs = run_coeffs(c_engine, c_engine.open_session({}), [(pcm, phon)])
    state = motion_engine.open_session({"seed": 1})
    msg = StageInput(type="coeffs", seq=0, pts=0.0, meta=outs[0].meta, tensors=outs[0].tensors)
    (out,) = list(motion_engine.process(msg, state))
    return c, out.tensors[0], phon


def test_mouth_passes_through_the_filter_without_much_lag(motion_engine):
    """Lip sync must survive the smoothing: the filtered jaw follows the coeffs closely."""
    c, out, _ = through_motion(motion_engine, HELLO_WORLD)
    jaw_in, jaw_out = c[:, JAW], out[:, JAW]
    assert np.corrcoef(jaw_in, jaw_out)[0, 1] > 0.95
    assert np.abs(jaw_out - jaw_in).max() < 0.15


@pytest.mark.parametrize("tokens", [
    [("^", 0.05), ("m", 0.06), ("ˈ", 0.01), ("a", 0.20), (",", 0.40), ("n", 0.06), ("ˈ", 0.01),
     ("o", 0.16), (".", 0.30), ("$", 0.02)],
    HELLO_WORLD,
])
def test_the_mouth_closes_when_the_sound_stops(motion_engine, tokens):
    """Speech → pause, through the coeffs and motion stages: a frame on screen from 20 ms
    after the sound's end (frame k is shown during [k, k + 1) / fps) shows the jaw shut
    (< 0.05), while the frames on screen during the sound show it open and the next
    sound's opening is neither late nor far ahead. The jaw used to fall under 0.05 some
    80-130 ms after the sound (a frame stood for the sound half a frame before it was on
    screen, a pause reached full dominance a quarter of the way in, and the mouth's 4 Hz
    One Euro filter halved what was left once a frame)."""
    _, out, phon = through_motion(motion_engine, tokens)
    jaw = out[:, JAW]
    shown = np.arange(len(jaw)) / FPS                        # each frame's first instant on screen
    spans: list[list[float]] = []                            # sounding stretches, as utterance() makes them
    for ipa, a, n in phon:
        if V.viseme_of(ipa) != "sil" or ipa in "ˈˌː":
            if spans and spans[-1][1] == a / SR:
                spans[-1][1] = (a + n) / SR
            else:
                spans.append([a / SR, (a + n) / SR])
    assert len(spans) >= 2, "no pause in the test utterance"
    for (_, end), (nxt, _) in zip(spans[:-1], spans[1:]):
        shut = (shown >= end + 0.02) & (shown + 1 / FPS <= nxt - 0.06)
        assert shut.any()
        assert jaw[shut].max() < 0.05, f"sound ends {end:.3f} s: jaw {np.round(jaw[shut][:4], 3)}"
        speaking = (shown + 1 / FPS <= end - 0.04) & (shown >= end - 0.12)
        assert jaw[speaking].min() > 0.2
        onset = int((nxt + 0.01) * FPS)                    # on screen 10 ms into the sound
        assert jaw[onset] > 0.1


def test_an_utterances_last_frame_shows_the_mouth_at_rest(motion_engine):
    """Live audio in 20 ms chunks gives the motion stage one frame at a time; the coeffs
    stage closes the mouth on the last one in a single step, and the filter lagged it: the
    last frame, held on screen after, had the jaw at ~0.19."""
    state = motion_engine.open_session({"seed": 1})
    open_ = zeros(1)
    open_[0, JAW] = 0.6
    for f in range(20):  # speaking, a frame per chunk
        motion_engine.animate(open_, np.zeros((1, 3), np.float32), f, FPS, state, {"final": False})
    last = motion_engine.animate(zeros(1), np.zeros((1, 3), np.float32), 20, FPS, state, {"final": True})
    assert last[-1, JAW] < 0.01
    # and the next utterance starts from there, not from where the filter was
    nxt = motion_engine.animate(zeros(5), np.zeros((5, 3), np.float32), 21, FPS, state, {"final": False})
    assert nxt[:, JAW].max() < 0.01


def test_emphasis_brows_keep_their_size_in_pixels(motion_engine, monkeypatch):
    """The rig's brow-raise tables grew by BROW_RANGE (room for sad and surprised brows);
    emphasis raises send 1/BROW_RANGE of the weight and the filter's speed term is scaled
    to match, so a neutral face moves its brows exactly as before: weight × BROW_RANGE is
    the old weight, float for float (neutral frames stay byte-identical)."""
    import giris.workers.motion_prosody as MP
    from giris.workers.face_rig import BROW_RANGE

    assert BROW_RANGE > 1 and math.log2(BROW_RANGE).is_integer()  # exact scaling
    n = 120
    coeffs = zeros(n)
    coeffs[:, JAW] = np.clip(np.sin(np.arange(n) / 3) * 0.5, 0, 1)
    prosody = np.zeros((n, 3), np.float32)
    prosody[:, 0] = 0.5
    prosody[::9, 2] = 1.0

    def run() -> np.ndarray:
        s = motion_engine.open_session({"seed": 3})
        return np.concatenate([motion_engine.animate(coeffs[f:f + 30], prosody[f:f + 30], f, FPS, s, {})
                               for f in range(0, n, 30)])
    now = run()
    monkeypatch.setattr(MP, "BROW_RANGE", 1.0)  # the old units
    old = run()
    brows = [INDEX[c] for c in ("browInnerUp", "browOuterUpLeft", "browOuterUpRight")]
    assert old[:, brows].max() > 0.2  # the premise: the brows did rise
    assert np.array_equal(now[:, brows] * np.float32(BROW_RANGE), old[:, brows])
    others = np.setdiff1d(np.arange(N_CHANNELS), brows)
    assert np.array_equal(now[:, others], old[:, others])


# ------------------------------------------------- Piper's own timings end to end
@pytest.fixture(scope="module")
def piper_tts():
    pytest.importorskip("piper")
    return piper_voice()


def test_a_silent_stop_before_a_pause_lets_the_mouth_settle(piper_tts):
    """Piper gives a stop before a pause (/t/ in "it.", /k/ in "like.", /kt/ in "cooked,")
    its whole closure, 60-160 ms after the sound has died; the stop's pose held the jaw
    ~0.1 open through it, and through the coeffs and motion stages it fell under 0.05
    27-126 ms after the sound's end (median 57 ms on these texts). Now the mouth settles
    as the sound dies, within 40 ms (and not ahead of it; within 25 ms after a voiced /d/,
    whose murmur held it 27-32 ms), the frames before the end still speak, and /p/ before a
    pause shuts the lips for its closure (80 ms: "slept." is as long)."""
    texts = ["I think that's it. That's what I like.", "Look at that cat. We cooked, we ate, we slept.",
             "It was good, and that was bad. We said it."]
    settled: list[float] = []
    sealed = 0
    for text in texts:
        chunks = piper_chunks(piper_tts, text)
        _, motion = animate(chunks)
        jaw = motion[:, JAW]
        shown = np.arange(len(jaw)) / FPS
        for stops, end, token, _ in stops_before_pauses(chunks):
            speaking = (shown >= end - 0.12) & (shown + 1 / FPS <= end - 0.04)
            assert jaw[speaking].min() > 0.1, (text, stops, np.round(jaw[speaking], 3))
            if "p" in stops:  # "slept.": the lips close for /p/ and stay sealed through its closure
                k = int(token * FPS) - 1  # the frame on screen just before the pause token
                assert motion[k, INDEX["mouthClose"]] > 0.25, (text, stops, motion[k, INDEX["mouthClose"]])
                sealed += 1
                continue
            settled.append(settles(jaw, end))
            voiced = stops[-1] in "dɡ"  # its closure murmurs: it settled 27-32 ms after the sound
            assert -0.02 <= settled[-1] <= (0.025 if voiced else 0.04), (
                text, stops, f"sound ends {end:.3f} s, pause token {token:.3f} s: settles {settled[-1]:+.3f} s after")
    assert len(settled) >= 7 and sealed >= 1
