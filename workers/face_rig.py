"""A 3D face rig on the 68 dlib landmarks: blendshapes and head pose → 2D landmark targets.

* **Lifting.** The detected landmarks give x and y; depth comes from a generic mean-face
  template (``TEMPLATE_Z``, authored for this module: inter-ocular units, z towards the
  viewer, 0 at the outer eye corners; nose tip +0.55, chin +0.25, jaw angle about −0.9)
  scaled by the detected inter-ocular distance. The source face is assumed roughly frontal
  (its in-plane roll is measured from the eyes and honoured).
* **Blendshapes.** Each ARKit channel is a 3D displacement field on the 68 points
  (``CHANNEL_MOVES``), written in a face frame (x towards the image's right, i.e. the
  subject's *left*; y up; z towards the viewer; inter-ocular units), rotated into the image
  by the face's roll and scaled to pixels once per session. Eyelid channels are relative to
  the avatar's own eye opening; ``mouthFrown`` to its mouth corners (a portrait smiling at
  rest frowns by first losing that smile: ``rest_smile``). Per frame
  ``targets = rest + Σ w_c · D_c``, plus three couplings that are not linear: ``mouthClose``
  closes the lips by the fraction it gives of the gap ``jawOpen`` made; a frown closes a
  portrait's parted lips (``lip_seal``, eased in, and out as the jaw opens), the warp
  ``SEAL_WARP`` of the way; and the upper lid travels only ``BLINK_WARP`` of the way on a
  blink (the renderer draws the rest of the lid and of the lips: squashing an eye or the
  teeth to nothing with a smooth warp folds the image or leaves a bright line).
* **Extra points.** Besides the 68 landmarks the rig moves a skull arc (forehead, top and
  sides of the head, rigid with the head) and three neck points (a fraction
  ``NECK_FOLLOW`` of the head motion), so hair and neck follow the head smoothly. While
  ``eyeWide`` is on or the brows are raised, ``frame_targets`` adds band points just above
  the upper lids and below the brows, carried with them (``LASH_BAND``): the lash band
  rises whole, or stays whole under a raised brow.
* **Head pose.** Right-handed, y up, z towards the viewer (as in ``motion_prosody``):
  positive ``headYaw`` turns the nose towards the image's right, positive ``headPitch`` is
  chin down, positive ``headRoll`` turns the face counter-clockwise on screen. Rotation is
  about a pivot ``PIVOT`` behind and below the eyes (the top of the neck); ``headTx``/``headTy``
  (image right / up) and ``headTz`` (towards the viewer: a weak-perspective scale with the
  camera ``CAMERA_DISTANCE`` inter-ocular units away) are in inter-ocular units. Projection
  is orthographic after that scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from giris.workers.coefficients import BLENDSHAPES, INDEX, N_BLENDSHAPES

# ------------------------------------------------------------------- the depth template
_JAW_Z = [0.25 - 1.15 * abs((k - 8) / 8.0) ** 1.5 for k in range(17)]
TEMPLATE_Z = np.array(
    _JAW_Z
    # brows 17-21 (image left) and 22-26 (image right): outer behind, inner forward
    + [-0.28, -0.10, 0.02, 0.10, 0.15, 0.15, 0.10, 0.02, -0.10, -0.28]
    # nose bridge 27-30, nostrils 31-35
    + [0.12, 0.25, 0.40, 0.55, 0.24, 0.32, 0.40, 0.32, 0.24]
    # eyes 36-41, 42-47: outer corner, upper lid, upper lid, inner corner, lower, lower
    + [-0.12, 0.04, 0.06, 0.0, 0.04, 0.02, 0.0, 0.06, 0.04, -0.12, 0.02, 0.04]
    # outer lips 48-59
    + [0.10, 0.24, 0.31, 0.34, 0.31, 0.24, 0.10, 0.22, 0.28, 0.30, 0.28, 0.22]
    # inner lips 60-67
    + [0.12, 0.26, 0.29, 0.26, 0.12, 0.25, 0.27, 0.25],
    np.float32)
assert TEMPLATE_Z.shape == (68,)

#: head rotation pivot, face frame (from the eye midpoint): below the eyes, behind the face
PIVOT = (0.0, -0.9, -1.3)
#: camera distance for headTz's weak perspective, inter-ocular units
CAMERA_DISTANCE = 10.0
#: share of a blink done by warping the upper lid (the renderer draws the rest)
BLINK_WARP = 0.45
#: share of the head motion the neck points follow
NECK_FOLLOW = 0.3

# landmark groups, image-left (subject's Right, "R") and image-right (subject's Left, "L")
JAW = list(range(17))
R_EYE_UP, R_EYE_LO = [37, 38], [41, 40]
L_EYE_UP, L_EYE_LO = [43, 44], [47, 46]


def _sym(moves: dict[int, tuple[float, float, float]]) -> dict[int, tuple[float, float, float]]:
    """Mirror a subject's-Left move table (image right side) to the subject's Right side."""
    mirror = {**{k: 16 - k for k in range(17)},
              **{17 + i: 26 - i for i in range(10)},
              27: 27, 28: 28, 29: 29, 30: 30, 31: 35, 32: 34, 33: 33, 34: 32, 35: 31,
              36: 45, 37: 44, 38: 43, 39: 42, 40: 47, 41: 46,
              42: 39, 43: 38, 44: 37, 45: 36, 46: 41, 47: 40,
              48: 54, 49: 53, 50: 52, 51: 51, 52: 50, 53: 49, 54: 48,
              55: 59, 56: 58, 57: 57, 58: 56, 59: 55,
              60: 64, 61: 63, 62: 62, 63: 61, 64: 60, 65: 67, 66: 66, 67: 65}
    return {mirror[k]: (-dx, dy, dz) for k, (dx, dy, dz) in moves.items()}


def _times(moves: dict[int, tuple[float, float, float]], f: float) -> dict[int, tuple]:
    return {k: (f * d[0], f * d[1], f * d[2]) for k, d in moves.items()}


def _scaled(weights: dict[int, float], d: tuple[float, float, float]) -> dict[int, tuple]:
    return {k: (w * d[0], w * d[1], w * d[2]) for k, w in weights.items()}


# weights of the lower face that follow the jaw
_JAW_FOLLOW = {8: 1.0, 7: 0.95, 9: 0.95, 6: 0.82, 10: 0.82, 5: 0.62, 11: 0.62, 4: 0.4, 12: 0.4,
               3: 0.2, 13: 0.2, 2: 0.07, 14: 0.07,
               55: 0.82, 56: 0.86, 57: 0.88, 58: 0.86, 59: 0.82,
               65: 0.84, 66: 0.86, 67: 0.84, 48: 0.32, 54: 0.32, 60: 0.36, 64: 0.36}
_LOWER_LIP = [55, 56, 57, 58, 59, 65, 66, 67]
_UPPER_LIP = [49, 50, 51, 52, 53, 61, 62, 63]

# Left-side tables (subject's left = image right, +x); mirrored for Right.
# (mouthSmile lifts the inner lip next to the middle, 63 and 65, no more than the outer lip
# over it, 52 and 56: at 0.03-0.04 a closed mouth's lip line bent into a sharp V)
_SMILE_L = {54: (0.10, 0.09, -0.03), 64: (0.09, 0.08, -0.03), 53: (0.04, 0.04, -0.01),
            55: (0.05, 0.05, -0.01), 63: (0.02, 0.012, 0.0), 65: (0.025, 0.015, 0.0),
            52: (0.01, 0.01, 0.0), 56: (0.02, 0.02, 0.0),
            12: (0.02, 0.02, 0.0), 13: (0.02, 0.03, 0.0), 11: (0.01, 0.01, 0.0),
            35: (0.015, 0.01, 0.0), 46: (0.0, 0.025, 0.0), 47: (0.0, 0.02, 0.0)}
_STRETCH_L = {54: (0.10, -0.03, -0.02), 64: (0.09, -0.02, -0.02), 53: (0.04, -0.005, 0.0),
              55: (0.05, -0.02, 0.0), 63: (0.03, 0.0, 0.0), 65: (0.04, -0.02, 0.0),
              56: (0.02, -0.02, 0.0), 52: (0.01, 0.0, 0.0)}
_DIMPLE_L = {54: (0.06, 0.01, -0.04), 64: (0.05, 0.01, -0.04), 53: (0.02, 0.005, 0.0),
             55: (0.02, 0.005, 0.0)}
_PRESS_L = {52: (0.0, -0.03, 0.0), 53: (0.0, -0.02, 0.0), 56: (0.0, 0.03, 0.0), 55: (0.0, 0.02, 0.0),
            63: (0.0, -0.015, 0.0), 65: (0.0, 0.015, 0.0), 51: (0.0, -0.015, 0.0),
            57: (0.0, 0.015, 0.0), 54: (0.01, 0.0, 0.0)}
_UPPER_UP_L = {52: (0.0, 0.08, 0.01), 53: (0.0, 0.065, 0.0), 51: (0.0, 0.04, 0.0), 63: (0.0, 0.07, 0.0),
               62: (0.0, 0.035, 0.0), 54: (0.0, 0.015, 0.0), 64: (0.0, 0.02, 0.0), 35: (0.0, 0.015, 0.0)}
_LOWER_DOWN_L = {56: (0.0, -0.08, 0.01), 55: (0.0, -0.065, 0.0), 57: (0.0, -0.04, 0.0),
                 65: (0.0, -0.07, 0.0), 66: (0.0, -0.035, 0.0), 54: (0.0, -0.01, 0.0),
                 64: (0.0, -0.015, 0.0)}
#: brow raise tables are written at BROW_RANGE × their first scale: a weight of 1 lifts
#: the inner brow ~0.24 IOD, room for a sad or surprised face, while the prosody engine's
#: emphasis raises send 1/BROW_RANGE of their old weights (same pixels, see motion_prosody)
BROW_RANGE = 2.0  # a power of two: halved weights × doubled tables give the same floats
_BROW_OUTER_UP_L = {26: (0.01, 0.13, 0.0), 25: (0.0, 0.11, 0.0), 24: (0.0, 0.07, 0.0),
                    23: (0.0, 0.03, 0.0), 45: (0.0, 0.01, 0.0)}
_BROW_INNER_UP = {21: (-0.01, 0.12, 0.0), 22: (0.01, 0.12, 0.0), 20: (0.0, 0.09, 0.0),
                  23: (0.0, 0.09, 0.0), 19: (0.0, 0.05, 0.0), 24: (0.0, 0.05, 0.0),
                  18: (0.0, 0.02, 0.0), 25: (0.0, 0.02, 0.0)}
#: brows down and together (corrugator, angry): the inner end most; the upper lid goes down
#: a little with it, so the skin between brow and lid is not squashed to a line
_BROW_DOWN_L = {22: (-0.055, -0.19, 0.02), 23: (-0.04, -0.16, 0.01), 24: (-0.02, -0.12, 0.0),
                25: (-0.005, -0.08, 0.0), 26: (0.0, -0.05, 0.0), 27: (0.0, -0.02, 0.0),
                42: (0.0, -0.015, 0.0), 43: (0.0, -0.045, 0.0), 44: (0.0, -0.035, 0.0),
                45: (0.0, -0.01, 0.0)}
#: cheeks up (Duchenne smile): cheek and lower lid up, the mouth corners lifted with them
_CHEEK_SQUINT_L = {46: (0.0, 0.035, 0.0), 47: (0.0, 0.03, 0.0), 45: (0.0, 0.015, 0.0),
                   13: (0.0, 0.05, 0.0), 14: (0.0, 0.04, 0.0), 12: (0.0, 0.03, 0.0),
                   54: (0.02, 0.05, 0.0), 64: (0.02, 0.045, 0.0), 53: (0.01, 0.02, 0.0),
                   55: (0.01, 0.025, 0.0), 35: (0.005, 0.015, 0.0)}
_SNEER_L = {35: (0.01, 0.04, 0.0), 34: (0.0, 0.025, 0.0), 53: (0.0, 0.02, 0.0), 52: (0.0, 0.015, 0.0),
            22: (-0.01, -0.03, 0.0)}
_CHEEK_PUFF = {3: (-0.06, 0.0, 0.02), 4: (-0.07, 0.0, 0.03), 5: (-0.05, 0.0, 0.02),
               13: (0.06, 0.0, 0.02), 12: (0.07, 0.0, 0.03), 11: (0.05, 0.0, 0.02),
               48: (-0.01, 0.0, 0.03), 54: (0.01, 0.0, 0.03), 51: (0.0, 0.01, 0.03),
               57: (0.0, -0.01, 0.03)}

#: channel → {landmark: (dx, dy, dz)}, face frame, inter-ocular units (see module docstring).
#: Eyelid channels are filled per session (they scale with the avatar's eye opening), and
#: so is mouthFrown (it first undoes the smile the portrait has at rest).
CHANNEL_MOVES: dict[str, dict[int, tuple[float, float, float]]] = {
    "jawOpen": {**_scaled(_JAW_FOLLOW, (0.0, -0.46, -0.08)),
                48: (0.03, -0.15, -0.02), 54: (-0.03, -0.15, -0.02),
                60: (0.03, -0.17, -0.02), 64: (-0.03, -0.17, -0.02)},
    "jawLeft": _scaled(_JAW_FOLLOW, (0.12, 0.0, 0.0)),
    "jawRight": _scaled(_JAW_FOLLOW, (-0.12, 0.0, 0.0)),
    "jawForward": _scaled(_JAW_FOLLOW, (0.0, 0.02, 0.12)),
    "mouthFunnel": {48: (0.1, 0.0, 0.05), 54: (-0.1, 0.0, 0.05), 60: (0.1, 0.0, 0.06),
                    64: (-0.1, 0.0, 0.06), 49: (0.05, 0.03, 0.08), 53: (-0.05, 0.03, 0.08),
                    50: (0.02, 0.05, 0.1), 52: (-0.02, 0.05, 0.1), 51: (0.0, 0.055, 0.11),
                    59: (0.05, -0.04, 0.08), 55: (-0.05, -0.04, 0.08), 58: (0.02, -0.06, 0.1),
                    56: (-0.02, -0.06, 0.1), 57: (0.0, -0.065, 0.11),
                    61: (0.04, 0.04, 0.1), 62: (0.0, 0.05, 0.11), 63: (-0.04, 0.04, 0.1),
                    67: (0.04, -0.06, 0.1), 66: (0.0, -0.07, 0.11), 65: (-0.04, -0.06, 0.1)},
    "mouthPucker": {48: (0.14, 0.0, 0.08), 54: (-0.14, 0.0, 0.08), 60: (0.13, 0.0, 0.08),
                    64: (-0.13, 0.0, 0.08), 49: (0.08, 0.015, 0.12), 53: (-0.08, 0.015, 0.12),
                    50: (0.03, 0.02, 0.14), 52: (-0.03, 0.02, 0.14), 51: (0.0, 0.02, 0.15),
                    59: (0.08, -0.015, 0.12), 55: (-0.08, -0.015, 0.12), 58: (0.03, -0.02, 0.14),
                    56: (-0.03, -0.02, 0.14), 57: (0.0, -0.02, 0.15),
                    61: (0.06, -0.005, 0.13), 62: (0.0, -0.008, 0.14), 63: (-0.06, -0.005, 0.13),
                    67: (0.06, 0.005, 0.13), 66: (0.0, 0.008, 0.14), 65: (-0.06, 0.005, 0.13)},
    "mouthLeft": {k: (0.09 if k not in (48, 60, 54, 64) else 0.07, 0.0, 0.0) for k in range(48, 68)},
    "mouthRight": {k: (-0.09 if k not in (48, 60, 54, 64) else -0.07, 0.0, 0.0) for k in range(48, 68)},
    "mouthSmileLeft": _SMILE_L, "mouthSmileRight": _sym(_SMILE_L),
    "mouthStretchLeft": _STRETCH_L, "mouthStretchRight": _sym(_STRETCH_L),
    "mouthDimpleLeft": _DIMPLE_L, "mouthDimpleRight": _sym(_DIMPLE_L),
    "mouthPressLeft": _PRESS_L, "mouthPressRight": _sym(_PRESS_L),
    "mouthUpperUpLeft": _UPPER_UP_L, "mouthUpperUpRight": _sym(_UPPER_UP_L),
    "mouthLowerDownLeft": _LOWER_DOWN_L, "mouthLowerDownRight": _sym(_LOWER_DOWN_L),
    "mouthRollLower": {55: (0.0, 0.045, -0.02), 56: (0.0, 0.055, -0.02), 57: (0.0, 0.06, -0.02),
                       58: (0.0, 0.055, -0.02), 59: (0.0, 0.045, -0.02),
                       65: (0.0, 0.01, -0.02), 66: (0.0, 0.012, -0.02), 67: (0.0, 0.01, -0.02)},
    "mouthRollUpper": {49: (0.0, -0.04, -0.02), 50: (0.0, -0.05, -0.02), 51: (0.0, -0.05, -0.02),
                       52: (0.0, -0.05, -0.02), 53: (0.0, -0.04, -0.02),
                       61: (0.0, -0.01, -0.02), 62: (0.0, -0.012, -0.02), 63: (0.0, -0.01, -0.02)},
    "mouthShrugUpper": {k: (0.0, 0.035, 0.01) for k in _UPPER_LIP},
    "browInnerUp": _times(_BROW_INNER_UP, BROW_RANGE),
    "browOuterUpLeft": _times(_BROW_OUTER_UP_L, BROW_RANGE),
    "browOuterUpRight": _sym(_times(_BROW_OUTER_UP_L, BROW_RANGE)),
    "browDownLeft": _BROW_DOWN_L, "browDownRight": _sym(_BROW_DOWN_L),
    "cheekSquintLeft": _CHEEK_SQUINT_L, "cheekSquintRight": _sym(_CHEEK_SQUINT_L),
    "noseSneerLeft": _SNEER_L, "noseSneerRight": _sym(_SNEER_L),
    "cheekPuff": _CHEEK_PUFF,
}


#: mouthFrown: how far below the lips' midline a frown takes the corners (IOD units), and
#: how much of a smiling portrait's raised corners count as its smile (above RESTING_CORNER)
FROWN_DROP = 0.09
RESTING_CORNER = 0.03
#: mouthFrown: a lip point at t across the mouth (0 in the middle, 1 at a corner) comes down
#: by the corners' drop × |t|^FROWN_BEND. At 2 the lips' middle half came down with the
#: corners: the lips as a whole sank (0.029 IOD in the rig at sad 1.0, 0.056 as dlib
#: reads the frame) where a frown pulls the corners down
FROWN_BEND = 3.0
#: mouthFrown on a portrait parted at rest: the share of its gap between the inner lips the
#: upper lip comes down over the teeth (at a full smile; less for a smaller one), and the
#: most of that gap mouthShrugLower's lower lip may take (the rest of its push lifts both
#: lips together: pressed lips rise as one, they do not cross)
FROWN_COVER = 0.2
SHRUG_GAP = 0.25
#: a gap between the inner lips under this (IOD units) counts as lips touching
SHRUG_TOUCH = 0.06
#: the inner lips' facing points, upper → lower, one pair per column
INNER_PAIRS = ((61, 67), (62, 66), (63, 65))
_INNER_UP, _INNER_LO = [a for a, _ in INNER_PAIRS], [b for _, b in INNER_PAIRS]
#: lips closing over a gap meet this share of it down from the upper lip (the rig's frown
#: closure and the renderer's drawn seal alike)
LIP_MEET = 0.45
#: mouthFrown on a portrait parted at rest (a smile showing teeth): the lips relax closed
#: as the smile goes, fully from this frown weight on (the default intensity's 0.6 takes
#: the astronaut's smile out); the share of the closure the lower lip's outer edge
#: follows (its inner edge alone made it puffy); and the jawOpen at which
#: speech has opened them again (the jaw parts the lips from there: the gap the jaw
#: makes and the portrait's own, as without a frown)
FROWN_SEAL = 0.5
SEAL_OUTER = 0.35
SEAL_JAW = 0.3
#: the share of that closing done by the warp (the renderer draws the lips over the rest:
#: a smooth warp squeezing the lips together squashes the teeth between them to a bright
#: line, never to nothing; as a blink's lid, see BLINK_WARP)
SEAL_WARP = 0.5


def rest_smile(face_xy: np.ndarray) -> float:
    """How far a portrait's mouth corners sit above a resting mouth's (IOD units, ≥ 0):
    corners above the midline between the lips (outer and inner centres) by more than
    ``RESTING_CORNER``. The astronaut grins: ~0.15."""
    mid = float(np.mean(face_xy[[51, 57, 62, 66], 1]))
    corner = float(np.mean(face_xy[[48, 54], 1]))
    return float(np.clip(corner - mid - RESTING_CORNER, 0.0, 0.3))


def _mouth_span(face_xy: np.ndarray) -> np.ndarray:
    """Each lip point's place across the mouth: −1 at the image-left corner, 0 in the
    middle, +1 at the image-right corner (face frame x)."""
    mid = 0.5 * (face_xy[48, 0] + face_xy[54, 0])
    half = max(0.5 * (face_xy[54, 0] - face_xy[48, 0]), 1e-3)
    t = np.zeros(68)
    t[48:68] = np.clip((face_xy[48:68, 0] - mid) / half, -1.0, 1.0)
    return t


def _inner_gaps(face_xy: np.ndarray) -> np.ndarray:
    """The rest gap between the inner lips (IOD units, ≥ 0) at its three columns."""
    return np.array([max(float(face_xy[a, 1] - face_xy[b, 1]), 0.0) for a, b in INNER_PAIRS])


def _lip_moves(face_xy: np.ndarray | None) -> dict[str, dict[int, tuple]]:
    """mouthFrown and mouthShrugLower fitted to the portrait's mouth (``None``: a generic
    closed, resting mouth, for the channel list).

    mouthFrown: the corners come down by the smile the portrait has at rest, then
    ``FROWN_DROP`` below a resting mouth (a fixed drop left a grinning portrait grinning
    when sad); undoing a smile also narrows the mouth a little. Every lip point comes down
    by the corners' drop times |t|^``FROWN_BEND`` (t its place across the mouth, 0 in the
    middle, 1 at a corner): the lips bend as one smooth arch, upper and lower alike at each
    column, so the gap between them (the teeth) keeps its height, and the middle of the
    mouth stays where it was: the corners are pulled down, the lips do not sink. (Fixed
    shares per point, the inner lip's 0.3 where the outer took 0.12, bent a grin's lips
    into an M over its teeth.) A portrait parted at rest has its upper lip lifted off the
    teeth by the smile: its inner edge comes back down over them by ``FROWN_COVER`` of the
    gap, its top edge staying (the lip fills out; moving both lowered the whole lip)."""
    if face_xy is None:
        face_xy = np.zeros((68, 2), np.float32)
        face_xy[48:68, 0] = np.linspace(-0.5, 0.5, 20)
    smile = rest_smile(face_xy)
    drop = FROWN_DROP + smile
    narrow = 0.02 - 0.3 * smile
    t = _mouth_span(face_xy)
    gaps = _inner_gaps(face_xy)
    sides: dict[str, dict[int, list[float]]] = {"Left": {}, "Right": {}}

    def add(k: int, d: tuple[float, float, float]) -> None:
        """A move for point k, on its side's channel (halved over both in the middle)."""
        share = ({"Left": 1.0} if t[k] > 0.05 else {"Right": 1.0} if t[k] < -0.05
                 else {"Left": 0.5, "Right": 0.5})
        for side, f in share.items():
            v = sides[side].setdefault(k, [0.0, 0.0, 0.0])
            for i in range(3):
                v[i] += f * d[i]

    for k in range(48, 68):
        w = abs(t[k]) ** FROWN_BEND
        add(k, (narrow * t[k] * abs(t[k]), -w * drop, 0.0))
    cover = FROWN_COVER * min(1.0, smile / 0.1)
    for (up, _), g in zip(INNER_PAIRS, gaps):
        add(up, (0.0, -cover * g * (1.0 - t[up] * t[up]), 0.0))
    out = {}
    for side, table in sides.items():
        out[f"mouthFrown{side}"] = {k: tuple(v) for k, v in table.items()}
    # the cheeks beside the corners come down a little with them
    out["mouthFrownLeft"].update({11: (0.0, -0.1 * drop, 0.0), 12: (0.0, -0.12 * drop, 0.0)})
    out["mouthFrownRight"].update({5: (0.0, -0.1 * drop, 0.0), 4: (0.0, -0.12 * drop, 0.0)})
    # chin raiser (pout): the lower lip pushed up, most in the middle. Lips that touch at
    # rest rise as one (a closed mouth's lower lip was pushed through the upper one: a
    # zigzag lip line); over a gap the lower lip's inner edge takes at most SHRUG_GAP of it
    shrug = {**{k: [0.0, 0.05, 0.02] for k in _LOWER_LIP},
             56: [0.0, 0.07, 0.025], 57: [0.0, 0.075, 0.03], 58: [0.0, 0.07, 0.025],
             7: [0.0, 0.012, 0.0], 8: [0.0, 0.018, 0.01], 9: [0.0, 0.012, 0.0]}
    for (up, lo), g, outer, want in zip(INNER_PAIRS, gaps, (50, 51, 52), (0.065, 0.07, 0.065)):
        both = want * float(np.clip(1.0 - g / SHRUG_TOUCH, 0.0, 1.0))  # lips that touch
        shrug[lo] = [0.0, both + min(want - both, SHRUG_GAP * g), 0.02]
        if both > 0:
            shrug[up] = [0.0, both, 0.02]
            shrug[outer] = [0.0, both, 0.01]
    out["mouthShrugLower"] = {k: tuple(v) for k, v in shrug.items()}
    return out


def _seal_moves(face_xy: np.ndarray) -> np.ndarray:
    """The move (68, 3) that closes a portrait's parted lips: each inner lip column meets
    ``LIP_MEET`` of its rest gap down from the upper lip (``SEAL_WARP`` of the way: the
    renderer draws the rest), the lower lip's outer edge following by ``SEAL_OUTER``; the
    upper lip's top edge stays (the lips as a whole do not sink, see ``FROWN_BEND``); zero
    where the lips meet at rest."""
    out = np.zeros((68, 3), np.float32)
    for (up, lo), outer, g in zip(INNER_PAIRS, (58, 57, 56), _inner_gaps(face_xy)):
        out[up, 1] = -SEAL_WARP * LIP_MEET * g
        out[lo, 1] = SEAL_WARP * (1.0 - LIP_MEET) * g
        out[outer, 1] = SEAL_OUTER * out[lo, 1]
    return out


def smoothstep(t: Any) -> Any:
    """0 below 0, 1 above 1, smooth (zero slope at both ends) between."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


#: eyeWide: how far a weight of 1 lifts the upper lid, in the eye's own openings. A warp
#: can only stretch the eye to open it (the iris and the lash line with it): 0.42 at a
#: linear weight smeared the lashes into a band and the iris upwards at 1. The weight is
#: eased (1 - (1 - w)²): most of the lift by the default 0.6, little more beyond
EYE_WIDE = 0.28
_EYE_WIDE = [INDEX["eyeWideLeft"], INDEX["eyeWideRight"]]
_FROWN = (INDEX["mouthFrownLeft"], INDEX["mouthFrownRight"])


def _eased(w: Any) -> Any:
    """eyeWide's easing (see ``EYE_WIDE``): the lid's lift and the band's gate share it."""
    return 1.0 - (1.0 - w) ** 2
#: the band points: a control point LASH_BAND (IOD) above each upper-lid landmark and its
#: outer corner, carried with the lid, so the lash band (lashes, liner, the lid's margin:
#: ~0.07 IOD of the photo) moves as one piece; and one BROW_BAND below each brow landmark,
#: carried with the brow, so the brow stays a line. The skin between them (crease to brow)
#: takes the stretch of the lifted lid and brows: the smooth warp had spread the brows'
#: lift over the lash band (1.5-1.7× as thick at surprised 1.0, 1.37× at a full brow raise
#: without eyeWide), and with the lid's points alone over the brow's lower half (1.3-1.7×).
#: Only while eyeWide is on or the brows are raised past BROW_FLOOR (other frames keep
#: their flow byte for byte); fully carried from an eased eyeWide of LASH_GATE or a raise
#: of BROW_FLOOR + BROW_GATE, blended in below that from where the warp without them puts
#: them (no jump when surprise or a brow raise sets in)
LASH_BAND = 0.1
LASH_LIDS = [36] + R_EYE_UP + L_EYE_UP + [45]
BROW_BAND = 0.07
BROW_LINE = list(range(17, 27))
LASH_GATE = 0.15
#: brow raises (browInnerUp, browOuterUp*: the largest weight) carry the band points from
#: past BROW_FLOOR (happy's 0.05 hint stretches nothing: its frames keep their flow), fully
#: from BROW_FLOOR + BROW_GATE; a ramp that long keeps a raise setting in over a closed lid
#: smooth (0.1: 11 levels in a 0.005 step, 4 without the points), so speech's emphasis
#: raise (peaking at ~0.175) blends them in part way
BROW_FLOOR = 0.06
BROW_GATE = 0.2
_BROW_UP = [INDEX["browInnerUp"], INDEX["browOuterUpLeft"], INDEX["browOuterUpRight"]]


def _eyelid_moves(gap_l: float, gap_r: float) -> dict[str, dict[int, tuple]]:
    """Eyelid channels scaled by each eye's opening (inter-ocular units)."""
    out: dict[str, dict[int, tuple]] = {}
    for side, gap, up, lo, brow in (("Left", gap_l, L_EYE_UP, L_EYE_LO, (22, 23, 24, 25, 26)),
                                    ("Right", gap_r, R_EYE_UP, R_EYE_LO, (21, 20, 19, 18, 17))):
        g = max(gap, 0.05)
        out[f"eyeBlink{side}"] = {**{k: (0.0, -BLINK_WARP * g, 0.0) for k in up},
                                  **{k: (0.0, 0.08 * g, 0.0) for k in lo}}
        # eyes wide (surprise): the upper lid up, the brow over it lifted with it (the
        # weight eased, see FaceRig.shape: the lid can only go so far)
        out[f"eyeWide{side}"] = {**{k: (0.0, EYE_WIDE * g, 0.0) for k in up},
                                 **{k: (0.0, 0.06, 0.0) for k in brow}}
        out[f"eyeSquint{side}"] = {**{k: (0.0, 0.25 * g, 0.0) for k in lo},
                                   **{k: (0.0, -0.1 * g, 0.0) for k in up}}
        out[f"eyeLookDown{side}"] = {k: (0.0, -0.15 * g, 0.0) for k in up}
        out[f"eyeLookUp{side}"] = {k: (0.0, 0.1 * g, 0.0) for k in up}
    return out


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """R = Rz(roll) · Rx(pitch) · Ry(yaw), y up, z towards the viewer (float32 3×3)."""
    cy, sy = np.cos(yaw), np.sin(yaw)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cr, sr = np.cos(roll), np.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return (rz @ rx @ ry).astype(np.float32)


@dataclass
class FaceRig:
    """A rig fitted to one portrait's landmarks. Points are in image pixels, y down."""

    landmarks: np.ndarray   # (68, 2) detected
    iod: float              # inter-ocular distance, pixels (between eye centres)
    origin: np.ndarray      # (2,) eye midpoint, pixels
    axes: np.ndarray        # (2, 2): rows = face x (image-right-ish), face y (UP) in image px/unit
    rest: np.ndarray        # (P, 3) all moving points, face frame (IOD units, y up), from origin
    follow: np.ndarray      # (P,) 1 for face/skull points, NECK_FOLLOW for the neck
    basis: np.ndarray       # (52, 68*3) blendshape displacements, face frame
    eye_gap: tuple[float, float]  # (left, right) eye openings, IOD units
    n_extra: int
    #: (68, 3) the move that closes the portrait's parted lips (``lip_seal``), face frame
    seal_moves: np.ndarray

    @property
    def rest_px(self) -> np.ndarray:
        """Rest positions of all moving points in image pixels (P, 2)."""
        return self.to_image(self.rest[:, :2])

    def to_image(self, xy: np.ndarray) -> np.ndarray:
        return (self.origin[None, :] + self.iod * (xy @ self.axes)).astype(np.float32)

    @property
    def band_rest_px(self) -> np.ndarray:
        """Rest positions of the band points (``band_points``), image pixels (16, 2)."""
        return self.to_image(self.band_points(self.rest)[:, :2])

    @staticmethod
    def band_points(pts: np.ndarray) -> np.ndarray:
        """The band points (16, 3) for face-frame points: LASH_BAND above the upper
        lids' landmarks and BROW_BAND below the brows', each moved as its landmark is."""
        return np.concatenate([pts[LASH_LIDS] + np.array([0.0, LASH_BAND, 0.0], np.float32),
                               pts[BROW_LINE] - np.array([0.0, BROW_BAND, 0.0], np.float32)])

    @staticmethod
    def band_weight(coeffs: np.ndarray) -> float:
        """How far the band points are carried with their landmarks: 0 with eyeWide off and
        the brows under ``BROW_FLOOR`` (no band points at all), 1 from an eased eyeWide of
        ``LASH_GATE`` or a brow raise of ``BROW_FLOOR + BROW_GATE``, smooth between."""
        w = float(np.clip(np.asarray(coeffs[_EYE_WIDE], np.float32), 0.0, 1.0).max())
        up = float(np.asarray(coeffs[_BROW_UP], np.float32).max())
        t = _eased(w) / LASH_GATE if w > 0.0 else 0.0
        if up > BROW_FLOOR:
            t = max(t, (up - BROW_FLOOR) / BROW_GATE)
        if t <= 0.0:
            return 0.0
        t = min(1.0, t)
        return t * t * (3.0 - 2.0 * t)

    def shape(self, coeffs: np.ndarray) -> np.ndarray:
        """Face-frame 3D points (P, 3) for the blendshapes of a 73-vector (no head pose)."""
        w = np.clip(np.asarray(coeffs[:N_BLENDSHAPES], np.float32), 0.0, 1.0)
        if w[_EYE_WIDE].any():
            w = w.copy()
            w[_EYE_WIDE] = _eased(w[_EYE_WIDE])
        pts = self.rest.copy()
        pts[:68] += (w @ self.basis).reshape(68, 3)
        jaw, close = w[INDEX["jawOpen"]], w[INDEX["mouthClose"]]
        if jaw > 0 and close > 0:  # close the lips by a share of the gap the jaw made
            k = min(close, 1.0) * jaw
            lower = self.basis[INDEX["jawOpen"]].reshape(68, 3)
            pts[_LOWER_LIP] -= 0.62 * k * lower[_LOWER_LIP]
            pts[_UPPER_LIP] += 0.3 * k * lower[_LOWER_LIP]
        seal = self.lip_seal(w)
        if seal > 0.0:  # a frown closes a smile's parted lips (LIP_MEET, SEAL_OUTER)
            pts[:68] += seal * self.seal_moves
        # the inner lips meet but do not cross (press, shrug and frown on a closed mouth
        # summed past its gap: a zigzag lip line); a portrait's own crossing is its floor
        up, lo = _INNER_UP, _INNER_LO
        short = np.minimum(self.rest[up, 1] - self.rest[lo, 1], 0.0) - (pts[up, 1] - pts[lo, 1])
        if (short > 0).any():
            half = 0.5 * np.maximum(short, 0.0)
            pts[up, 1] += half
            pts[lo, 1] -= half
        return pts

    def lip_seal(self, coeffs: np.ndarray) -> float:
        """How far a frown has closed the portrait's parted lips (0 .. 1): eased in up to a
        frown of ``FROWN_SEAL``, eased out again as the jaw opens to ``SEAL_JAW``. 0 on a
        portrait whose lips meet at rest (nothing to close) and without a frown (neutral,
        happy and speech alone keep the portrait's own mouth)."""
        shut = self.frown_shut(coeffs)
        if shut <= 0.0:
            return 0.0
        jaw = float(np.clip(coeffs[INDEX["jawOpen"]], 0.0, 1.0))
        return float(shut * (1.0 - smoothstep(jaw / SEAL_JAW)))

    def frown_shut(self, coeffs: np.ndarray) -> float:
        """How closed a frown makes the portrait's parted lips at rest, whatever the jaw
        (0 .. 1; ``lip_seal`` before speech opens them): the rest that speech opens the
        mouth from, so the renderer darkens the mouth from a closed rest, not the photo's."""
        frown = 0.5 * float(coeffs[_FROWN[0]] + coeffs[_FROWN[1]])
        if frown <= 0.0 or not self.seal_moves.any():
            return 0.0
        return float(smoothstep(frown / FROWN_SEAL))

    def project(self, pts: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
        """Apply the head pose of a 73-vector to face-frame points → image pixels (P, 2).
        Points past the rig's own (eyeWide's band points) move wholly with the head."""
        yaw, pitch, roll, tx, ty, tz = (float(coeffs[INDEX[n]]) for n in
                                        ("headYaw", "headPitch", "headRoll", "headTx", "headTy", "headTz"))
        if yaw or pitch or roll or tx or ty or tz:
            pivot = np.asarray(PIVOT, np.float32)
            r = rotation(yaw, pitch, roll)
            moved = (pts - pivot) @ r.T + pivot + np.array([tx, ty, 0.0], np.float32)
            scale = CAMERA_DISTANCE / max(CAMERA_DISTANCE - tz, 1.0)
            moved[:, :2] = (moved[:, :2] - pivot[:2]) * scale + pivot[:2]
            f = self.follow
            if len(pts) > len(f):
                f = np.concatenate([f, np.ones(len(pts) - len(f), np.float32)])
            pts = pts + f[:, None] * (moved - pts)
        return self.to_image(pts[:, :2])

    def targets(self, coeffs: np.ndarray) -> np.ndarray:
        """Image positions (P, 2) of every moving point for one 73-vector."""
        return self.project(self.shape(coeffs), coeffs)

    def frame_targets(self, coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, float]:
        """``targets``; and while eyeWide is on or the brows are raised, the band points'
        image positions (16, 2) and their weight (``band_weight``), else ``None, 0.0``."""
        g = self.band_weight(coeffs)
        pts = self.shape(coeffs)
        if g <= 0.0:
            return self.project(pts, coeffs), None, 0.0
        both = self.project(np.concatenate([pts, self.band_points(pts)]), coeffs)
        return both[:len(pts)], both[len(pts):], g

def fit_rig(landmarks: np.ndarray) -> FaceRig:
    """Fit the rig to 68 detected landmarks (image pixels)."""
    lm = np.asarray(landmarks, np.float32).reshape(68, 2)
    eye_r = lm[36:42].mean(0)  # image left: subject's right eye
    eye_l = lm[42:48].mean(0)
    d = eye_l - eye_r
    iod = float(np.hypot(*d))
    if iod < 4.0:
        from giris.workers.engine import EngineError  # noqa: PLC0415

        raise EngineError("the face is too small to animate", code="bad_image")
    ex = d / iod                       # face x in the image (towards the image's right)
    ey_up = np.array([ex[1], -ex[0]], np.float32)  # face y (up) in image coordinates
    axes = np.stack([ex, ey_up]).astype(np.float32)
    origin = ((eye_r + eye_l) / 2).astype(np.float32)
    # image → face frame: solve xy_img = origin + iod * (u @ axes); axes is orthonormal
    face_xy = ((lm - origin) / iod) @ axes.T
    rest68 = np.concatenate([face_xy, TEMPLATE_Z[:, None]], axis=1)

    # skull arc (rigid with the head) and neck points (follow partly)
    chin_y = float(face_xy[8, 1])
    half_w = float(max(face_xy[16, 0] - face_xy[0, 0], 1.6)) / 2
    skull = []
    for t in np.linspace(0.0, np.pi, 9):
        skull.append((np.cos(t) * (half_w + 0.35), 0.15 + np.sin(t) * 2.0, -0.6))
    neck = [(-0.55, chin_y - 0.6, -0.6), (0.0, chin_y - 0.75, -0.5), (0.55, chin_y - 0.6, -0.6)]
    extra = np.array(skull + neck, np.float32)
    rest = np.concatenate([rest68, extra]).astype(np.float32)
    follow = np.ones(rest.shape[0], np.float32)
    follow[-len(neck):] = NECK_FOLLOW

    gap_r = float(np.mean(face_xy[R_EYE_UP, 1] - face_xy[R_EYE_LO, 1]))
    gap_l = float(np.mean(face_xy[L_EYE_UP, 1] - face_xy[L_EYE_LO, 1]))
    moves = {**CHANNEL_MOVES, **_eyelid_moves(gap_l, gap_r), **_lip_moves(face_xy)}
    basis = np.zeros((N_BLENDSHAPES, 68, 3), np.float32)
    for name, table in moves.items():
        for k, v in table.items():
            basis[INDEX[name], k] += np.asarray(v, np.float32)
    return FaceRig(landmarks=lm, iod=iod, origin=origin, axes=axes, rest=rest, follow=follow,
                   basis=basis.reshape(N_BLENDSHAPES, 68 * 3), eye_gap=(gap_l, gap_r),
                   n_extra=len(extra), seal_moves=_seal_moves(face_xy))


#: the channels the rig moves (others, e.g. eyeLookIn/Out and tongueOut, it ignores)
def rigged_channels() -> list[str]:
    names = set(CHANNEL_MOVES) | set(_eyelid_moves(0.2, 0.2)) | set(_lip_moves(None))
    return [n for n in BLENDSHAPES if n in names]
