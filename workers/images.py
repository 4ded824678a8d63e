"""Portrait images: decoded with PyAV (PNG, JPEG, WebP, BMP..., whatever FFmpeg reads; no
PIL or OpenCV), upright and flat, and a tiny PNG writer.

* Anything undecodable is ``bad_image``; a picture of more than the allowed pixels is
  ``too_large``, refused from its header before anything is decoded (:func:`decode_image`).
* The EXIF orientation of a JPEG (APP1), PNG (``eXIf``) or WebP (``EXIF``) is applied:
  phones store a portrait photo sideways and say so in its EXIF, and FFmpeg hands over the
  stored pixels (a sideways face is no face to the detector). Other formats' (a TIFF's own
  orientation tag, HEIF's rotation) are not.
* A picture FFmpeg cannot decode to its end is ``bad_image`` (:data:`CORRUPT`), not a
  picture with its missing part filled in; a format FFmpeg recognises but cannot decode
  (SVG) is named in the message. A 16-bit CMYK TIFF is converted to RGB here.
* Transparent pixels are laid over white, as an image viewer shows them: a cut-out
  portrait's background is often stored as transparent black.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np

from giris.workers.engine import EngineError

#: largest decoded image (pixels) accepted: a guard against decompression bombs
MAX_PIXELS = 40_000_000
#: what transparent pixels are laid over
BACKDROP = 255


#: FFmpeg's ``max_pixels`` is an ``int`` option
_AV_MAX_PIXELS = 2**31 - 1
#: what a picture FFmpeg cannot decode to the end is
CORRUPT = "the image is truncated or corrupt"
#: what no format FFmpeg knows matches (text, an HTML error page, random bytes) is said to be
#: that, not as PyAV's "[Errno 1094995529] Invalid data found …: '<none>'"
NOT_AN_IMAGE = "not an image in any format FFmpeg reads (send a PNG, JPEG or WebP)"
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


def _jpeg_segments(data: bytes):
    """``(marker, start, length)`` of a JPEG's header segments, up to the first frame header
    (SOF) or the start of the scan; ``start`` is the segment's first byte after its length.
    Stops quietly where the file is not what it should be."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan
            return
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if length < 2:
            return
        yield marker, i + 4, length - 2
        if marker in _JPEG_SOF:
            return
        i += 2 + length


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    for marker, at, _ in _jpeg_segments(data):
        if marker in _JPEG_SOF:
            if at + 5 > len(data):
                return None
            h, w = struct.unpack(">HH", data[at + 1:at + 5])
            return (w, h) if w > 0 and h > 0 else None  # height 0: given later (DNL)
    return None


def _tiff_short(tiff: bytes, tag: int) -> int | None:
    """The value of a SHORT ``tag`` in the first IFD of a TIFF structure (a TIFF file, or
    the EXIF block of a JPEG, PNG or WebP); ``None`` when it is not there or unreadable."""
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return None
    try:
        ifd = struct.unpack(order + "I", tiff[4:8])[0]
        (count,) = struct.unpack(order + "H", tiff[ifd:ifd + 2])
        for k in range(count):
            e = ifd + 2 + 12 * k
            key, kind = struct.unpack(order + "HH", tiff[e:e + 4])
            if key == tag and kind == 3:  # SHORT, in the entry's first two value bytes
                return struct.unpack(order + "H", tiff[e + 8:e + 10])[0]
    except struct.error:
        return None
    return None


def _exif_block(data: bytes) -> bytes:
    """The EXIF (TIFF) block of a JPEG (APP1 ``Exif``), PNG (``eXIf`` chunk) or WebP
    (``EXIF`` chunk, after the pixels); ``b""`` when there is none."""
    if data[:2] == b"\xff\xd8":
        for marker, at, length in _jpeg_segments(data):
            if marker == 0xE1 and data[at:at + 6] == b"Exif\0\0":
                return data[at + 6:at + length]
        return b""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        chunks = _png_chunks(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        chunks = _riff_chunks(data)
    else:
        return b""
    for tag, at, length in chunks:
        if tag in (b"eXIf", b"EXIF"):
            body = data[at:at + length]
            return body[6:] if body[:6] == b"Exif\0\0" else body  # some writers keep it
    return b""


def _png_chunks(data: bytes):
    """``(tag, start, length)`` of a PNG's chunks (CRC not checked: FFmpeg does)."""
    i = 8
    while i + 8 <= len(data):
        length = struct.unpack(">I", data[i:i + 4])[0]
        yield data[i + 4:i + 8], i + 8, length
        i += 12 + length


def _riff_chunks(data: bytes):
    """``(tag, start, length)`` of a WebP's RIFF chunks (padded to even lengths)."""
    i = 12
    while i + 8 <= len(data):
        length = struct.unpack("<I", data[i + 4:i + 8])[0]
        yield data[i:i + 4], i + 8, length
        i += 8 + length + (length & 1)


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8; 1, upright, when there is none or it is unreadable) of a
    JPEG, PNG or WebP: tag 0x0112 of the first IFD of its EXIF block."""
    value = _tiff_short(_exif_block(data), 0x0112)
    return value if value is not None and 1 <= value <= 8 else 1


def upright(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """The picture as it is meant to be seen, from its stored pixels and EXIF orientation
    (2: mirrored, 3: upside down, 4: mirrored upside down, 5: transposed, 6: to be turned a
    quarter clockwise, 7: transposed the other way, 8: a quarter anticlockwise)."""
    turned = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
              5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
              7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}
    f = turned.get(orientation)
    return rgb if f is None else np.ascontiguousarray(f(rgb))


def _flat_rgb(frame, cmyk: bool = False) -> np.ndarray:
    """A decoded picture as RGB ``uint8``, what is transparent in it laid over white;
    ``cmyk``: a 16-bit CMYK TIFF, which FFmpeg hands over raw, labelled RGBA64 (its 8-bit
    CMYK it converts itself), the K read as alpha gave inverted, blue-tinted colours."""
    fmt = frame.format
    if cmyk and fmt.name.startswith("rgba64"):
        return _by_rows(frame.to_ndarray(), _cmyk_to_rgb)
    if not (fmt.has_palette or any(c.is_alpha for c in fmt.components)):
        return frame.to_ndarray(format="rgb24")
    return _by_rows(frame.to_ndarray(format="rgba"), _over_backdrop)


def _by_rows(src: np.ndarray, f) -> np.ndarray:
    """``f`` (rows of ``src`` → RGB ``uint8``) a few rows at a time: a 40 Mpx picture in
    wider arithmetic at once would cost ~0.5 GB more."""
    out = np.empty(src.shape[:2] + (3,), np.uint8)
    step = max(1, (1 << 20) // max(1, src.shape[1]))
    for y in range(0, src.shape[0], step):
        out[y:y + step] = f(src[y:y + step])
    return out


def _over_backdrop(rgba: np.ndarray) -> np.ndarray:
    """RGBA ``uint8`` → RGB, laid over the backdrop."""
    a = rgba[:, :, 3:4].astype(np.uint16)
    return (rgba[:, :, :3] * a + BACKDROP * (255 - a) + 127) // 255


def _cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """16-bit CMYK → RGB ``uint8``: each of R, G, B is (1 − C, M or Y)(1 − K), as FFmpeg
    converts an 8-bit CMYK TIFF."""
    ink = 65535 - cmyk.astype(np.uint32)  # 65535² fits in 32 bits
    return (ink[:, :, :3] * ink[:, :, 3:4] // (65535 * 257)).astype(np.uint8)


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
    # FFmpeg fills in what a cut picture lacks, saying so only in a log line (a JPEG cut in
    # half decoded with its lower half solid green): a cut one is found by its structure
    if (data[:6] in (b"GIF87a", b"GIF89a") and not _gif_complete(data)
            or data[:2] == b"\xff\xd8" and not _jpeg_complete(data)):
        raise EngineError(f"cannot decode the avatar image: {CORRUPT}", code="bad_image")
    opened = False
    try:
        import av  # noqa: PLC0415

        with av.open(io.BytesIO(data), mode="r", options=limit) as container:
            opened = True
            if not container.streams.video:
                raise EngineError("the avatar has no image in it", code="bad_image")
            stream = container.streams.video[0]
            cc = stream.codec_context
            if cc is None:  # FFmpeg knows the format (SVG...) but has no decoder for it
                kind = container.format.name.removesuffix("_pipe").upper()
                raise EngineError(f"cannot decode the avatar image: {kind} is not supported; "
                                  "send a PNG, JPEG or WebP", code="bad_image")
            if cc.width * cc.height > max_pixels:
                raise _too_large(cc.width, cc.height, max_pixels)
            cc.options = dict(cc.options, **limit)
            for frame in container.decode(stream):
                if frame.width * frame.height > max_pixels:
                    raise _too_large(frame.width, frame.height, max_pixels)
                cmyk = _tiff_short(data, 262) == 5  # a TIFF's photometric: separated (CMYK)
                rgb = upright(_flat_rgb(frame, cmyk), exif_orientation(data))
                return np.ascontiguousarray(rgb, dtype=np.uint8)
    except EngineError:
        raise
    except Exception as exc:  # av.error.*, ValueError...: corrupt or unsupported
        # FFmpeg's own words, without PyAV's "[Errno 1094995529] …: '<none>'" around them
        said = getattr(exc, "strerror", None) or str(exc)
        hint = f": {said}"
        if type(exc).__name__ == "InvalidDataError":
            hint = f": {CORRUPT}" if opened else f": {NOT_AN_IMAGE}"  # the header read, not the rest
        elif size is None and type(exc).__name__ == "ArgumentError":  # FFmpeg's EINVAL
            hint = f" (more than the {max_pixels} pixels allowed?): {said}"
        raise EngineError(f"cannot decode the avatar image{hint}", code="bad_image") from exc
    raise EngineError("cannot decode the avatar image: no frame", code="bad_image")


def _jpeg_complete(data: bytes) -> bool:
    """Whether a JPEG's last scan ends with its end-of-image marker. Scan data stuffs every
    0xFF byte, so no marker can hide in it: a file cut mid-scan has no EOI after its last
    start-of-scan (data a camera appends after the EOI does not matter). FFmpeg's strict
    mode (``err_detect=explode``) refused the cut ones too, and would refuse real photos
    for a warning of no consequence (an APP segment it cannot read)."""
    sos = data.rfind(b"\xff\xda")
    return sos > 0 and data.find(b"\xff\xd9", sos) > 0


def _gif_complete(data: bytes) -> bool:
    """Whether a GIF's blocks run whole up to its trailer: FFmpeg decodes a cut one, the
    rest of the picture left blank, with nothing but a log line ("LZW decode failed")."""
    if len(data) < 13:
        return False
    i = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # global colour table
    while i < len(data):
        kind = data[i]
        if kind == 0x3B:  # trailer
            return True
        if kind == 0x21:  # extension: label, then sub-blocks
            i += 2
        elif kind == 0x2C:  # image: descriptor, local colour table, LZW code size, sub-blocks
            if i + 10 > len(data):
                return False
            flags = data[i + 9]
            i += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1
        else:
            return False
        while i < len(data) and data[i]:  # sub-blocks, up to an empty one
            i += 1 + data[i]
        i += 1
    return False


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Gray, RGBA or RGB array → contiguous RGB ``uint8``; ``bad_image`` otherwise."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise EngineError(f"the avatar must be an RGB image, not shape {a.shape}", code="bad_image")
    if a.shape[2] == 4 and a.dtype == np.uint8:
        a = _by_rows(a, _over_backdrop)  # as when decoded
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
