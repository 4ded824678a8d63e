"""The warp renderer on a GPU (skipped without CUDA): same pictures as on the CPU, every
session's frame in one call, and the render stage on ``cuda:0`` inside the runtime."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from giris.workers.engine import EngineContext  # noqa: E402
from giris.workers.render_warp import WarpRenderEngine  # noqa: E402
from tests.test_render import SIZE, row  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA build of torch and a GPU")]

ROWS = [row(), row(jawOpen=0.6), row(eyeBlinkLeft=1.0, eyeBlinkRight=1.0),
        row(headYaw=0.3, mouthSmileLeft=0.7, mouthSmileRight=0.7), row(jawOpen=0.3, headPitch=-0.2),
        row(eyeWideLeft=1.0, eyeWideRight=1.0, browInnerUp=0.7, headYaw=0.1)]


def test_cuda_frames_match_the_cpu_frames():
    # the CPU taking the CUDA way (whole frames): only the device differs
    cpu = WarpRenderEngine({"preload_landmarks": False, "batch_frames": True}, EngineContext(stage="render"))
    gpu = WarpRenderEngine({"preload_landmarks": False}, EngineContext(stage="render", device="cuda:0"))
    assert gpu.batched  # whole frames, one grid_sample per size: the CUDA way
    a, b = cpu.open_session({"size": SIZE}), gpu.open_session({"size": SIZE})
    assert b.src.is_cuda
    for r in ROWS:
        want, got = np.zeros((SIZE, SIZE, 3), np.uint8), np.zeros((SIZE, SIZE, 3), np.uint8)
        cpu.render(a, r, want)
        gpu.render(b, r, got)
        diff = np.abs(want.astype(np.int16) - got)
        # float rounding differs between the devices' kernels: a level here and there
        assert diff.mean() < 0.05 and diff.max() <= 2, (diff.mean(), diff.max())
    held = gpu.held(b)
    # its frames and grids on the card; the source and staging in host memory
    assert set(held) == {"cuda:0", "cpu"} and held["cuda:0"] > 0


def test_cuda_batch_gives_each_session_its_own_frame():
    gpu = WarpRenderEngine({"preload_landmarks": False}, EngineContext(stage="render", device="cuda:0"))
    big, small = gpu.open_session({"size": SIZE}), gpu.open_session({"size": 128})
    jobs = [(big, ROWS[1]), (small, ROWS[3]), (big, ROWS[2]), (small, ROWS[0])]
    outs = [np.zeros(st.image.shape, np.uint8) for st, _ in jobs]
    gpu.render_batch([(st, r, o) for (st, r), o in zip(jobs, outs)])
    for (st, r), o in zip(jobs, outs):
        alone = np.zeros_like(o)
        gpu.render(st, r, alone)
        assert np.abs(o.astype(np.int16) - alone).max() <= 1
    assert np.abs(outs[0].astype(np.int16) - outs[2]).mean() > 0.1


@pytest.mark.parametrize("pool_slots", [0, 16], ids=["inline", "pool"])
def test_render_stage_on_cuda_through_the_runtime(pool_slots):
    """The render stage on cuda:0 fed by the test engines: frames arrive for every word,
    the session's memory is charged to the GPU, and closing frees it. Both ways a frame
    leaves the renderer: inline, and in its shared-memory pool (as configs/gpu.toml and
    ``perf render --device cuda:0`` run it; the frames lie in host memory there)."""
    from giris.runtime import Runtime
    from giris.runtime.client import Frame
    from giris.runtime.config import from_mapping

    render = {"engine": "warp", "device": "cuda:0", "options": {"preload_landmarks": False}}
    if pool_slots:
        render.update(pool_slots=pool_slots, pool_slot_bytes=SIZE * SIZE * 3)
    cfg = from_mapping({"stages": {
        "tts": {"engine": "test-source", "options": {"word_s": 0.2}},
        "coeffs": {"engine": "test-relay"},
        "motion": {"engine": "test-relay"},
        "render": render,
    }})
    with Runtime(cfg) as rt:
        s = rt.open_session(size=SIZE)
        frames = []
        for item in s.say("one two three four"):
            if isinstance(item, Frame):
                frames.append(item.image.copy())
                item.release()
        assert len(frames) >= 4 * 5  # 0.2 s a word at 25 FPS
        assert frames[0].shape == (SIZE, SIZE, 3)
        assert np.std(np.stack(frames).astype(np.float32), axis=0).mean() > 0.5  # it moves
        st = rt.status()
        assert st["budgets"]["cuda:0"]["used"] > 0
        s.close()
        st = rt.status()
        assert st["budgets"].get("cuda:0", {}).get("used", 0) == 0
