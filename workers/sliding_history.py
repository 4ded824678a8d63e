"""Windows of the last ``span`` frames of a per-frame measure, across a stream's chunks.

The ``visemes`` engine's acoustic path reads, at each frame, some measure over the frames
of the last fraction of a second (the noise floor: the lowest level of the last 1.5 s;
the speech gate: the dips, glides and onsets of the last 0.6 s). A chunk brings a few
frames; the session keeps the ``span - 1`` frames before them, so each new frame's window
is whole and the result does not depend on how the audio is chunked. Before a session
has heard that much, the missing frames are silence (``SILENT_DB`` for a level).
"""
from __future__ import annotations

import numpy as np

#: a level (dBFS) at or below this is silence: what a session's windows hold before it has
#: heard anything, and where the levels read through them are floored
SILENT_DB = -70.0


def slide(kept: np.ndarray, new: np.ndarray, span: int,
          silence: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The window of ``span`` frames ending at each of ``new``'s frames (last axis), as a
    read-only view of shape ``(..., n, span)``, and what the session keeps for the next
    chunk (the last ``span - 1`` frames). ``kept``: what the previous call returned; one
    of another length (a new session, another window) counts as ``silence`` (broadcast
    over the leading axes: a scalar, or one value per row as a column)."""
    keep, n = span - 1, new.shape[-1]
    h = np.empty(new.shape[:-1] + (keep + n,))
    h[..., :keep] = kept if kept.shape[-1] == keep else silence
    h[..., keep:] = new
    # a strided view of h (np.ndarray rather than as_strided: a quarter of its cost a call)
    windows = np.ndarray(h.shape[:-1] + (n, span), h.dtype, h, 0, h.strides + h.strides[-1:])
    windows.flags.writeable = False
    return windows, h[..., n:].copy()
