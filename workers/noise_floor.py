"""The steady background under live audio, taken out of its loudness (``visemes`` engine,
acoustic path: live audio without phonemes).

The acoustic path opens the mouth by loudness, measured against silence: over a hum or
a fan 40 dB under the voice the mouth stayed ~0.2 open in every pause (0.001 in a quiet
room), and its motion followed the voice less (correlation with the voice's level 0.77 →
0.53 as the fan came up to -30 dBFS). So each frame's level is measured above the
background, as a speech enhancer does before it:

* **The floor is the lowest level of the last ``floor_window_s``** (1.5 s): minimum
  statistics (Martin 2001). Speech pauses between words at least that often, so the
  minimum is the background between the words (a quiet room's silence leaves speech as
  it was), and it follows a background that changes within that time.
* **Power subtraction, oversubtracted** (Berouti, Schwartz & Makhoul 1979): the frame's
  power less ``floor_subtract`` (2) times the floor's, since the minimum of a fluctuating
  level sits below its mean (a fan's frames spread ±3 dB); 0 turns this off.
* **At most ``floor_keep_db`` (25 dB) is taken off** a frame (the same paper's spectral
  floor): a frame that is all background goes far under the voice's peak (the loudness
  scale spans 40 dB below it) instead of to minus infinity, and the first syllable after
  a loud background stops is not erased while the floor still remembers it.

Vectorised over a chunk's frames; a session keeps the last ``floor_window_s`` of levels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from giris.workers.sliding_history import SILENT_DB, slide


@dataclass
class FloorState:
    #: the last frames' levels (dBFS), oldest first; empty in a new session (silence)
    levels: np.ndarray = field(default_factory=lambda: np.zeros(0))


class NoiseFloor:
    """Each frame's level with the steady background taken out."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        o = options
        self.window_s = float(o.get("floor_window_s", 1.5))
        self.subtract = float(o.get("floor_subtract", 2.0))
        self.keep_db = float(o.get("floor_keep_db", 25.0))

    def clean(self, db: np.ndarray, fps: float, state: FloorState) -> np.ndarray:
        """``db`` (each frame's level, dBFS) less ``subtract`` times the floor, in power;
        ``keep_db`` less at most. With ``subtract`` 0 it is ``db`` as it is, and the floor
        is not tracked (nothing would read it)."""
        if self.subtract <= 0 or db.shape[0] == 0:
            return db
        floor = self._floor(db, fps, state)
        power = 10.0 ** (db / 10.0) - self.subtract * 10.0 ** (floor / 10.0)
        return np.maximum(10.0 * np.log10(np.maximum(power, 1e-12)), db - self.keep_db)

    def _floor(self, db: np.ndarray, fps: float, state: FloorState) -> np.ndarray:
        """The lowest of ``db`` over the last ``window_s``, this frame's included."""
        span = max(1, int(round(self.window_s * fps)))
        windows, state.levels = slide(state.levels, np.maximum(db, SILENT_DB), span, SILENT_DB)
        return windows.min(axis=1)
