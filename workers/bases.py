"""Stage base classes: the message semantics of each stage, so engines only model.

A concrete engine subclasses one of these and fills in the model part:
``TTSEngine.synthesize``, ``CoeffsEngine.frames``, ``MotionEngine.animate`` and
``RenderEngine.render``. The base turns stage messages into those calls and the
results back into messages (the session clock, frame coverage, final markers).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from giris.runtime import protocol as P
from giris.workers.coefficients import N_CHANNELS, frame_range
from giris.workers.engine import Engine, EngineError, Output, StageInput


#: per-utterance style that rides along from ``say`` to ``motion``
PASS_THROUGH = ("emotion", "intensity")


# --------------------------------------------------------------------------- tts
@dataclass
class SpeechChunk:
    """A piece of synthesized speech with the phonemes spoken in it."""

    pcm: np.ndarray  # int16 (n,)
    sample_rate: int
    #: [(ipa, start_sample_relative_to_chunk, n_samples)], or None when unknown
    phonemes: list[tuple[str, int, int]] | None = None
    text: str = ""
    #: phonemes that start just after this chunk (same form, relative to its start): what
    #: the next stage may anticipate; they come again, as its own, in the next chunk
    ahead: list[tuple[str, int, int]] | None = None
    #: whether this is the utterance's last chunk, when the engine knows it already (it
    #: then leaves at once); None: the base looks one chunk ahead to find the last one
    last: bool | None = None


@dataclass
class TTSSession:
    spec: dict
    #: next sample on the session clock (audio of successive utterances is laid end to end)
    clock: int = 0
    #: the sample rate ``clock`` counts in (0: none yet); live audio may come at another
    rate: int = 0
    chunks: int = 0
    extra: Any = None


class TTSEngine(Engine):
    """Text → streaming audio chunks on the session clock."""

    stage = "tts"
    sample_rate: int = 22050

    def synthesize(self, text: str, session: TTSSession,
                   meta: Mapping[str, Any]) -> Iterator[SpeechChunk | None]:
        """Yield speech for ``text`` chunk by chunk, the first one as early as possible."""
        raise NotImplementedError

    def open_tts_session(self, spec: Mapping[str, Any]) -> Any:
        """Per-session extra state (a voice choice, ...); raise EngineError for a bad spec."""
        return None

    def open_session(self, spec: Mapping[str, Any]) -> TTSSession:
        s = TTSSession(spec=dict(spec), clock=int(spec.get("resume_sample", 0)),
                       chunks=int(spec.get("resume_chunk", 0)))
        s.extra = self.open_tts_session(spec)
        return s

    def process(self, item: StageInput, state: TTSSession) -> Iterator[Output]:
        if item.type == "say":
            text = str(item.meta.get("text", ""))
            chunks = self.synthesize(text, state, item.meta)
        elif item.type == "audio_in":
            pcm = np.asarray(item.tensors[0]).astype(np.int16, copy=False).reshape(-1)
            sr = int(item.meta.get("sample_rate", self.sample_rate))
            chunks = iter([SpeechChunk(pcm=pcm, sample_rate=sr, phonemes=None)])
        else:
            raise EngineError(f"tts cannot take {item.type!r}", code="bad_message")
        utterance = int(item.meta.get("utterance", 0))
        style = {k: item.meta[k] for k in PASS_THROUGH if k in item.meta}
        if item.meta.get("batch"):  # the non-streaming baseline: all speech, then one chunk
            chunks = iter([_join([c for c in chunks if c is not None], self.sample_rate)])
        final = item.type == "say" or bool(item.meta.get("final", True))
        pending: SpeechChunk | None = None
        sent = ended = False
        for chunk in chunks:
            if chunk is None:  # a turn for the worker's other sessions (see Engine.process)
                yield None
                continue
            if pending is not None:
                yield self._emit(pending, state, utterance, False, style)
                pending, sent = None, True
            if chunk.last is None:
                pending = chunk
                continue
            ended = final and chunk.last
            yield self._emit(chunk, state, utterance, ended, style)
            sent = True
        if pending is not None:
            yield self._emit(pending, state, utterance, final, style)
        elif not ended and (final or not sent):
            # nothing (more) to say: an empty final chunk still ends the utterance
            yield self._emit(SpeechChunk(np.zeros(0, np.int16), self.sample_rate, [], ""),
                             state, utterance, final, style)

    def _emit(self, chunk: SpeechChunk, state: TTSSession, utterance: int, final: bool,
              style: dict) -> Output:
        sr = int(chunk.sample_rate)
        if state.rate and state.rate != sr:  # the clock changes unit: same time, rounded up,
            state.clock = -(-state.clock * sr // state.rate)  # so no frame is made twice
        state.rate = sr
        start = state.clock
        state.clock += int(chunk.pcm.shape[0])
        seq = state.chunks
        state.chunks += 1
        phonemes = None if chunk.phonemes is None else _wire_marks(chunk.phonemes)
        ahead = {"phonemes_ahead": _wire_marks(chunk.ahead)} if chunk.ahead else {}
        return Output(
            type="audio", seq=seq, pts=start / chunk.sample_rate,
            meta={"utterance": utterance, "sample_rate": int(chunk.sample_rate),
                  "start_sample": start, "final": final, "text": chunk.text,
                  "phonemes": phonemes, **ahead, **style},
            tensors=[np.ascontiguousarray(chunk.pcm, dtype=np.int16)],
            to_client=True,
        )


def _wire_marks(marks: list[tuple[str, int, int]]) -> list[list]:
    """Phoneme marks as msgpack takes them: [ipa, start, n] with plain ints."""
    return [[p, int(a), int(n)] for p, a, n in marks]


class Gain:
    """One loudness for a whole utterance: Piper's per-sentence normalisation would make
    every clause equally loud; this sets the gain once (given, or from the first chunk)
    and only lowers it when a later chunk would clip."""

    target = 0.9

    def __init__(self, gain: float | None = None) -> None:
        #: None: set from the first chunk's peak; a number: a gain known beforehand (a
        #: voice's calibrated loudness), only ever lowered so that nothing clips
        self.gain = gain

    def apply(self, audio: np.ndarray) -> np.ndarray:
        peak = float(np.abs(audio).max()) if audio.size else 0.0
        if self.gain is None and peak > 1e-4:
            self.gain = min(3.0, self.target / peak)
        gain = self.gain or 1.0
        if peak * gain > 0.99:
            gain = self.gain = 0.99 / peak
        return np.clip(audio * gain * 32767.0, -32767, 32767).astype(np.int16)


def check_rate(rate: Any, code: str = "bad_input") -> float | None:
    """A speaking rate as a float in the range every component agrees on (None: none
    given); ``code``: ``bad_input`` for a request's, ``bad_config`` for an engine option."""
    if rate is None:
        return None
    try:
        r = float(rate)
    except (TypeError, ValueError):
        r = float("nan")
    lo, hi = P.RATE_RANGE
    if not lo <= r <= hi:
        raise EngineError(f"rate must be a number in {lo}..{hi}, got {rate!r}", code=code)
    return r


def pad_silence(chunk: SpeechChunk, seconds: float) -> None:
    """Silence after a sentence (a phoneme ``_`` for it, so the mouth rests there)."""
    n = int(round(seconds * chunk.sample_rate))
    if n <= 0:
        return
    start = int(chunk.pcm.shape[0])
    chunk.pcm = np.concatenate([chunk.pcm, np.zeros(n, np.int16)])
    if chunk.phonemes is not None:
        chunk.phonemes.append(("_", start, n))


#: loudness below which the edge of a run of the voice counts as silence (int16)
QUIET = 400
#: the fade over the edge of what :func:`trim_edge` keeps
FADE_S = 0.005


def trim_edge(chunk: SpeechChunk, end: bool, keep_s: float) -> None:
    """Cut the silence at the start (``end`` False) or the end of ``chunk`` down to
    ``keep_s`` seconds: where the text was cut between two runs of the voice mid-phrase,
    each run's own lead-in and fade-out made a pause a sentence would make (~0.3 s).
    Phoneme marks are shifted and clipped to the samples left."""
    pcm = chunk.pcm
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > QUIET)
    if not loud.size:
        return
    keep = int(round(keep_s * chunk.sample_rate))
    if end:
        lo, hi = 0, min(pcm.shape[0], int(loud[-1]) + 1 + keep)
    else:
        lo, hi = max(0, int(loud[0]) - keep), pcm.shape[0]
    if (lo, hi) == (0, pcm.shape[0]):
        return
    out = pcm[lo:hi].astype(np.float32)
    fade = min(out.shape[0], int(FADE_S * chunk.sample_rate))  # no click where it was cut
    ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
    if end:
        out[out.shape[0] - fade:] *= ramp[::-1]
    else:
        out[:fade] *= ramp
    chunk.pcm = np.round(out).astype(np.int16)

    def clip(marks: list[tuple[str, int, int]] | None, own: bool) -> list | None:
        if marks is None:
            return None
        out = []
        for p, start, n in marks:
            a, b = start - lo, start + n - lo
            if not own:  # marks after the chunk (ahead) only move
                out.append((p, a, n))
                continue
            a, b = max(a, 0), min(b, hi - lo)
            if b > a:
                out.append((p, a, b - a))
        return out

    chunk.phonemes = clip(chunk.phonemes, True)
    chunk.ahead = clip(chunk.ahead, False)


def _join(chunks: list[SpeechChunk], sample_rate: int) -> SpeechChunk:
    """Many chunks as one (phoneme offsets shifted): the batch baseline's single block."""
    if not chunks:
        return SpeechChunk(np.zeros(0, np.int16), sample_rate, [], "")
    phonemes: list | None = []
    offset = 0
    for c in chunks:
        if c.phonemes is None or phonemes is None:
            phonemes = None
        else:
            phonemes.extend((p, a + offset, n) for p, a, n in c.phonemes)
        offset += int(c.pcm.shape[0])
    return SpeechChunk(np.concatenate([c.pcm for c in chunks]).astype(np.int16),
                       chunks[0].sample_rate, phonemes, " ".join(c.text for c in chunks))


# ------------------------------------------------------------------------ coeffs
class CoeffsEngine(Engine):
    """Audio chunk (+ phonemes) → one 73-vector per video frame it covers."""

    stage = "coeffs"

    def frames(self, pcm: np.ndarray, sample_rate: int, start_sample: int,
               phonemes: list | None, frames: range, fps: float, state: Any,
               final: bool, ahead: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return (coefficients float32 (len(frames), 73), prosody float32 (len(frames), 3)).

        ``phonemes`` are those starting in this chunk; ``ahead`` those starting just
        after it (they come again in the next chunk), to anticipate."""
        raise NotImplementedError

    def process(self, item: StageInput, state: Any) -> Iterator[Output]:
        meta = item.meta
        pcm = np.asarray(item.tensors[0]).reshape(-1) if item.tensors else np.zeros(0, np.int16)
        sr = int(meta["sample_rate"])
        fps = float(self.fps_of(state))
        covered = frame_range(int(meta["start_sample"]), int(pcm.shape[0]), sr, fps)
        coeffs, prosody = self.frames(pcm, sr, int(meta["start_sample"]), meta.get("phonemes"),
                                      covered, fps, state, bool(meta.get("final")),
                                      ahead=meta.get("phonemes_ahead"))
        if len(covered) == 0 and not meta.get("final"):
            return
        out_meta = {"utterance": meta.get("utterance", 0), "fps": fps,
                    "first_frame": covered.start, "final": bool(meta.get("final")),
                    **{k: meta[k] for k in PASS_THROUGH if k in meta}}
        yield Output(type="coeffs", seq=covered.start, pts=covered.start / fps, meta=out_meta,
                     tensors=[np.ascontiguousarray(coeffs, np.float32).reshape(len(covered), N_CHANNELS),
                              np.ascontiguousarray(prosody, np.float32).reshape(len(covered), 3)])

    @staticmethod
    def fps_of(state: Any) -> float:
        spec = getattr(state, "spec", None) or (state if isinstance(state, dict) else {})
        return float(spec.get("fps", 25))


# ------------------------------------------------------------------------ motion
class MotionEngine(Engine):
    """Coefficient frames + prosody → the same frames with head, blinks, brows, emotion."""

    stage = "motion"

    def animate(self, coeffs: np.ndarray, prosody: np.ndarray, first_frame: int, fps: float,
                state: Any, meta: Mapping[str, Any]) -> np.ndarray:
        raise NotImplementedError

    def process(self, item: StageInput, state: Any) -> Iterator[Output]:
        coeffs = np.array(item.tensors[0], np.float32, copy=True).reshape(-1, N_CHANNELS)
        prosody = (np.asarray(item.tensors[1], np.float32).reshape(-1, 3) if len(item.tensors) > 1
                   else np.zeros((coeffs.shape[0], 3), np.float32))
        meta = dict(item.meta)
        out = self.animate(coeffs, prosody, int(meta["first_frame"]), float(meta["fps"]), state, meta)
        yield Output(type="coeffs", seq=item.seq, pts=item.pts, meta=meta,
                     tensors=[np.ascontiguousarray(out, np.float32)], to_client=True)


# ------------------------------------------------------------------------ render
class RenderEngine(Engine):
    """Coefficient frames + the session's avatar → RGB frames, written into pool slots."""

    stage = "render"

    def frame_shape(self, state: Any) -> tuple[int, int, int]:
        size = int(state.spec.get("size", 512)) if hasattr(state, "spec") else 512
        return (size, size, 3)

    def render(self, state: Any, coeffs: np.ndarray, out: np.ndarray) -> None:
        """Draw one frame for the 73-vector ``coeffs`` into ``out`` (uint8 H×W×3)."""
        raise NotImplementedError

    def render_batch(self, jobs: Sequence[tuple[Any, np.ndarray, np.ndarray]]) -> None:
        """Draw several frames (maybe of several sessions) at once; override to batch."""
        for state, row, out in jobs:
            self.render(state, row, out)

    def jobs(self, item: StageInput, state: Any) -> Iterator["FrameJob | Output"]:
        """The frames a coefficient block asks for, not yet drawn (so the worker can draw
        the ready frames of several sessions in one ``render_batch``)."""
        coeffs = np.asarray(item.tensors[0], np.float32).reshape(-1, N_CHANNELS)
        meta = item.meta
        fps = float(meta["fps"])
        first = int(meta["first_frame"])
        n = coeffs.shape[0]
        final = bool(meta.get("final"))
        want = (getattr(state, "spec", None) or {}).get("want")
        if want is not None and "frames" not in want:  # coefficients only: draw nothing
            n = 0
        for i in range(n):
            k = first + i
            yield FrameJob(row=coeffs[i], shape=self.frame_shape(state), output=Output(
                type="frame", seq=k, pts=k / fps,
                meta={"utterance": meta.get("utterance", 0), "final": final and i == n - 1}))
        if n == 0 and final:
            yield Output(type="mark", seq=first, pts=first / fps,
                         meta={"utterance": meta.get("utterance", 0), "final": True})

    def process(self, item: StageInput, state: Any) -> Iterator[Output]:
        for job in self.jobs(item, state):
            if isinstance(job, Output):
                yield job
                continue
            out = self.ctx.alloc(job.shape, np.uint8)
            self.render(state, job.row, out)
            job.output.tensors = [out]
            yield job.output


@dataclass
class FrameJob:
    """One frame to draw: its coefficients, its size, and the message it will become."""

    row: np.ndarray
    shape: tuple[int, int, int]
    output: Output
