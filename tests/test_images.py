"""Portraits as users bring them: phone photos stored sideways, cut-outs with a
transparent background, a small face in a large photo."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest

from giris.workers import images as IM
from giris.workers import landmarks as LM
from giris.workers.engine import EngineError
from giris.workers.render_warp import ASSETS


def still(image: np.ndarray, codec: str, pix: str, source: str = "rgb24", container: str = "image2pipe",
          **options: str) -> bytes:
    """``image`` encoded as one picture by FFmpeg's ``codec`` in ``pix``."""
    import av

    h, w = image.shape[:2]
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as c:
        s = c.add_stream(codec, rate=1)
        s.width, s.height, s.pix_fmt, s.options = w, h, pix, options
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format=source).reformat(format=pix)
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)
    return buf.getvalue()


def jpeg(rgb: np.ndarray) -> bytes:
    return still(rgb, "mjpeg", "yuvj444p", qscale="2")


def with_exif(data: bytes, orientation: int, order: str = ">") -> bytes:
    """``data`` (a JPEG) with an APP1 Exif segment whose first IFD holds the orientation
    (and, first, another tag), as a phone writes it."""
    mark = b"MM" if order == ">" else b"II"
    entries = [struct.pack(order + "HHI", 0x010F, 2, 4) + b"Cam\0",  # Make, ASCII
               struct.pack(order + "HHIH", 0x0112, 3, 1, orientation) + b"\0\0"]
    ifd = struct.pack(order + "H", len(entries)) + b"".join(entries) + struct.pack(order + "I", 0)
    tiff = mark + struct.pack(order + "HI", 42, 8) + ifd
    body = b"Exif\0\0" + tiff
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + data[2:]


def quadrants(h: int = 48, w: int = 64) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (220, 30, 30)
    img[: h // 2, w // 2:] = (30, 220, 30)
    img[h // 2:, : w // 2] = (30, 30, 220)
    img[h // 2:, w // 2:] = (230, 230, 40)
    return img


# what a camera stores for a picture meant to be seen as ``img``, per orientation
STORED = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
          5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.rot90(a, 1),
          7: lambda a: np.swapaxes(a[::-1, ::-1], 0, 1), 8: lambda a: np.rot90(a, -1)}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_jpegs_exif_orientation_is_applied(orientation):
    img = quadrants()
    data = with_exif(jpeg(STORED[orientation](img)), orientation, "<" if orientation % 2 else ">")
    assert IM.exif_orientation(data) == orientation
    got = IM.decode_image(data)
    assert got.shape == img.shape
    assert np.abs(got.astype(int) - img).mean() < 8  # (JPEG)


def test_exif_that_says_nothing_usable_is_upright():
    plain = jpeg(quadrants())
    assert IM.exif_orientation(plain) == 1
    assert IM.exif_orientation(with_exif(plain, 0)) == 1 and IM.exif_orientation(with_exif(plain, 9)) == 1
    cut = with_exif(plain, 6)
    broken = cut[:4] + b"\x00\x10Exif\0\0MM\0*\xff\xff\xff\xff" + plain[2:]  # IFD offset far out
    assert IM.exif_orientation(broken) == 1
    assert IM.exif_orientation(b"\x89PNG\r\n\x1a\n") == 1


def test_a_sideways_phone_portrait_is_animated_upright():
    """A phone stores a portrait as the sensor saw it and says in its EXIF how to turn it:
    read as stored, the face lay on its side and the avatar was refused (no_face)."""
    upright = IM.decode_image((ASSETS / "astronaut.png").read_bytes())
    want = LM.find_face(IM.decode_image(jpeg(upright)))
    for orientation in (6, 8, 3):
        data = with_exif(jpeg(STORED[orientation](upright)), orientation)
        assert np.abs(LM.find_face(IM.decode_image(data)) - want).max() < 3.0


def png_rgba(rgba: np.ndarray) -> bytes:
    return still(rgba, "png", "rgba", "rgba")


def test_transparent_pixels_are_laid_over_white():
    """A cut-out portrait's background is often stored as transparent black: dropping the
    alpha made it a black background."""
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 10:30] = (200, 100, 50, 255)  # opaque
    rgba[0:5, 0:5] = (0, 0, 0, 128)  # half transparent black
    got = IM.decode_image(png_rgba(rgba))
    assert (got[35, 35] == 255).all()  # transparent: white
    assert (got[20, 20] == (200, 100, 50)).all()  # opaque: as it is
    assert (np.abs(got[2, 2].astype(int) - 127) <= 1).all()  # half: between
    assert (IM.as_rgb(rgba)[35, 35] == 255).all()  # an array given as it is: the same


def test_a_small_face_in_a_large_photo_is_found():
    """Detection runs on a copy at most 800 px a side; a face of ~120 px in a 2400 px photo
    is ~40 px there, below what dlib finds without upsampling: it was no_face."""
    face = IM.decode_image((ASSETS / "astronaut.png").read_bytes())
    want = LM.find_face(face)
    photo = np.full((1600, 2400, 3), 128, np.uint8)
    photo[900:1220, 1500:1820] = face
    got = LM.find_face(photo)
    assert np.abs(got - (want + (1500, 900))).max() < 6.0


def test_a_black_and_white_portrait_speaks_with_a_gray_mouth():
    """The mouth interior was drawn in fixed colours: a dark red mouth and cream teeth in
    an otherwise black-and-white video."""
    from giris.workers.coefficients import INDEX, zeros
    from giris.workers.engine import EngineContext
    from giris.workers.render_warp import WarpRenderEngine

    rgb = IM.decode_image((ASSETS / "astronaut.png").read_bytes())
    gray = np.repeat((rgb.astype(np.float32) @ [0.299, 0.587, 0.114]).astype(np.uint8)[..., None], 3, 2)
    engine = WarpRenderEngine({}, EngineContext(stage="render"))
    row = zeros(1)[0]
    row[INDEX["jawOpen"]] = 1.0

    def spoken(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = engine.open_session({"avatar": IM.encode_png(image), "size": 256})
        still, out = np.zeros((256, 256, 3), np.uint8), np.zeros((256, 256, 3), np.uint8)
        engine.render(s, zeros(1)[0], still)
        engine.render(s, row, out)
        return still, out

    still, out = spoken(gray)
    chroma = out.max(2).astype(int) - out.min(2)
    assert (np.abs(out.astype(int) - still).max(2) > 30).sum() > 200  # the mouth opened
    assert chroma.max() <= 2
    _, coloured = spoken(rgb)  # a colour portrait keeps its red mouth
    moved = np.abs(coloured.astype(int) - spoken(rgb)[0]).max(2) > 30
    assert (coloured[..., 0].astype(int) - coloured[..., 2])[moved].mean() > 15


def gif(rgb: np.ndarray) -> bytes:
    return still(rgb, "gif", "rgb8", container="gif")


def webp(rgb: np.ndarray) -> bytes:
    return still(rgb, "libwebp", "yuv420p")


@pytest.mark.parametrize("encode", [jpeg, IM.encode_png, webp, gif], ids=["jpeg", "png", "webp", "gif"])
def test_a_cut_image_is_refused(encode):
    """FFmpeg decodes the first half of a JPEG or GIF and fills in the rest (a solid green
    or blank lower half, said only in a log line): the avatar was animated like that."""
    data = encode(np.ascontiguousarray(np.broadcast_to(quadrants(96, 128), (96, 128, 3))))
    assert IM.decode_image(data).shape == (96, 128, 3)
    for cut in (len(data) // 2, len(data) * 9 // 10):
        with pytest.raises(EngineError) as e:
            IM.decode_image(data[:cut])
        assert e.value.code == "bad_image" and IM.CORRUPT in str(e.value)


def test_a_format_ffmpeg_cannot_decode_is_named():
    """FFmpeg reads an SVG's header but has no decoder for it: the message was a Python
    internal, "'NoneType' object has no attribute 'width'"."""
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"><circle r="40"/></svg>'
    with pytest.raises(EngineError) as e:
        IM.decode_image(svg)
    assert e.value.code == "bad_image" and "SVG is not supported" in str(e.value)
    assert "NoneType" not in str(e.value)


def tiff_cmyk16(cmyk: np.ndarray) -> bytes:
    """An uncompressed 16-bit CMYK TIFF (as ImageMagick writes one), little-endian."""
    h, w, _ = cmyk.shape
    pixels = np.ascontiguousarray(cmyk, "<u2").tobytes()
    n = 10
    bits_at = 8 + 2 + 12 * n + 4
    data_at = bits_at + 8
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 4, bits_at), (259, 3, 1, 1),
               (262, 3, 1, 5), (273, 4, 1, data_at), (277, 3, 1, 4), (278, 3, 1, h),
               (279, 4, 1, len(pixels)), (284, 3, 1, 1)]
    ifd = struct.pack("<H", n) + b"".join(
        struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 and count == 1
                                                 else struct.pack("<I", value))
        for tag, kind, count, value in entries) + struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<4H", 16, 16, 16, 16) + pixels


def test_a_16_bit_cmyk_tiff_has_its_colours():
    """FFmpeg hands a 16-bit CMYK TIFF over raw, labelled RGBA64: read as RGB + alpha, the
    picture came out inverted and blue-tinted."""
    rgb = quadrants()
    f = rgb.astype(np.float64) / 255
    k = 1 - f.max(2, keepdims=True)
    cmy = (1 - f - k) / np.maximum(1 - k, 1e-9)
    cmyk = np.round(np.concatenate([cmy, k], 2) * 65535).astype(np.uint16)
    got = IM.decode_image(tiff_cmyk16(cmyk))
    assert np.abs(got.astype(int) - rgb).max() <= 1


def png_with_exif(rgb: np.ndarray, orientation: int) -> bytes:
    """A PNG whose ``eXIf`` chunk (after the header) holds an orientation."""
    tiff = with_exif(b"\xff\xd8", orientation)[4 + 6 + 2:]  # the TIFF block alone
    body = b"eXIf" + tiff
    chunk = struct.pack(">I", len(tiff)) + body + struct.pack(">I", zlib.crc32(body))
    data = IM.encode_png(rgb)
    return data[:33] + chunk + data[33:]


def webp_with_exif(rgb: np.ndarray, orientation: int) -> bytes:
    """A WebP (extended: ``VP8X``, its EXIF flag set) with an ``EXIF`` chunk."""
    h, w = rgb.shape[:2]
    simple = webp(rgb)
    tiff = with_exif(b"\xff\xd8", orientation)[4 + 6 + 2:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x08, 0, 0, 0]) + (w - 1).to_bytes(3, "little") \
        + (h - 1).to_bytes(3, "little")
    exif = b"EXIF" + struct.pack("<I", len(tiff)) + tiff + b"\0" * (len(tiff) & 1)
    body = b"WEBP" + vp8x + simple[12:] + exif
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("make", [png_with_exif, webp_with_exif], ids=["png", "webp"])
def test_exif_orientation_outside_jpeg_is_applied(make, orientation):
    """A PNG's ``eXIf`` chunk and a WebP's ``EXIF`` chunk say how to turn the picture as a
    JPEG's APP1 does: only the JPEG's was read."""
    img = quadrants()
    data = make(np.ascontiguousarray(STORED[orientation](img)), orientation)
    assert IM.exif_orientation(data) == orientation
    got = IM.decode_image(data)
    assert got.shape == img.shape and np.abs(got.astype(int) - img).mean() < 8


def test_a_face_of_90_px_in_a_4000_px_photo_is_found():
    """On the 800 px detection copy of a 4000x3000 photo, even upsampled, a face had to be
    ~130 px (jaw to jaw): one of ~90 px was no_face. The photo is then searched at full
    size, in tiles: this face lies across a tile's edge."""
    face = IM.decode_image((ASSETS / "astronaut.png").read_bytes())
    want = LM.find_face(face)  # ~93 px jaw to jaw
    photo = np.full((3000, 4000, 3), 128, np.uint8)
    photo[1880:2200, 1900:2220] = face
    got = LM.find_face(photo)
    assert np.abs(got - (want + (1900, 1880))).max() < 6.0


def test_bytes_that_are_no_image_are_said_to_be_none():
    """Bytes of no known format (a text file, an HTML error page) were refused with PyAV's
    wording: "[Errno 1094995529] Invalid data found when processing input: '<none>'"."""
    for data in (b"this is not an image", b"<html><body>404 Not Found</body></html>"):
        with pytest.raises(EngineError) as e:
            IM.decode_image(data)
        assert e.value.code == "bad_image" and IM.NOT_AN_IMAGE in str(e.value)
        assert "Errno" not in str(e.value) and "<none>" not in str(e.value)
