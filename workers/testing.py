"""Small engines for protocol tests: fast, deterministic, and able to misbehave on request.

``test-source`` (tts): one chunk of tone per word. A word ``CRASH`` kills the process,
``HANG`` stops it answering, ``SLOW`` makes each chunk take ``slow_s``.
``test-relay`` (coeffs or motion): audio -> one row per frame (jawOpen = loudness);
coefficients pass through. ``test-frames`` (render): frames whose pixels encode jawOpen.
Option ``crash_on_start`` makes any of them die while loading (a crash loop; a path: while
that file exists; ``raise_on_start``: raise, as a bug would), ``load_s``
makes loading take that long, ``open_s`` opening a session (``test-frames``);
``estimate_bytes`` sets what a session is said to cost on ``estimate_device``;
``preload_s`` makes the launcher's preload take that long, ``preload_claims_cuda`` makes
it look as if it had initialised CUDA.
"""
from __future__ import annotations

import os
import time
from typing import Any, Iterator, Mapping

import numpy as np

from giris.workers.bases import CoeffsEngine, RenderEngine, SpeechChunk, TTSEngine, TTSSession
from giris.workers.coefficients import INDEX, N_CHANNELS, zeros
from giris.workers.engine import EngineContext, EngineError, Output, StageInput


class _Misbehaving:
    #: read by the launcher's preload, and per utterance (the relay's)
    late_options = frozenset({"preload_s", "preload_claims_cuda", "client_late_s"})

    @classmethod
    def preload(cls, options: Mapping[str, Any]) -> None:
        time.sleep(float(options.get("preload_s", 0.0)))  # heavy imports, in the launcher
        if options.get("preload_claims_cuda"):  # as if the preload had initialised CUDA
            import torch

            torch.cuda.is_initialized = lambda: True

    def _setup(self, options: Mapping[str, Any]) -> None:
        crash = options.get("crash_on_start")
        if crash is True or isinstance(crash, str) and os.path.exists(crash):
            os._exit(17)
        if options.get("raise_on_start"):  # a bug: an exception, not a configuration error
            raise RuntimeError("raise_on_start: a bug while loading")
        time.sleep(float(options.get("load_s", 0.0)))  # a model that takes a while to load
        self.estimate_bytes = int(options.get("estimate_bytes", 0))
        self.estimate_device = str(options.get("estimate_device", "cpu"))

    def estimate(self, spec: Mapping[str, Any]) -> dict[str, int]:
        return {self.estimate_device: self.estimate_bytes} if self.estimate_bytes else {}

    def held(self, state: Any) -> dict[str, int]:
        return self.estimate({})


class _State:
    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = dict(spec)


class SourceTestEngine(_Misbehaving, TTSEngine):
    sample_rate = 16000

    def __init__(self, options: Mapping[str, Any], context: EngineContext) -> None:
        super().__init__(options, context)
        self._setup(options)
        self.word_s = float(options.get("word_s", 0.2))
        self.slow_s = float(options.get("slow_s", 0.05))

    def open_tts_session(self, spec: Mapping[str, Any]) -> Any:
        self.check(spec)
        return None

    def check(self, spec: Mapping[str, Any]) -> None:
        if spec.get("voice") == "BUG":  # a bug of the check itself, not a verdict
            raise RuntimeError("a bug in check()")
        if spec.get("voice") not in (None, "", "test"):
            raise EngineError(f"unknown voice {spec.get('voice')!r}", code="unknown_voice")

    def synthesize(self, text: str, session: TTSSession, meta: Mapping[str, Any]) -> Iterator[SpeechChunk]:
        words = text.split()
        if not words:
            raise EngineError("empty text", code="bad_input")
        n = int(self.word_s * self.sample_rate)
        t = np.arange(n) / self.sample_rate
        tone = (8000 * np.sin(2 * np.pi * 220 * t) * np.hanning(n)).astype(np.int16)
        for w in words:
            if w == "CRASH":
                os._exit(9)
            if w == "HANG":
                time.sleep(3600)
            if w == "SLOW":
                time.sleep(self.slow_s)
            yield SpeechChunk(pcm=tone.copy(), sample_rate=self.sample_rate,
                              phonemes=[("a", 0, n)], text=w)


class RelayTestEngine(_Misbehaving, CoeffsEngine):
    def __init__(self, options: Mapping[str, Any], context: EngineContext) -> None:
        super().__init__(options, context)
        self._setup(options)

    def open_session(self, spec: Mapping[str, Any]) -> Any:
        return _State(spec)

    def frames(self, pcm, sample_rate, start_sample, phonemes, frames, fps, state, final, ahead=None):
        out = zeros(len(frames))
        for i, k in enumerate(frames):
            a = int(round(k * sample_rate / fps)) - start_sample
            win = pcm[max(0, a):a + sample_rate // int(fps)].astype(np.float32)
            out[i, INDEX["jawOpen"]] = min(1.0, float(np.sqrt(np.mean(win**2))) / 6000) if win.size else 0
        return out, np.zeros((len(frames), 3), np.float32)

    def process(self, item: StageInput, state: Any) -> Iterator[Output]:
        if item.type == "coeffs":  # motion position: pass through, to the client too
            out = Output(type="coeffs", seq=item.seq, pts=item.pts, meta=dict(item.meta),
                         tensors=[np.array(item.tensors[0], np.float32).reshape(-1, N_CHANNELS)],
                         to_client=True)
            late = float(self.options.get("client_late_s", 0.0))
            if late:  # the client's copy after the frames it leads to (another connection)
                yield Output(out.type, out.seq, out.pts, dict(out.meta), out.tensors, to_client=False)
                time.sleep(late)
                out.downstream = False
            yield out
        else:
            yield from super().process(item, state)


class FrameTestEngine(_Misbehaving, RenderEngine):
    def __init__(self, options: Mapping[str, Any], context: EngineContext) -> None:
        super().__init__(options, context)
        self._setup(options)
        self.render_s = float(options.get("render_s", 0.0))
        self.open_s = float(options.get("open_s", 0.0))

    def open_session(self, spec: Mapping[str, Any]) -> Any:
        time.sleep(self.open_s)  # a portrait that takes a while to fit
        if spec.get("avatar") == b"not an image":
            raise EngineError("cannot decode the avatar image", code="bad_image")
        return _State(spec)

    def render(self, state: Any, coeffs: np.ndarray, out: np.ndarray) -> None:
        if self.render_s:
            time.sleep(self.render_s)
        out[...] = int(round(float(coeffs[INDEX["jawOpen"]]) * 255))
