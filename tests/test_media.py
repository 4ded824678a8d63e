"""MP4 writer (H.264 + AAC, constant frame rate, matched lengths) and the coefficient CSV."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

from giris.runtime.media import Mp4Writer, partial_path, write_coefficients

AAC_FRAME = 1024


def tone(seconds: float, sr: int, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (0.3 * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def flat(h: int, w: int, level: int) -> np.ndarray:
    return np.full((h, w, 3), level, np.uint8)


@dataclass
class Probe:
    vcodec: str
    acodec: str
    pix_fmt: str
    width: int
    height: int
    fps: float
    frames: int
    video_s: float
    audio_s: float          # from the container (what players show)
    audio_decoded: int      # samples the decoder returns (AAC pads the last frame)
    audio_rate: int
    levels: list[float]     # mean luma-ish level of each decoded frame
    rms_first_half_s: float


def probe(path: Path) -> Probe:
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        info = dict(vcodec=v.codec_context.name, acodec=a.codec_context.name,
                    pix_fmt=v.codec_context.pix_fmt, width=v.codec_context.width,
                    height=v.codec_context.height, fps=float(v.average_rate),
                    video_s=float(v.duration * v.time_base), audio_s=float(a.duration * a.time_base),
                    audio_rate=a.codec_context.sample_rate)
        levels = [float(f.to_ndarray(format="rgb24").mean()) for f in c.decode(v)]
    with av.open(str(path)) as c:
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    half = pcm[: info["audio_rate"] // 2]
    return Probe(frames=len(levels), levels=levels, audio_decoded=pcm.size,
                 rms_first_half_s=float(np.sqrt(np.mean(half.astype(np.float64) ** 2))), **info)


def check_lengths(p: Probe, fps: float, frames: int) -> None:
    assert p.frames == frames
    assert p.video_s == pytest.approx(frames / fps, abs=1e-6)
    assert abs(p.audio_s - p.video_s) <= 1 / fps
    # the decoder also returns the encoder's padding of the last AAC frame
    assert 0 <= p.audio_decoded - round(p.video_s * p.audio_rate) < AAC_FRAME + 64


def test_two_seconds_tone_and_50_frames(tmp_path: Path) -> None:
    out = tmp_path / "a.mp4"
    sr, fps = 22050, 25
    pcm = tone(2.0, sr)
    w = Mp4Writer(out, fps=fps, width=64, height=64, sample_rate=sr)
    for i in range(50):  # interleaved like a live session: audio leads in chunks
        if i % 10 == 0:
            a, b = i * sr // fps, (i + 10) * sr // fps
            w.add_audio(pcm[a:b], a)
        w.add_frame(flat(64, 64, 4 * i), i)
    w.close()
    p = probe(out)
    assert (p.vcodec, p.acodec, p.pix_fmt) == ("h264", "aac", "yuv420p")
    assert (p.width, p.height, p.fps, p.audio_rate) == (64, 64, 25.0, sr)
    check_lengths(p, fps, 50)
    assert p.rms_first_half_s > 0.15  # the tone (0.3 peak → 0.21 rms), not silence
    assert p.levels[49] == pytest.approx(196, abs=3)


def test_missing_frames_repeat_and_audio_gaps_are_silence(tmp_path: Path) -> None:
    out = tmp_path / "gaps.mp4"
    sr, fps = 16000, 25
    with Mp4Writer(out, fps=fps, width=32, height=32, sample_rate=sr) as w:
        w.add_audio(tone(0.2, sr), 0)
        w.add_audio(tone(0.3, sr), int(0.7 * sr))  # 0.2 .. 0.7 s silent
        w.add_frame(flat(32, 32, 200), 2)           # 0, 1 missing: the first frame stands in
        w.add_frame(flat(32, 32, 50), 5)            # 3, 4 repeat frame 2
        w.add_frame(flat(32, 32, 50), 5)            # duplicate: ignored
    p = probe(out)
    check_lengths(p, fps, 25)                        # 1.0 s of audio → 25 frames
    assert [round(x / 10) for x in p.levels[:6]] == [20, 20, 20, 20, 20, 5]
    assert all(abs(x - 50) < 3 for x in p.levels[6:])  # the last frame pads to the end
    with av.open(str(out)) as c:
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    assert np.abs(pcm[int(0.3 * sr):int(0.6 * sr)]).max() < 0.01  # fltp: the gap is silent


def test_video_longer_than_audio_is_trimmed(tmp_path: Path) -> None:
    out = tmp_path / "trim.mp4"
    sr, fps = 24000, 25
    with Mp4Writer(out, fps=fps, width=48, height=48, sample_rate=sr) as w:
        for i in range(40):  # frames first, then the audio
            w.add_frame(flat(48, 48, i * 5), i)
        w.add_audio(tone(1.01, sr), 0)  # → ceil(25.25) = 26 frames
    p = probe(out)
    check_lengths(p, fps, 26)
    assert p.levels[-1] == pytest.approx(125, abs=3)


def test_odd_size_unusual_rate_and_ntsc_fps(tmp_path: Path) -> None:
    out = tmp_path / "odd.mp4"
    sr, fps = 22000, 29.97  # 22 kHz is not an AAC rate: resampled
    pcm = tone(1.0, sr)
    with Mp4Writer(out, fps=fps, width=65, height=51, sample_rate=sr) as w:
        w.add_audio(pcm, 0)
        for i in range(30):
            w.add_frame(flat(51, 65, 100), i)
    p = probe(out)
    assert (p.width, p.height) == (66, 52)
    assert p.audio_rate in (44100, 48000)
    assert p.fps == pytest.approx(30000 / 1001)
    frames = math.ceil(1.0 * 30000 / 1001)
    check_lengths(p, 30000 / 1001, frames)


@pytest.mark.parametrize("sr, fps", [(22050, 25), (22050, 30), (22050, 24), (16000, 29.97),
                                     (22000, 25)])  # 22 kHz: resampled to 48 kHz
def test_a_sound_and_its_frame_play_together(tmp_path: Path, sr: int, fps: float) -> None:
    """A burst of sound and a white frame written for the same instant are presented at
    that instant by FFmpeg's demuxer and decoders (ffplay's, mpv's, Chrome's): the AAC
    encoder's 1024 samples of priming are signalled (the audio track's edit list, which
    the demuxer turns into samples to skip), not played as a 46 ms delay."""
    out = tmp_path / "sync.mp4"
    k0 = 13                                   # the flash's frame
    rate = 30000 / 1001 if fps == 29.97 else fps
    onset = round(k0 * sr / rate)             # its first sample: the same instant
    pcm = np.zeros(2 * sr, np.int16)
    n = sr // 50                              # 20 ms of 1 kHz
    pcm[onset:onset + n] = (0.6 * 32767 * np.sin(2 * np.pi * 1000 * np.arange(n) / sr)).astype(np.int16)
    with Mp4Writer(out, fps=fps, width=32, height=32, sample_rate=sr) as w:
        for i in range(0, pcm.size, 1500):    # chunked as a session streams it
            w.add_audio(pcm[i:i + 1500], i)
        for i in range(40):
            w.add_frame(flat(32, 32, 255 if i == k0 else 0), i)
    with av.open(str(out)) as c:
        first = next(p for p in c.demux(audio=0) if p.pts is not None)
        frames = list(c.decode(audio=0))
    assert first.pts == -AAC_FRAME            # the priming, before the presentation's start
    assert frames[0].pts == 0                 # … and skipped: the first sample heard is at 0
    x = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    heard = int(np.argmax(np.abs(x) > 0.05)) / frames[0].sample_rate
    with av.open(str(out)) as c:
        shown = next(float(f.pts * f.time_base) for f in c.decode(video=0)
                     if f.to_ndarray(format="rgb24").mean() > 128)
    assert shown == pytest.approx(k0 / rate, abs=1e-6)
    assert abs(heard - shown) < 0.001, f"audio {1000 * (heard - shown):+.1f} ms off its frame"


def test_video_only_gets_silence(tmp_path: Path) -> None:
    out = tmp_path / "silent.mp4"
    with Mp4Writer(out, fps=25, width=32, height=32, sample_rate=22050) as w:
        for i in range(10):
            w.add_frame(flat(32, 32, 10), i)
    p = probe(out)
    check_lengths(p, 25, 10)
    assert p.rms_first_half_s < 1e-3


def test_mis_sized_frames_are_scaled(tmp_path: Path) -> None:
    out = tmp_path / "scaled.mp4"
    with Mp4Writer(out, fps=25, width=64, height=64, sample_rate=16000) as w:
        w.add_audio(tone(0.2, 16000), 0)
        w.add_frame(flat(32, 48, 80), 0)
        w.add_frame(flat(64, 64, 160), 1)
    p = probe(out)
    assert (p.width, p.height) == (64, 64)
    check_lengths(p, 25, 5)
    assert p.levels[0] == pytest.approx(80, abs=3) and p.levels[-1] == pytest.approx(160, abs=3)


def test_bad_input(tmp_path: Path) -> None:
    w = Mp4Writer(tmp_path / "x.mp4", fps=25, width=32, height=32, sample_rate=22050)
    with pytest.raises(ValueError):
        w.add_frame(np.zeros((32, 32), np.uint8), 0)
    with pytest.raises(ValueError):
        w.add_audio(np.zeros(10, np.float32), 0)
    w.close()
    with pytest.raises(ValueError):
        w.add_frame(flat(32, 32, 0), 0)


# ---------------------------------------------------------------------- coefficients
def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_coefficients_from_array(tmp_path: Path) -> None:
    out = tmp_path / "c.csv"
    values = np.arange(12, dtype=np.float32).reshape(4, 3) / 4
    assert write_coefficients(out, ["jawOpen", "mouthSmile_L", "headYaw"], values, fps=25) == 4
    rows = read_csv(out)
    assert rows[0] == ["frame", "pts", "jawOpen", "mouthSmile_L", "headYaw"]
    assert rows[2] == ["1", "0.040000", "0.75", "1", "1.25"]
    assert len(rows) == 5


@dataclass
class Chunk:  # the shape of giris.runtime.client.Coefficients
    values: np.ndarray
    first_frame: int
    fps: float
    names: tuple[str, ...] = ("a", "b")


def test_coefficients_from_chunks(tmp_path: Path) -> None:
    out = tmp_path / "c.csv"
    chunks = [Chunk(np.ones((2, 2), np.float32), 2, 25.0), Chunk(np.zeros((2, 2), np.float32), 0, 25.0)]
    assert write_coefficients(out, chunks) == 4
    rows = read_csv(out)
    assert rows[0] == ["frame", "pts", "a", "b"]
    assert [r[0] for r in rows[1:]] == ["0", "1", "2", "3"]
    assert rows[3] == ["2", "0.080000", "1", "1"]


def test_a_temporary_name_fits_where_its_target_does(tmp_path: Path) -> None:
    """The hidden name a file is written under until it is whole is shortened to the
    file system's limit (a 255-byte output name failed after all the work)."""
    import os

    for target in (tmp_path / "take.mp4", tmp_path / ("é" * 125 + "a.csv")):  # 255 bytes
        p = partial_path(target)
        assert p.parent == tmp_path and p.suffix == target.suffix and p.name.startswith(f".{target.name[:1]}")
        assert str(os.getpid()) in p.name and len(os.fsencode(p.name)) <= 255
        p.write_bytes(b"x")
    assert partial_path(tmp_path / "take.mp4").name == f".take.{os.getpid()}.partial.mp4"
