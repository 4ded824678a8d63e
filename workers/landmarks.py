"""Face detection and 68-point landmarks (dlib), image decoding and a tiny PNG writer.

* The detector (dlib's HOG frontal face detector) and the 68-point shape predictor
  (``shape_predictor_68_face_landmarks.dat`` from the ``face_recognition_models``
  package, loaded by path: that package's ``__init__`` needs ``pkg_resources``) are loaded
  once per process and cached.
* Which face, when there are several (:func:`find_face`): detections scoring below 0 are
  dlib's own rejects and ignored. A detection is *solid* when it scores at least
  ``SOLID_SCORE`` (0.5); weak detections beside a solid one are ignored (patterns on
  clothes and flags produce them: the bundled astronaut has one on her mission patch).
  Among the solid ones (or the single best weak one when none is solid) the largest is
  the face, unless another one that does not overlap it is at least ``SIMILAR_AREA``
  (0.5) of its area: then the portrait is ambiguous and ``many_faces`` is raised. A group
  photo with one person clearly in front (a face more than twice the area of any other)
  animates that person.
* Images are decoded by :mod:`giris.workers.images`.
"""
from __future__ import annotations

import importlib.util
import os
import threading
from functools import lru_cache

import numpy as np

from giris.workers.engine import EngineError
from giris.workers.images import as_rgb

#: minimum detector score for a face to count as solid (dlib's threshold is 0)
SOLID_SCORE = 0.5
#: a second separate face at least this fraction of the largest's area makes it ambiguous
SIMILAR_AREA = 0.5
#: smallest image side accepted for landmark fitting
MIN_SIDE = 64
#: faces are detected on an image no larger than this (side); landmarks use full resolution
DETECT_SIDE = 800
#: where nothing is found there, a larger photo is searched again at this many pixels at
#: most (a 4000x3000 photo at full size: faces of ~60 px, not ~130), in tiles of this side
FINE_PIXELS = 12_000_000
FINE_TILE = 2048

_lock = threading.Lock()


def model_path(name: str = "shape_predictor_68_face_landmarks.dat") -> str:
    """Path of a model file inside the installed ``face_recognition_models`` package."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("face_recognition_models is not installed", code="engine_unavailable")
    for base in spec.submodule_search_locations:
        path = os.path.join(base, "models", name)
        if os.path.exists(path):
            return path
    raise EngineError(f"model file {name} not found in face_recognition_models",
                      code="engine_unavailable")


@lru_cache(maxsize=1)
def _models():
    try:
        import dlib  # noqa: PLC0415 - heavy, loaded on first use
    except ImportError:
        raise EngineError("dlib is not installed (pip install dlib-bin)", code="engine_unavailable") from None
    return dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(model_path())


def load_models() -> None:
    """Load dlib's detector and 68-point model now (~1 s) rather than at the first face."""
    _models()


# ---------------------------------------------------------------------------- detection
def _box(rect) -> tuple[float, float, float, float]:
    return float(rect.left()), float(rect.top()), float(rect.right()), float(rect.bottom())


def _overlap(a, b) -> float:
    """Intersection over the smaller box's area."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / small if small > 0 else 0.0


def _scaled(rgb: np.ndarray, scale: float) -> np.ndarray:
    """``rgb`` resized by ``scale`` (nearest: it is only for boxes)."""
    if scale >= 1.0:
        return rgb
    h, w = rgb.shape[:2]
    ys = np.minimum((np.arange(int(h * scale)) / scale).astype(np.int64), h - 1)
    xs = np.minimum((np.arange(int(w * scale)) / scale).astype(np.int64), w - 1)
    return np.ascontiguousarray(rgb[ys][:, xs])


def _run(img: np.ndarray, upsample: int) -> list[tuple[tuple[float, float, float, float], float]]:
    _, detector, _ = _models()
    with _lock:  # dlib objects are not documented as thread-safe
        rects, scores, _ = detector.run(np.ascontiguousarray(img), upsample, 0.0)
    return [(_box(r), float(s)) for r, s in zip(rects, scores)]


def _found(dets) -> bool:
    return any(s >= 0.0 for _, s in dets)


def detect_faces(rgb: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
    """All detections ``[((left, top, right, bottom), score)]`` in ``rgb`` pixel coordinates.

    dlib's detector finds faces of ~80 px and more (its window), upsampled once of ~40 px.
    First on a copy at most ``DETECT_SIDE`` a side, upsampled at once when it is small,
    else only when nothing is found (~4x the time). A photo larger than the copy where
    that finds nothing is searched again (:func:`_detect_fine`)."""
    h, w = rgb.shape[:2]
    scale = min(1.0, DETECT_SIDE / max(h, w))
    img = _scaled(rgb, scale)
    upsample = 1 if max(img.shape[:2]) <= 640 else 0
    dets = _run(img, upsample)
    if upsample == 0 and not _found(dets):
        dets = _run(img, 1)
    fine = min(1.0, (FINE_PIXELS / (h * w)) ** 0.5)
    if 2 * scale < fine and not _found(dets):  # else the upsampled copy saw finer already
        return _detect_fine(rgb, scale, fine)
    return [(tuple(v / scale for v in box), score) for box, score in dets]


def _detect_fine(rgb: np.ndarray, coarse: float,
                 scale: float) -> list[tuple[tuple[float, float, float, float], float]]:
    """The search for a face too small for the copy (``coarse`` its scale) at ``scale`` (1:
    the photo itself), not upsampled (4x the time), tile by tile: each call into dlib holds
    the detector's lock for a tile, not the whole search (another session's open waits
    less), and dlib's copy and feature pyramid are a tile's. Tiles overlap by 1.5x the
    largest face the copy can miss (~80 px there, upsampled)."""
    img = _scaled(rgb, scale)
    fh, fw = img.shape[:2]
    overlap = min(FINE_TILE // 2, int(np.ceil(1.5 * 80 / (2 * coarse) * scale)))
    step = FINE_TILE - overlap
    dets = []
    for y in range(0, max(1, fh - overlap), step):
        for x in range(0, max(1, fw - overlap), step):
            for box, score in _run(img[y:y + FINE_TILE, x:x + FINE_TILE], 0):
                l, t, r, b = box
                dets.append((((l + x) / scale, (t + y) / scale, (r + x) / scale, (b + y) / scale), score))
    return dets


def choose_face(dets: list[tuple[tuple[float, float, float, float], float]]):
    """Apply the several-faces policy (module docstring); return the chosen box."""
    dets = [d for d in dets if d[1] >= 0.0]
    if not dets:
        raise EngineError("no face found in the avatar image", code="no_face")
    solid = [d for d in dets if d[1] >= SOLID_SCORE] or [max(dets, key=lambda d: d[1])]

    def area(d):
        b = d[0]
        return (b[2] - b[0]) * (b[3] - b[1])

    solid.sort(key=area, reverse=True)
    best = solid[0]
    for other in solid[1:]:
        if _overlap(best[0], other[0]) < 0.3 and area(other) >= SIMILAR_AREA * area(best):
            raise EngineError(
                f"the avatar image shows {len(solid)} faces of similar size; use a portrait of one person",
                code="many_faces", faces=len(solid))
    return best[0]


def find_face(rgb: np.ndarray) -> np.ndarray:
    """The 68 dlib landmarks (float32 (68, 2), x then y, pixels) of the portrait's face.

    Raises :class:`EngineError` ``bad_image`` (too small or degenerate), ``no_face`` or
    ``many_faces`` (several similar faces; see the module docstring).
    """
    rgb = as_rgb(rgb)
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise EngineError(f"the avatar image is too small ({w}x{h}; at least {MIN_SIDE} px a side)",
                          code="bad_image")
    if int(rgb.max()) - int(rgb.min()) < 8:
        raise EngineError("no face found in the avatar image (it is a flat colour)", code="no_face")
    box = choose_face(detect_faces(rgb))
    dlib, _, predictor = _models()
    rect = dlib.rectangle(*(int(round(v)) for v in box))
    with _lock:
        shape = predictor(rgb, rect)
    pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], np.float32)
    return pts
