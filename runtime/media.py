"""Write what a session streams back to files: an MP4 (H.264 + AAC) and a coefficient CSV.

Why the care about lengths and timestamps: players and editors trust the container. The
video is constant frame rate (pts = frame index at time base 1/fps), so a frame the
pipeline dropped or has not delivered repeats the previous one instead of shifting every
later frame; audio gaps become silence for the same reason. The two streams end
together: ``ceil(audio_seconds × fps)`` frames, and the audio padded with silence to that
length, so nothing is cut mid-word and a player's progress bar ends where the speech does.
The AAC encoder's priming (1024 samples) is left to FFmpeg's muxer, which signals it in the
audio track's edit list: a player starts the sound on frame 0 (README: *The MP4's sound
plays on its frames*).
"""
from __future__ import annotations

import csv
import logging
import math
import os
from collections import deque
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Sequence

import av
import numpy as np

log = logging.getLogger("giris.media")

#: sample rates the AAC encoder takes; others are resampled to 48 kHz by PyAV
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
#: PCM goes to the encoder in chunks of this many samples
_AUDIO_CHUNK = 4096


def _even(n: int) -> int:
    return n + (n & 1)


def _rate(fps: float) -> Fraction:
    """25 → 25/1, 29.97 → 30000/1001 (the NTSC rates players expect), else the nearest
    fraction: an exact time base for constant frame rate."""
    ntsc = round(fps * 1.001)
    if ntsc in (24, 30, 48, 60, 120) and abs(fps - ntsc / 1.001) < 0.005:
        return Fraction(ntsc * 1000, 1001)
    return Fraction(fps).limit_denominator(1001)


class Mp4Writer:
    """Stream frames and PCM into an MP4 as they arrive; :meth:`close` finishes it.

    ``add_frame`` and ``add_audio`` may interleave in any order, each in its own order.
    Frames ahead of the audio are held (not encoded) until the audio shows they fall
    inside the final length, so a video that outruns its audio is trimmed without
    re-encoding. With no audio at all, the video keeps every frame and gets silence.
    """

    def __init__(self, path: str | os.PathLike, fps: float = 25, *, width: int, height: int,
                 sample_rate: int, crf: int = 20, preset: str = "veryfast") -> None:
        if width <= 0 or height <= 0 or sample_rate <= 0 or fps <= 0:
            raise ValueError("width, height, sample_rate and fps must be positive")
        self.path = str(path)
        self.fps = float(fps)
        self.width, self.height = int(width), int(height)
        self.sample_rate = int(sample_rate)
        self._rate = _rate(fps)
        self._container = av.open(self.path, mode="w", format="mp4",
                                  options={"movflags": "+faststart"})
        try:
            v = self._container.add_stream("libx264", rate=self._rate)
            # H.264 4:2:0 subsamples chroma 2×2: odd sizes are padded by one edge pixel
            v.width, v.height = _even(self.width), _even(self.height)
            v.pix_fmt = "yuv420p"
            v.options = {"crf": str(crf), "preset": preset}
            a_rate = self.sample_rate if self.sample_rate in AAC_RATES else 48000
            a = self._container.add_stream("aac", rate=a_rate, layout="mono")
        except Exception:
            self._container.close()
            raise
        self._video, self._audio = v, a
        self._pending: deque[tuple[int, np.ndarray]] = deque()  # frames held until audio covers them
        self._last: np.ndarray | None = None               # the last frame encoded (for repeats)
        self._next_index = 0                               # next video pts to encode
        self._audio_samples = 0                            # PCM written so far (incl. silence)
        self._closed = False

    # ------------------------------------------------------------------ input
    def add_frame(self, rgb: np.ndarray, index: int) -> None:
        """``rgb``: uint8 (H, W, 3) at ``index`` (0-based). A skipped index repeats the
        previous frame (the first frame stands in for any missing before it); an index
        already written is ignored."""
        self._check_open()
        index = int(index)
        if index < self._next_index or (self._pending and index <= self._pending[-1][0]):
            log.debug("frame out of order or repeated, ignored", extra={"index": index})
            return
        img = np.asarray(rgb)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected uint8 (H, W, 3) RGB, got {img.dtype} {img.shape}")
        self._pending.append((index, img.copy()))  # the caller may reuse its buffer
        self._flush_frames(self._covered_frames())

    def add_audio(self, pcm: np.ndarray, start_sample: int) -> None:
        """``pcm``: int16 mono samples starting at ``start_sample``. A gap before it
        becomes silence; samples overlapping what was already written are dropped."""
        self._check_open()
        samples = np.asarray(pcm).reshape(-1)
        if samples.dtype != np.int16:
            raise ValueError(f"expected int16 PCM, got {samples.dtype}")
        start = int(start_sample)
        if start > self._audio_samples:
            self._write_pcm(np.zeros(start - self._audio_samples, np.int16))
        elif start < self._audio_samples:
            samples = samples[self._audio_samples - start:]
        if samples.size:
            self._write_pcm(samples)
        self._flush_frames(self._covered_frames())

    # ------------------------------------------------------------------ output
    def close(self) -> None:
        """Settle the final length, pad, flush both encoders and finish the file."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._audio_samples:
                total = self._covered_frames()
            else:  # video only: keep every frame, the audio becomes silence
                total = max([self._next_index] + [i + 1 for i, _ in self._pending])
            self._flush_frames(total)
            self._pending.clear()
            if self._last is None and total:
                self._last = np.zeros((self.height, self.width, 3), np.uint8)
            while self._next_index < total:
                self._encode_frame(self._last)  # type: ignore[arg-type]
            want = round(total * self.sample_rate / self._rate) if total else self._audio_samples
            if want > self._audio_samples:
                self._write_pcm(np.zeros(want - self._audio_samples, np.int16))
            self._container.mux(self._video.encode(None))
            self._container.mux(self._audio.encode(None))
        finally:
            self._container.close()

    def abort(self) -> None:
        """Stop without finishing the file (the caller removes it): nothing more is encoded."""
        if not self._closed:
            self._closed = True
            self._pending.clear()
            self._container.close()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.abort()
        self.close()

    @property
    def frames_written(self) -> int:
        return self._next_index

    @property
    def audio_samples(self) -> int:
        return self._audio_samples

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the writer is closed")

    def _covered_frames(self) -> int:
        """Frames the audio so far calls for: ceil(seconds × fps), exactly."""
        return math.ceil(Fraction(self._audio_samples, self.sample_rate) * self._rate)

    def _flush_frames(self, limit: int) -> None:
        """Encode held frames with index < ``limit``, repeating across gaps."""
        while self._pending and self._pending[0][0] < limit:
            index, img = self._pending.popleft()
            fill = self._last if self._last is not None else img
            while self._next_index < index:
                self._encode_frame(fill)
            self._encode_frame(img)

    def _encode_frame(self, img: np.ndarray) -> None:
        h, w = img.shape[:2]
        if (h, w) == (self.height, self.width) and (h | w) & 1:
            img = np.pad(img, ((0, h & 1), (0, w & 1), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
        # a mis-sized frame is scaled, not rejected: a stray size must not lose the video
        frame = frame.reformat(width=self._video.width, height=self._video.height, format="yuv420p")
        frame.pts = self._next_index
        frame.time_base = 1 / self._rate  # not the stream's: the muxer changes that one
        self._container.mux(self._video.encode(frame))
        self._last = img
        self._next_index += 1

    def _write_pcm(self, samples: np.ndarray) -> None:
        for off in range(0, samples.size, _AUDIO_CHUNK):
            chunk = samples[off:off + _AUDIO_CHUNK]
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts = self._audio_samples
            frame.time_base = Fraction(1, self.sample_rate)
            # PyAV's encoder runs an AudioResampler to fltp, the encoder's rate and its
            # 1024-sample frames, carrying the timestamps over
            self._container.mux(self._audio.encode(frame))
            self._audio_samples += chunk.size


# ---------------------------------------------------------------------- files
def name_max(folder: str | os.PathLike) -> int:
    """The longest file name (bytes) the file system of ``folder`` takes."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def partial_path(path: str | os.PathLike) -> Path:
    """Where ``path`` is written until it is whole, then renamed over it: beside it (one
    file system, so the rename is atomic), hidden, named by this process. The stem is
    shortened where the name would not fit: a valid output name near the 255-byte limit
    failed after all the work, its temporary name being 20 bytes longer."""
    path = Path(path)
    tag = f".{os.getpid()}.partial{path.suffix}"
    stem = path.stem
    limit = name_max(path.parent if str(path.parent) else ".")
    while stem and len(os.fsencode(f".{stem}{tag}")) > limit:
        stem = stem[:-1]
    return path.with_name(f".{stem}{tag}")


# ---------------------------------------------------------------------- coefficients
def write_coefficients(path: str | os.PathLike, names: Sequence[str] | Iterable[Any],
                       frames: Any = None, fps: float = 25.0) -> int:
    """Write the coefficient stream as CSV: a header ``frame,pts,<channel names…>`` and
    one row per frame (pts in seconds, 6 decimals). CSV because every spreadsheet,
    pandas and DCC tool reads it, and the channel names travel in the header.

    Two call forms:
      * ``write_coefficients(path, names, frames, fps=25)``: ``frames`` a (n, C) array
        (or rows) for frames 0..n-1;
      * ``write_coefficients(path, chunks)``: the client's ``Coefficients`` chunks, each
        with ``values`` (n, C), ``first_frame``, ``fps`` and ``names``.
    Returns the number of rows written."""
    if frames is None:
        rows: list[tuple[int, float, np.ndarray]] = []
        channels: Sequence[str] = ()
        for chunk in names:
            channels = channels or tuple(chunk.names)
            values = np.asarray(chunk.values, np.float32).reshape(-1, len(chunk.names))
            for k, row in enumerate(values):
                i = int(chunk.first_frame) + k
                rows.append((i, i / float(chunk.fps), row))
        rows.sort(key=lambda r: r[0])
    else:
        channels = tuple(names)  # type: ignore[arg-type]
        values = np.asarray(frames, np.float32).reshape(-1, len(channels)) if len(channels) else \
            np.zeros((0, 0), np.float32)
        rows = [(i, i / float(fps), row) for i, row in enumerate(values)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["frame", "pts", *channels])
        for i, pts, row in rows:
            w.writerow([i, f"{pts:.6f}", *(f"{float(x):.6g}" for x in row)])
    return len(rows)
