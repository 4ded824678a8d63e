"""``coqui``: Coqui TTS from a local model, an optional engine (``pip install 'giris[coqui]'``).

It streams the same ``audio`` messages as ``piper`` (same text cuts, same utterance gain,
same pause after a sentence), but Coqui gives no phoneme timings, so its chunks carry
``phonemes = None`` and the ``coeffs`` stage animates them from the sound alone (its
acoustic path). Nothing is downloaded: the model is named by file paths.

Options (``[stages.tts] options``): ``model_path`` and ``config_path`` (required; a
Coqui checkpoint and its ``config.json``), ``vocoder_path`` / ``vocoder_config_path``
for two-stage models, ``speakers_file_path`` (handed to Coqui, though coqui-tts 0.28
reads a model's speakers from its config and ignores it), ``speaker`` and ``language``
for multi-speaker / multilingual models (checked at load), ``sentence_silence`` (0.2 s),
``first_chunk_words`` (4), ``rate`` (1.0; a session's or request's ``rate`` wins; honoured
by models with a ``length_scale``, such as VITS and Glow-TTS, ignored by the others),
``threads`` (torch's intra-op threads; default: torch's own choice).
A session's ``voice`` may name one of the model's speakers.

Each piece of text (:func:`giris.workers.text.pieces`) is one ``TTS.tts`` call with
Coqui's own sentence splitting off (the pieces are clauses already), and the silence
Coqui appends after every call (``PAD_SILENCE_SAMPLES``, 10000 samples: 0.45 s at
22.05 kHz) is cut off again, so a clause is followed by no pause and a sentence by
``sentence_silence``, as with ``piper``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from giris.workers.bases import Gain, SpeechChunk, TTSEngine, TTSSession, check_rate, pad_silence
from giris.workers.engine import EngineContext, EngineError
from giris.workers.text import pieces

#: what Coqui's ``Synthesizer.tts`` appends after each sentence when the installed
#: version does not say (``TTS.utils.synthesizer.PAD_SILENCE_SAMPLES``)
COQUI_PAD = 10000


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
        if o.get("threads"):
            import torch

            torch.set_num_threads(int(o["threads"]))
        self.tts = TTS(progress_bar=False, **{k: str(v) for k, v in files.items() if v})
        if context.device.startswith("cuda"):
            self.tts.to(context.device)
        from TTS.utils import synthesizer as coqui_synthesizer  # imported by TTS.api already

        self.pad = int(getattr(coqui_synthesizer, "PAD_SILENCE_SAMPLES", COQUI_PAD))
        self.sample_rate = int(self.tts.synthesizer.output_sample_rate)
        self.speakers = list(getattr(self.tts, "speakers", None) or [])
        self.speaker = o.get("speaker") or (self.speakers[0] if self.speakers else None)
        if self.speaker is not None and self.speaker not in self.speakers:
            raise EngineError(f"coqui speaker {self.speaker!r} is not one of the model's "
                              f"speakers ({self._known_speakers()})", code="bad_config")
        multilingual = bool(getattr(self.tts, "is_multi_lingual", False))
        languages = list((getattr(self.tts, "languages", None) if multilingual else None) or [])
        self.language = o.get("language") or (languages[0] if languages else None)
        if self.language is not None and (not multilingual or languages and self.language not in languages):
            known = ", ".join(languages) or "none: this model speaks one language"
            raise EngineError(f"coqui language {self.language!r} is not one of the model's "
                              f"languages ({known})", code="bad_config")
        scale = getattr(getattr(self.tts.synthesizer, "tts_model", None), "length_scale", None)
        #: the model's own pace, scaled by 1/rate per request (VITS, Glow-TTS); None: no rate
        self.length_scale = float(scale) if isinstance(scale, (int, float)) else None
        self.rate = check_rate(o.get("rate", 1.0), code="bad_config")
        self.sentence_silence = float(o.get("sentence_silence", 0.2))
        self.first_words = int(o.get("first_chunk_words", 4))

    @classmethod
    def preload(cls, options: Mapping[str, Any]) -> None:
        """Coqui's imports (~1 s on top of torch's; no threads started) once, in the
        launcher: a restarted worker forked from it skips them."""
        try:
            import TTS.api  # noqa: F401
        except ImportError:
            pass  # the worker says what is missing itself

    def estimate(self, spec: Mapping[str, Any]) -> dict[str, int]:
        return {"cpu": 256 * 1024}

    def check(self, spec: Mapping[str, Any]) -> None:
        self.open_tts_session(spec)  # cheap: it only picks one of the model's speakers

    def open_tts_session(self, spec: Mapping[str, Any]) -> Any:
        voice = spec.get("voice")
        if not voice:
            return self.speaker
        if voice in self.speakers:
            return voice
        raise EngineError(f"unknown voice {voice!r}; this model's speakers: {self._known_speakers()}",
                          code="unknown_voice")

    def _known_speakers(self) -> str:
        return ", ".join(self.speakers) or "none: this model has one voice"

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
        rate = check_rate(meta.get("rate", session.spec.get("rate"))) or self.rate
        said = False
        for i, (piece, sentence_end) in enumerate(plan):
            last = i == len(plan) - 1
            wav = self._speak(piece, rate, kwargs)
            if wav is None:  # nothing in it this model can say (a script it does not know)
                if not said:
                    if last:
                        raise EngineError("nothing to say: this voice knows none of the text's "
                                          "characters", code="bad_input")
                    continue
                wav = np.zeros(0, np.float32)
            said = True
            chunk = SpeechChunk(pcm=gain.apply(wav), sample_rate=self.sample_rate,
                                phonemes=None, text=piece, last=last)
            if sentence_end:
                pad_silence(chunk, self.sentence_silence)
            yield chunk

    def _speak(self, piece: str, rate: float, kwargs: Mapping[str, Any]) -> np.ndarray | None:
        """One piece as float audio, without the silence Coqui puts after it; None when the
        model has no token for anything in it (Coqui then fails on the empty input, or
        says noise for it). A model reading letters is asked first (cheap); one reading
        phonemes only when Coqui fails (phonemizing twice would cost every clause)."""
        model = self.tts.synthesizer.tts_model
        tokenizer = getattr(model, "tokenizer", None)
        if getattr(tokenizer, "phonemizer", True) is None and self._unsayable(model, piece):
            return None
        if self.length_scale is not None:
            model.length_scale = self.length_scale / rate
        try:
            wav = np.asarray(self.tts.tts(text=piece, split_sentences=False, **kwargs),
                             np.float32).reshape(-1)
        except Exception:
            if self._unsayable(model, piece):
                return None
            raise
        finally:
            if self.length_scale is not None:
                model.length_scale = self.length_scale
        if self.pad > 0 and wav.shape[0] >= self.pad and not wav[-self.pad:].any():
            wav = wav[:-self.pad]
        return wav

    def _unsayable(self, model: Any, piece: str) -> bool:
        """Whether the model's tokenizer keeps nothing of ``piece`` but padding and blanks."""
        tokenizer = getattr(model, "tokenizer", None)
        if not hasattr(tokenizer, "text_to_ids"):
            return False
        try:
            ids = tokenizer.text_to_ids(piece, language=self.language)
        except Exception:  # noqa: BLE001 - then the synthesis error is the one to report
            return False
        chars = getattr(tokenizer, "characters", None)
        filler = {getattr(tokenizer, "pad_id", None), getattr(tokenizer, "blank_id", None)}
        for name in ("bos", "eos"):
            symbol = getattr(chars, name, None)
            if symbol:
                try:
                    filler.add(chars.char_to_id(symbol))
                except Exception:  # noqa: BLE001
                    pass
        return all(i in filler for i in ids)
