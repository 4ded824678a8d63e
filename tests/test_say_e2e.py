"""The default engines end to end: Piper → visemes → prosody motion → warp renderer.

What a user sees is checked on the rendered pixels, not on coefficients: the mouth moves
with the voice and rests in pauses, emotions and blinks change the picture, and
``giris say`` writes an MP4 whose audio and video agree.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from giris.runtime import Runtime
from giris.runtime.client import AudioChunk, Frame
from giris.runtime.config import default_config
from giris.runtime.errors import BadInput, GirisError, LimitExceeded

pytestmark = pytest.mark.slow

TEXT = "Hello there, my friend. I am happy to see you. Shall we begin?"


@pytest.fixture(scope="module")
def rt():
    cfg = default_config()
    cfg.limits.max_text_chars = 500
    with Runtime(cfg) as runtime:
        yield runtime


def speak(rt, text: str, **spec):
    s = rt.open_session(size=spec.pop("size", 256), seed=spec.pop("seed", 3), **spec)
    pcm, frames, sr = [], {}, 0
    for item in s.say(text, timeout=120):
        if isinstance(item, AudioChunk):
            pcm.append(item.pcm.copy())
            sr = item.sample_rate
        elif isinstance(item, Frame):
            frames[item.index] = item.image.copy()
            item.release()
    s.close()
    audio = np.concatenate(pcm).astype(np.float32)
    return audio, sr, np.stack([frames[k] for k in sorted(frames)]), sorted(frames)


def regions(image: np.ndarray):
    from giris.workers.landmarks import find_face

    pts = find_face(image)

    def box(idx, pad):
        p = pts[idx]
        x0, y0 = p.min(0) - pad
        x1, y1 = p.max(0) + pad
        return slice(int(max(0, y0)), int(y1) + 1), slice(int(max(0, x0)), int(x1) + 1)

    return box(list(range(48, 68)), 3), box(list(range(36, 48)), 3)


@pytest.fixture(scope="module")
def spoken(rt):
    return speak(rt, TEXT)


def test_frame_count_follows_the_audio_and_indexes_are_whole(spoken):
    audio, sr, frames, idx = spoken
    assert idx == list(range(len(idx)))
    assert len(frames) == math.ceil(len(audio) / sr * 25)
    assert frames.dtype == np.uint8 and frames.shape[1:] == (256, 256, 3)


def mouth_opening(frames: np.ndarray) -> np.ndarray:
    """Inner-lip gap over eye distance, from dlib's landmarks found afresh on each output
    frame: what a viewer sees, free of head motion (which moves the mouth's pixels too)."""
    from giris.workers.landmarks import find_face

    out = []
    for f in frames:
        p = find_face(f)
        out.append(np.linalg.norm(p[66] - p[62]) / np.linalg.norm(p[45] - p[36]))
    return np.array(out)


def test_lips_move_with_the_voice_and_rest_in_pauses(spoken):
    audio, sr, frames, _ = spoken
    opening = mouth_opening(frames)
    rest = opening[-1]  # the utterance ends with the mouth closed
    hop = sr // 25
    loud = np.array([np.sqrt(np.mean(audio[k * hop:(k + 1) * hop] ** 2)) if k * hop < len(audio) else 0
                     for k in range(len(frames))])
    loud /= loud.max()
    speech = opening[loud > 0.3]
    assert speech.mean() > rest + 0.05, "the mouth barely opens while speaking"
    assert opening.max() > rest + 0.12
    assert np.corrcoef(opening, loud)[0, 1] > 0.3
    # pauses: runs of >= 6 silent frames (sentence breaks) have the mouth back at rest
    quiet = loud < 0.03
    runs, k = [], 0
    while k < len(quiet):
        if quiet[k]:
            j = k
            while j < len(quiet) and quiet[j]:
                j += 1
            if j - k >= 6 and k > 0:
                # mid-pause: lips take ~100 ms to close after the sound stops (and start
                # to move before the next word), as a speaker's do
                runs.append(slice(k + 3, j - 1))
            k = j
        else:
            k += 1
    assert runs, "expected pauses between the sentences"
    for r in runs:
        assert opening[r].max() <= rest + 0.03, (r, opening[r], rest)
    assert abs(opening[0] - rest) <= 0.03  # it starts from rest too


def test_blinks_close_the_eyes_now_and_then(rt):
    audio, sr, frames, _ = speak(rt, TEXT + " " + TEXT, seed=11)
    _, eyes = regions(frames[0])
    level = np.array([f[eyes].astype(np.float32).mean() for f in frames])
    change = np.abs(level - np.median(level))
    assert (change > 4.0).sum() >= 2, change.max()  # at least one blink over ~8 s


def test_emotion_changes_the_face(rt):
    text = "Well, look at that."
    _, _, neutral, _ = speak(rt, text, emotion="neutral", seed=5)
    _, _, happy, _ = speak(rt, text, emotion="happy", intensity=1.0, seed=5)
    _, _, sad, _ = speak(rt, text, emotion="sad", intensity=1.0, seed=5)
    mouth, _ = regions(neutral[0])
    n = min(len(neutral), len(happy), len(sad))
    for other in (happy, sad):
        d = np.abs(other[:n].astype(np.float32) - neutral[:n].astype(np.float32))
        assert d[:, mouth[0], mouth[1]].mean() > 2.0
    # the background stays put whatever the face does
    corner = (slice(0, 20), slice(0, 20))
    assert np.abs(happy[:n, corner[0], corner[1]].astype(np.float32)
                  - neutral[:n, corner[0], corner[1]].astype(np.float32)).mean() < 1.0


def test_cancel_stops_the_voice_mid_utterance(rt):
    from giris.runtime.client import Event

    s = rt.open_session(size=128)
    text = " ".join(f"Sentence {i} of a story." for i in range(1, 16))
    utt = s.start_say(text)
    chunks, done = [], None
    for item in s.stream(utt, timeout=120):
        if isinstance(item, AudioChunk):
            chunks.append(item)
            if len(chunks) == 1:
                assert s.cancel(utt) == [utt]
        elif isinstance(item, Frame):
            item.release()
        elif isinstance(item, Event) and item.kind == "utterance_done":
            done = item
    assert done is not None and done.meta["cancelled"] and not done.meta["complete"]
    # fifteen sentences (~25 s of speech) were asked for; the voice stopped within a
    # window or two (chunks are windows of 0.05 s and up)
    spoken = sum(len(c.pcm) for c in chunks) / chunks[0].sample_rate
    assert spoken < 3.0, spoken
    # the session speaks on after a cancel
    assert any(isinstance(i, Frame) for i in s.say("Next."))
    s.close()


def test_live_audio_without_phonemes_moves_the_lips(rt):
    """``audio_in``: a client streams microphone-like audio; the acoustic path animates it."""
    from giris.runtime.client import Event
    from giris.workers.engine import EngineContext, StageInput
    from giris.workers.tts_piper import PiperEngine

    voice = PiperEngine({}, EngineContext(stage="tts"))  # real speech to play into the mic
    said = voice.process(StageInput("say", 0, 0.0, {"utterance": 1, "text": "Hello there, my friend. How are you?"}),
                         voice.open_session({}))
    sr = voice.sample_rate
    hush = np.zeros(int(0.4 * sr), np.int16)
    pcm = np.concatenate([hush, *[o.tensors[0] for o in said if o is not None], hush])
    s = rt.open_session(size=256, seed=3)
    step = sr // 2  # half a second per message, as a client would stream it
    utt = None
    for a in range(0, len(pcm), step):
        utt = s.send_audio(pcm[a:a + step], sr, utterance=utt, final=a + step >= len(pcm))
    frames, done = {}, None
    for item in s.stream(utt, timeout=120):
        if isinstance(item, Frame):
            frames[item.index] = item.image.copy()
            item.release()
        elif isinstance(item, Event) and item.kind == "utterance_done":
            done = item
    s.close()
    assert done is not None and done.meta["complete"]
    assert sorted(frames) == list(range(math.ceil(len(pcm) / sr * 25)))
    opening = mouth_opening(np.stack([frames[k] for k in sorted(frames)]))
    hop = sr // 25
    loud = np.array([np.sqrt(np.mean(pcm[k * hop:(k + 1) * hop].astype(np.float32) ** 2))
                     for k in range(len(opening))])
    loud /= loud.max()
    rest = opening[0]
    assert opening[:5].max() <= rest + 0.02  # the lead-in silence: mouth at rest
    assert opening[loud > 0.3].mean() > rest + 0.04
    assert np.corrcoef(opening, loud)[0, 1] > 0.3


def test_idle_keeps_the_avatar_alive_with_the_mouth_at_rest(rt):
    """``idle()``: between utterances the avatar goes on moving (the sway, blinks) with
    its mouth at rest, through the default engines."""
    s = rt.open_session(size=256, seed=3)
    frames = {}
    for item in s.idle(3.0):
        if isinstance(item, Frame):
            frames[item.index] = item.image.copy()
            item.release()
    s.close()
    assert sorted(frames) == list(range(75))
    video = np.stack([frames[k] for k in sorted(frames)]).astype(np.float32)
    step = np.abs(np.diff(video, axis=0)).mean(axis=(1, 2, 3))
    assert step.min() > 0.005  # the slow sway moves every frame: never a still picture
    opening = mouth_opening(video[::5].astype(np.uint8))
    assert opening.max() - opening.min() < 0.03  # the mouth stays at rest


def test_speech_takes_over_from_idle_without_a_gap_through_the_default_engines(rt):
    """A live session with coefficients wanted: the speech's coefficients, queued behind
    the idle frames a take-over drops, held its first frame back (a 320 ms gap with
    nothing shown); the idle frames now bridge the switch."""
    import threading
    import time

    s = rt.open_session(size=256, seed=3, realtime=True, zero_copy=True,
                        want=["audio", "coeffs", "frames"])
    log: list[tuple[float, str]] = []
    idle = s.idle()

    def show() -> None:
        for item in idle:
            if isinstance(item, Frame):
                log.append((time.monotonic(), "idle"))
                item.release()

    reader = threading.Thread(target=show, daemon=True)
    reader.start()
    time.sleep(3.0)  # (the idle frames queued ahead grow to their depth over the first seconds)
    for item in s.say("Okay, here is the answer."):
        if isinstance(item, Frame):
            log.append((time.monotonic(), "say"))
            item.release()
    reader.join(5)
    s.close()
    first = next(i for i, e in enumerate(log) if e[1] == "say")
    last_idle = max(t for t, kind in log[:first] if kind == "idle")
    assert log[first][0] - last_idle < 0.25
    assert all(kind == "say" for _, kind in log[first:])


def test_bad_requests_get_clear_errors_and_leave_nothing(rt, tmp_path):
    with pytest.raises(BadInput):
        rt.open_session(emotion="furious")
    with pytest.raises(BadInput) as e:
        rt.open_session(voice="nobody-at-all")
    assert e.value.code == "unknown_voice"
    with pytest.raises(BadInput) as e:
        rt.open_session(b"\x89PNG\r\n\x1a\n this is not really a png")
    assert e.value.code == "bad_image"
    flat = tmp_path / "flat.png"
    _write_png(flat, np.full((256, 256, 3), 128, np.uint8))
    with pytest.raises(BadInput) as e:
        rt.open_session(str(flat))
    assert e.value.code == "no_face"
    s = rt.open_session(size=128)
    with pytest.raises(BadInput):
        s.start_say("")
    with pytest.raises(LimitExceeded):
        s.start_say("la " * 400)
    with pytest.raises(GirisError) as e:
        list(s.say("🙂🙂🙂 ☃"))
    assert e.value.code == "bad_input"
    # text with some unsupported characters still speaks the rest
    assert any(isinstance(i, Frame) for i in s.say("Hi 🙂 there"))
    s.close()  # with frames of "Hi there" still on their way
    closed = time.monotonic()
    assert rt.status()["sessions"] == 0
    # A stage still drawing the session's next frame when the close reaches it sends it on,
    # and the supervisor frees it as it arrives: so "nothing left" is a state in which every
    # worker has said (heartbeats, every 0.5 s) that it dropped the session, and no slot is
    # busy. (Zero slots busy once is not it: a frame drawn a moment later was seen busy.)
    deadline = closed + 5
    while True:
        st = rt.status()
        settled = (time.monotonic() - closed > 1.0 and all(w["sessions"] == 0 for w in st["workers"]))
        if settled and all(p["in_use"] == 0 for p in st["pools"].values()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert all(w["sessions"] == 0 for w in st["workers"]), st["workers"]
    assert all(p["in_use"] == 0 for p in st["pools"].values()), st["pools"]


def _write_png(path: Path, rgb: np.ndarray) -> None:
    with av.open(str(path), "w", format="image2") as out:
        stream = out.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_giris_say_writes_a_talking_mp4(tmp_path):
    out = tmp_path / "hello.mp4"
    coeffs = tmp_path / "hello.csv"
    r = subprocess.run([sys.executable, "-m", "giris.supervisor.cli", "say", TEXT, "-o", str(out),
                        "--size", "256", "--emotion", "happy", "--coeffs", str(coeffs)],
                       capture_output=True, text=True, timeout=300, env={**os.environ})
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and a.codec_context.name == "aac"
        assert v.codec_context.pix_fmt == "yuv420p" and v.average_rate == 25
        n = sum(1 for _ in c.decode(video=0))
        v_dur = float(v.duration * v.time_base)
        a_dur = float(a.duration * a.time_base)
    # exact samples: audio_s is rounded to the millisecond (4.28014 s shows as 4.28, and
    # ceil(4.28 × 25) = 107 where the audio covers 108 frames)
    assert n == summary["frames"] == math.ceil(summary["audio_samples"] * 25 / summary["sample_rate"])
    assert abs(v_dur - a_dur) <= 1 / 25 + 1e-6
    rows = coeffs.read_text().splitlines()
    assert rows[0].startswith("frame,pts,eyeBlinkLeft") and len(rows) == n + 1


def test_giris_say_through_a_running_server(make_server, tmp_path):
    srv = make_server({"defaults": {"size": 128}, "stages": {  # (the tests' 64: too small for warp)
        "tts": {"engine": "piper", "cpus": []}, "coeffs": {"engine": "visemes"},
        "motion": {"engine": "prosody"},
        "render": {"engine": "warp", "pool_slots": 16, "pool_slot_bytes": 256 * 256 * 3}}})
    out = tmp_path / "remote.mp4"
    r = subprocess.run([sys.executable, "-m", "giris.supervisor.cli", "say", "Hi there.", "-o", str(out),
                        "--size", "128", "--connect", srv.endpoint, "--trace"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    hops = summary["first_frame_trace_ms"]  # --trace: where the first frame spent its time
    assert list(hops)[0] == "gateway → tts in" and list(hops)[-1] == "supervisor → client"
    assert len(hops) == 10 and all(ms >= 0 for ms in hops.values())
    assert sum(hops.values()) <= summary["first_frame_s"] * 1000 + 1
    with av.open(str(out)) as c:
        frames = sum(1 for _ in c.decode(video=0))
    assert frames == summary["frames"] == math.ceil(summary["audio_samples"] * 25 / summary["sample_rate"])
    assert srv.status()["sessions"] == 0  # the CLI closed its session
    # an unknown voice through the server is a clear error, not a crash of either side
    r = subprocess.run([sys.executable, "-m", "giris.supervisor.cli", "say", "Hi.", "-o", str(out),
                        "--size", "128", "--voice", "nobody", "--connect", srv.endpoint],
                       capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "unknown_voice" in r.stderr


def test_sessions_rendered_in_one_call_as_on_cuda():
    """The renderer's CUDA way (every ready session's frame in one grid_sample over whole
    frames) taken on the CPU, through the real worker: two sessions speaking at once each
    get every frame of their own audio, with their own pictures."""
    cfg = default_config()
    cfg.stages["render"].options = dict(cfg.stages["render"].options, batch_frames=True)
    with Runtime(cfg) as runtime:
        a = runtime.open_session(size=128, seed=1)
        b = runtime.open_session(size=128, seed=2, emotion="happy")
        ua, ub = a.start_say("One two three."), b.start_say("Four five six seven.")
        got = {}
        for s, u in ((a, ua), (b, ub)):
            samples, frames = 0, []
            for item in s.stream(u, timeout=120):
                if isinstance(item, AudioChunk):
                    samples += len(item.pcm)
                    sr = item.sample_rate
                elif isinstance(item, Frame):
                    frames.append(item.image.copy())
                    item.release()
            assert len(frames) == math.ceil(samples * 25 / sr)
            got[s.token] = np.stack(frames)
        fa, fb = got[a.token], got[b.token]
        assert fa.shape[1:] == fb.shape[1:] == (128, 128, 3)
        assert np.abs(fa[5].astype(np.int16) - fb[5]).mean() > 0.5  # own mouths, own smiles
        a.close()
        b.close()


def test_forked_workers_run_no_more_threads_than_fresh_ones(rt):
    """Workers forked from the launcher against workers started fresh, after drawing
    frames: no more threads. (OpenBLAS sizes its spinning thread pool when numpy is
    imported, from the CPUs it may use: in the launcher all of them, so a worker pinned to
    one CPU after the fork ran two spinning threads on it, and drew frames 5× slower.)"""
    import psutil

    def threads(runtime) -> dict[str, int]:
        s = runtime.open_session(size=128)
        assert any(isinstance(i, Frame) for i in s.say("Hello there."))
        s.close()
        return {w["stage"]: psutil.Process(w["pid"]).num_threads() for w in runtime.status()["workers"]}

    cfg = default_config()
    cfg.server.launcher = "spawn"
    with Runtime(cfg) as fresh:
        want = threads(fresh)
    got = threads(rt)
    for stage in ("coeffs", "motion", "render"):  # the pinned ones
        assert got[stage] <= want[stage], (got, want)


def test_the_mp4_plays_the_voice_on_its_frames(rt, tmp_path):
    """The MP4 as ``giris say`` writes it (its writer fed as it streams) against what the
    client received: the decoded audio lines up with the PCM sample for sample (no AAC
    priming heard as a delay) and decoded frame k is the client's frame k at k / fps, so the
    lips keep the engines' timing in a player, not only in Giris's own pts."""
    from giris.runtime.media import Mp4Writer

    out = tmp_path / "sync.mp4"
    s = rt.open_session(size=128, seed=3, fps=30)
    chunks, frames, writer = [], {}, None
    for item in s.say("Hello there. Bob made a map, and then he stopped.", timeout=120):
        if isinstance(item, AudioChunk):
            writer = writer or Mp4Writer(out, fps=s.fps, width=128, height=128,
                                         sample_rate=item.sample_rate)
            writer.add_audio(item.pcm, item.start_sample)
            chunks.append((item.start_sample, item.pcm.copy(), item.sample_rate))
        elif isinstance(item, Frame):
            frames[item.index] = item.image.copy()
            writer.add_frame(item.image, item.index)
            item.release()
    s.close()
    writer.close()
    sr = chunks[0][2]
    pcm = np.zeros(max(a + len(p) for a, p, _ in chunks), np.float64)
    for a, p, _ in chunks:
        pcm[a:a + len(p)] = p / 32768
    with av.open(str(out)) as c:
        decoded = list(c.decode(audio=0))
    assert decoded[0].sample_rate == sr and decoded[0].pts == 0   # the voice's rate, from 0
    x = np.concatenate([f.to_ndarray().reshape(-1) for f in decoded]).astype(np.float64)[:pcm.size]
    n = 1 << int(np.ceil(np.log2(2 * pcm.size)))
    xc = np.fft.irfft(np.fft.rfft(x, n) * np.conj(np.fft.rfft(pcm, n)), n)
    lag = (int(np.argmax(xc)) + n // 2) % n - n // 2              # samples the file is late
    assert abs(lag / sr) < 0.005, f"decoded audio {1000 * lag / sr:+.1f} ms off the PCM"
    with av.open(str(out)) as c:
        shown = [(f.pts * f.time_base, f.to_ndarray(format="rgb24").astype(np.int16))
                 for f in c.decode(video=0)]
    assert len(shown) == len(frames) == math.ceil(pcm.size / sr * s.fps)
    assert [t for t, _ in shown] == pytest.approx([k / s.fps for k in range(len(shown))], abs=1e-6)
    client = np.stack([frames[k] for k in range(len(frames))]).astype(np.int16)
    dec = np.stack([img for _, img in shown])
    err = {d: float(np.abs(dec[2:-2] - client[2 + d:len(client) - 2 + d]).mean()) for d in range(-2, 3)}
    assert min(err, key=err.get) == 0, f"the decoded frames are the client's shifted: {err}"
