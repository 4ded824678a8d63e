"""The 73-channel facial coefficient vector: the one definition every stage and client uses.

A frame of animation is a ``float32`` vector of 73 named channels, laid out as
52 ARKit-compatible blendshapes (0..1), 15 viseme weights (0..1) and 6 head-pose
values (yaw, pitch, roll in radians; tx, ty, tz in units of the face's inter-ocular
distance). The ARKit names are the lingua franca of avatar rigs (Audio2Face,
MetaHuman, VRM), so a client can drive its own 3D avatar from this stream alone.
"""
from __future__ import annotations

import numpy as np

BLENDSHAPES: tuple[str, ...] = (
    "eyeBlinkLeft", "eyeLookDownLeft", "eyeLookInLeft", "eyeLookOutLeft", "eyeLookUpLeft",
    "eyeSquintLeft", "eyeWideLeft",
    "eyeBlinkRight", "eyeLookDownRight", "eyeLookInRight", "eyeLookOutRight", "eyeLookUpRight",
    "eyeSquintRight", "eyeWideRight",
    "jawForward", "jawLeft", "jawRight", "jawOpen",
    "mouthClose", "mouthFunnel", "mouthPucker", "mouthLeft", "mouthRight",
    "mouthSmileLeft", "mouthSmileRight", "mouthFrownLeft", "mouthFrownRight",
    "mouthDimpleLeft", "mouthDimpleRight", "mouthStretchLeft", "mouthStretchRight",
    "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
    "mouthPressLeft", "mouthPressRight", "mouthLowerDownLeft", "mouthLowerDownRight",
    "mouthUpperUpLeft", "mouthUpperUpRight",
    "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight",
    "noseSneerLeft", "noseSneerRight",
    "tongueOut",
)

VISEMES: tuple[str, ...] = (
    "sil", "PP", "FF", "TH", "DD", "kk", "CH", "SS", "nn", "RR", "aa", "E", "ih", "oh", "ou",
)

POSE: tuple[str, ...] = ("headYaw", "headPitch", "headRoll", "headTx", "headTy", "headTz")

CHANNELS: tuple[str, ...] = BLENDSHAPES + tuple(f"viseme_{v}" for v in VISEMES) + POSE
N_CHANNELS = len(CHANNELS)
N_BLENDSHAPES = len(BLENDSHAPES)
N_VISEMES = len(VISEMES)

#: index of each channel by name (blendshape names, ``viseme_XX`` and pose names)
INDEX: dict[str, int] = {name: i for i, name in enumerate(CHANNELS)}
BLENDSHAPE_SLICE = slice(0, N_BLENDSHAPES)
VISEME_SLICE = slice(N_BLENDSHAPES, N_BLENDSHAPES + N_VISEMES)
POSE_SLICE = slice(N_BLENDSHAPES + N_VISEMES, N_CHANNELS)

#: per-frame prosody that travels beside the coefficients from ``coeffs`` to ``motion``:
#: loudness (0..1), voicing (0..1), emphasis (0..1, peaks on stressed syllables)
PROSODY: tuple[str, ...] = ("energy", "voicing", "emphasis")

assert N_CHANNELS == 73, N_CHANNELS
assert N_BLENDSHAPES == 52 and N_VISEMES == 15


def zeros(n_frames: int) -> np.ndarray:
    """A block of ``n_frames`` neutral frames (mouth closed, head still)."""
    out = np.zeros((n_frames, N_CHANNELS), np.float32)
    out[:, INDEX["viseme_sil"]] = 1.0
    return out


def frame_range(start_sample: int, n_samples: int, sample_rate: int, fps: float) -> range:
    """Frames whose presentation time falls inside audio samples ``[start, start + n)``.

    Frame ``k`` is shown at ``k / fps``; it belongs to the chunk whose samples cover that
    instant. Consecutive chunks therefore cover consecutive frames with no gap or overlap,
    and an utterance of ``N`` samples from 0 covers ``ceil(N * fps / sample_rate)`` frames.
    """
    first = -((-start_sample * fps) // sample_rate)  # ceil without floats drifting
    end = -((-(start_sample + n_samples) * fps) // sample_rate)
    return range(int(first), int(end))
