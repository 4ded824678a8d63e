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
* Images are decoded with PyAV (PNG, JPEG, WebP, BMP..., whatever FFmpeg reads); no PIL or
  OpenCV. Anything undecodable is ``bad_image``; a picture of more than the allowed pixels
  is ``too_large``, refused from its header before anything is decoded (:func:`decode_image`).
"""
from __future__ import annotations

import importlib.util
import io
import os
import struct
import threading
import zlib
from functools import lru_cache

import numpy as np

from giris.workers.engine import EngineError

#: minimum detector score for a face to count as solid (dlib's threshold is 0)
SOLID_SCORE = 0.5
#: a second separate face at least this fraction of the largest's area makes it ambiguous
SIMILAR_AREA = 0.5
#: smallest image side accepted for landmark fitting
MIN_SIDE = 64
#: largest decoded image (pixels) accepted: a guard against decompression bombs
MAX_PIXELS = 40_000_000
#: faces are detected on an image no larger than this (side); landmarks use full resolution
DETECT_SIDE = 800

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


# ----------------------------------------------------------------------------- decoding
#: FFmpeg's ``max_pixels`` is an ``int`` option
_AV_MAX_PIXELS = 2**31 - 1
#: JPEG start-of-frame markers (SOF0-SOF15 less DHT, JPG and DAC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def image_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` read from the header of a PNG, JPEG, WebP, GIF or BMP, without
    decoding anything; ``None`` for another format or a header that does not say."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
        elif data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            tag = data[12:16]
            if tag == b"VP8X":
                w = 1 + int.from_bytes(data[24:27], "little")
                h = 1 + int.from_bytes(data[27:30], "little")
            elif tag == b"VP8L" and data[20] == 0x2F:
                bits = int.from_bytes(data[21:25], "little")
                w, h = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
            elif tag == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
                w, h = (v & 0x3FFF for v in struct.unpack("<HH", data[26:30]))
            else:
                return None
        elif data[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", data[6:10])
        elif data[:2] == b"BM":
            if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER
                w, h = struct.unpack("<HH", data[18:22])
            else:
                w, h = (abs(v) for v in struct.unpack("<ii", data[18:26]))
        else:
            return None
    except (struct.error, IndexError):  # a header cut short: FFmpeg says what is wrong
        return None
    return (w, h) if w > 0 and h > 0 else None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before
            return None
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return (w, h) if w > 0 and h > 0 else None  # height 0: given later (DNL)
        if length < 2:
            return None
        i += 2 + length
    return None


def _too_large(w: int, h: int, max_pixels: int) -> EngineError:
    return EngineError(f"the avatar has {w}x{h} pixels, more than the {max_pixels} allowed",
                       code="too_large", limit=max_pixels)


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) → RGB ``uint8`` (H, W, 3); ``bad_image`` if not,
    ``too_large`` past ``max_pixels``.

    A picture past ``max_pixels`` is never decoded (a 1 MB PNG can hold 16000x16000 pixels,
    1 GB once decoded): its size is read from its header first (:func:`image_size`), and
    FFmpeg is told about the limit too (``max_pixels``, for its probe, which decodes the
    first picture, and for the decoder), so it refuses the formats the header reader does
    not know before allocating a picture much past it."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes) or len(data) < 8:
        raise EngineError("the avatar is not an encoded image", code="bad_image")
    size = image_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise _too_large(*size, max_pixels)
    # FFmpeg checks its limit against the picture's width rounded up for alignment (to 64
    # at most): twice the limit refuses no picture of our MIN_SIDE or more that is within
    # ours, and still nothing near a bomb's size
    limit = {"max_pixels": str(min(max(2 * int(max_pixels), 0), _AV_MAX_PIXELS))}
    try:
        import av  # noqa: PLC0415

        with av.open(io.BytesIO(data), mode="r", options=limit) as container:
            if not container.streams.video:
                raise EngineError("the avatar has no image in it", code="bad_image")
            stream = container.streams.video[0]
            cc = stream.codec_context
            if cc.width * cc.height > max_pixels:
                raise _too_large(cc.width, cc.height, max_pixels)
            cc.options = dict(cc.options, **limit)
            for frame in container.decode(stream):
                if frame.width * frame.height > max_pixels:
                    raise _too_large(frame.width, frame.height, max_pixels)
                rgb = frame.to_ndarray(format="rgb24")
                return np.ascontiguousarray(rgb, dtype=np.uint8)
    except EngineError:
        raise
    except Exception as exc:  # av.error.*, ValueError...: corrupt or unsupported
        hint = ""
        if size is None and type(exc).__name__ == "ArgumentError":  # FFmpeg's EINVAL
            hint = f" (more than the {max_pixels} pixels allowed?)"
        raise EngineError(f"cannot decode the avatar image{hint}: {exc}", code="bad_image") from exc
    raise EngineError("cannot decode the avatar image: no frame", code="bad_image")


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Gray, RGBA or RGB array → contiguous RGB ``uint8``; ``bad_image`` otherwise."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise EngineError(f"the avatar must be an RGB image, not shape {a.shape}", code="bad_image")
    a = a[:, :, :3]
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
            a = a * 255.0
        a = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def encode_png(rgb: np.ndarray) -> bytes:
    """RGB ``uint8`` (H, W, 3) → PNG bytes (zlib only: for stills, tests and tools)."""
    a = as_rgb(rgb)
    h, w, _ = a.shape
    raw = np.zeros((h, w * 3 + 1), np.uint8)  # filter byte 0 on each row
    raw[:, 1:] = a.reshape(h, w * 3)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + tag + body
                + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------- detection
def _box(rect) -> tuple[float, float, float, float]:
    return float(rect.left()), float(rect.top()), float(rect.right()), float(rect.bottom())


def _overlap(a, b) -> float:
    """Intersection over the smaller box's area."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / small if small > 0 else 0.0


def detect_faces(rgb: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
    """All detections ``[((left, top, right, bottom), score)]`` in ``rgb`` pixel coordinates."""
    dlib, detector, _ = _models()
    h, w = rgb.shape[:2]
    scale = 1.0
    img = rgb
    if max(h, w) > DETECT_SIDE:  # detect on a smaller copy (nearest: it is only for boxes)
        scale = DETECT_SIDE / max(h, w)
        ys = np.minimum((np.arange(int(h * scale)) / scale).astype(np.int64), h - 1)
        xs = np.minimum((np.arange(int(w * scale)) / scale).astype(np.int64), w - 1)
        img = np.ascontiguousarray(rgb[ys][:, xs])
    # upsample once for small images so faces down to ~40 px are found
    upsample = 1 if max(img.shape[:2]) <= 640 else 0
    with _lock:  # dlib objects are not documented as thread-safe
        rects, scores, _ = detector.run(img, upsample, 0.0)
    return [(tuple(v / scale for v in _box(r)), float(s)) for r, s in zip(rects, scores)]


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
