"""``coqui``: Coqui TTS from a local model, an optional engine (``pip install 'giris[coqui]'``).

It streams the same ``audio`` messages as ``piper`` (same text cuts, same utterance gain,
same pause after a sentence), but Coqui gives no phoneme timings, so its chunks carry
``phonemes = None`` and the ``coeffs`` stage animates them from the sound alone (its
acoustic path). Nothing is downloaded: the model is named by file paths.

Options (``[stages.tts] options``): ``model_path`` and ``config_path`` (required; a
Coqui checkpoint and its ``config.json``), ``vocoder_path`` / ``vocoder_config_path``
for two-stage models, ``speakers_file_path``, ``speaker`` and ``language`` for multi-
speaker / multilingual models, ``sentence_silence`` (0.2 s), ``first_chunk_words`` (4).
A session's ``voice`` may name one of the model's speakers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from giris.workers.bases import Gain, SpeechChunk, TTSEngine, TTSSession, pad_silence
from giris.workers.engine import EngineContext, EngineError
from giris.workers.text import pieces


class CoquiEngine(TTSEngine):
    def __init__(self, options: Mapping[str, Any], context: EngineContext) -> None:
        super().__init__(options, context)
        o = self.options
        files = {k: o.get(k) for k in ("model_path", "config_path", "vocoder_path",
                                        "vocoder_config_path", "speakers_file_path")}
        if not files["model_path"] or not files["config_path"]:
            raise EngineError("the coqui engine needs options model_path and config_path "
                              "(a local model: nothing is downloaded)", code="bad_config")
        for key, path in files.items():
            if path and not Path(path).is_file():
                raise EngineError(f"coqui {key}: no such file: {path}", code="bad_config")
        try:
            from TTS.api import TTS
        except ImportError as e:
            # Coqui also needs torchaudio built for this torch (not pulled in by the extra, so
            # that pip never swaps the torch build): say what actually failed
            cause = " ".join(str(e).split()) or type(e).__name__
            raise EngineError("the coqui engine needs the optional extra: pip install "
                              f"'giris[coqui]', and torchaudio for this torch ({cause})",
                              code="engine_unavailable") from e
        self.tts = TTS(progress_bar=False, **{k: str(v) for k, v in files.items() if v})
        if context.device.startswith("cuda"):
            self.tts.to(context.device)
        self.sample_rate = int(self.tts.synthesizer.output_sample_rate)
        self.speakers = list(getattr(self.tts, "speakers", None) or [])
        self.speaker = o.get("speaker") or (self.speakers[0] if self.speakers else None)
        self.language = o.get("language") or (
            (getattr(self.tts, "languages", None) or [None])[0] if getattr(self.tts, "is_multi_lingual", False) else None)
        self.sentence_silence = float(o.get("sentence_silence", 0.2))
        self.first_words = int(o.get("first_chunk_words", 4))

    def estimate(self, spec: Mapping[str, Any]) -> dict[str, int]:
        return {"cpu": 256 * 1024}

    def open_tts_session(self, spec: Mapping[str, Any]) -> Any:
        voice = spec.get("voice")
        if not voice:
            return self.speaker
        if voice in self.speakers:
            return voice
        known = ", ".join(self.speakers) or "none: this model has one voice"
        raise EngineError(f"unknown voice {voice!r}; this model's speakers: {known}",
                          code="unknown_voice")

    def warmup(self) -> None:
        for _ in self.synthesize("Hello.", TTSSession(spec={}, extra=self.speaker), {}):
            pass

    def synthesize(self, text: str, session: TTSSession, meta: Mapping[str, Any]) -> Iterator[SpeechChunk]:
        plan = pieces(text, self.first_words)
        gain = Gain()
        kwargs: dict[str, Any] = {}
        if session.extra:
            kwargs["speaker"] = session.extra
        if self.language:
            kwargs["language"] = self.language
        for i, (piece, sentence_end) in enumerate(plan):
            wav = np.asarray(self.tts.tts(text=piece, **kwargs), np.float32).reshape(-1)
            chunk = SpeechChunk(pcm=gain.apply(wav), sample_rate=self.sample_rate,
                                phonemes=None, text=piece, last=i == len(plan) - 1)
            if sentence_end:
                pad_silence(chunk, self.sentence_silence)
            yield chunk
