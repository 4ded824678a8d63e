"""Power spectra of a chunk's frames of live audio (``visemes`` engine, acoustic path),
each window transformed once for the two readers of them.

The viseme shape (spectral balance, centroid) reads the ``nfft`` samples centred on the
frame's instant, zeros past the last sample received. The speech gate
(:mod:`giris.workers.voice_activity`) reads ``nfft`` samples ending at that window's end
or at the last sample received, whichever is first: a whole window, so a tone stays one
spectral line. Where the centred window is whole these are the same samples, and one FFT
serves both; a window cut at the chunk's end takes a second, in the same batch. In 20 ms
chunks every frame's window is cut (its instant, the middle of its display interval, is
past the chunk's last sample); in 0.5 s chunks most are whole.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=16)
def hann(nfft: int) -> np.ndarray:
    """The analysis window, read-only (float64: numpy FFTs float32 slower)."""
    w = np.hanning(nfft)
    w.flags.writeable = False
    return w


@lru_cache(maxsize=16)
def _offsets(nfft: int) -> np.ndarray:
    o = np.arange(nfft)
    o.flags.writeable = False
    return o


def frame_spectra(buf: np.ndarray, centers: np.ndarray, nfft: int,
                  ending: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Power spectra (frames × ``nfft // 2 + 1``) of the Hann-windowed ``nfft`` samples of
    ``buf`` centred on each of ``centers`` and, if ``ending``, of those the gate reads
    (module docstring; else None). Read-only: the two may share rows."""
    n, size, half = centers.shape[0], buf.shape[0], nfft // 2
    start = centers - half
    last = size - nfft
    cut = np.flatnonzero(start > last) if ending else np.zeros(0, np.int64)
    starts = np.concatenate([start, np.full(cut.shape[0], last)])
    if starts.shape[0] == 0:
        empty = np.zeros((0, half + 1))
        return empty, empty if ending else None
    lo = min(0, int(starts.min()))
    padded = np.zeros(max(size, int(starts.max()) + nfft) - lo)  # zeros outside buf
    padded[-lo:size - lo] = buf
    spec = np.fft.rfft(padded[(starts - lo)[:, None] + _offsets(nfft)] * hann(nfft), axis=1)
    power = spec.real ** 2 + spec.imag ** 2
    power.flags.writeable = False
    if not ending:
        return power, None
    if cut.shape[0] == 0:
        return power, power
    rows = np.arange(n)
    rows[cut] = np.arange(n, n + cut.shape[0])
    return power[:n], power[rows]
