"""CUDA IPC pools between two processes (skipped without CUDA and CuPy)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from giris.runtime.cuda_pool import cuda_available

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda_available(ipc=True), reason="needs CUDA (with IPC) and CuPy")]

CONSUMER = r"""
import sys, cupy
from giris.runtime.cuda_pool import CudaPoolCache
from giris.runtime.protocol import TensorRef
import json
ref = TensorRef(**json.loads(sys.argv[1]))
cache = CudaPoolCache()
a = cache.array(ref)
print(int(a.sum()), int(a[0, 0, 0]))
assert cache.release(ref)
cache.close()
"""


def test_frame_crosses_processes_through_cuda_ipc():
    import json

    import cupy

    from giris.runtime.cuda_pool import CudaSlotPool
    from giris.runtime.shm_pool import SHM_DIR, SlotPool

    name = f"giris-{os.getpid()}-gputest"
    table = SlotPool.create(name, 64, 4)
    try:
        pool = CudaSlotPool(table, 512 * 512 * 3)
        slot, arr = pool.alloc((512, 512, 3), "uint8")
        arr[...] = 3
        with pytest.raises(ValueError):  # not in the slot: no reference to made-up memory
            pool.publish(slot, cupy.zeros((512, 512, 3), cupy.uint8))
        ref = pool.publish(slot, arr)
        assert ref.offset == slot.index * pool.slot_bytes
        d = {k: v for k, v in ref.__dict__.items()}
        out = subprocess.run([sys.executable, "-c", CONSUMER, json.dumps(d)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        total, first = map(int, out.stdout.split())
        assert (total, first) == (3 * 512 * 512 * 3, 3)
        assert table.in_use() == 0
        # a producer restart makes old references stale
        stale = ref
        CudaSlotPool(table, 512 * 512 * 3)
        out = subprocess.run([sys.executable, "-c", CONSUMER, json.dumps(stale.__dict__)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and "stale" in out.stderr.lower()
    finally:
        table.unlink()
        (SHM_DIR / f"{name}.card").unlink(missing_ok=True)


def test_transport_benchmark_gpu_rows():
    """`python -m perf transport --cuda-only`: both GPU ways run between two processes and
    report every size (the figures themselves go to the README, not into assertions)."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "perf", "transport", "--cuda-only", "-n", "20", "--json"],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result) == {"256x256x3", "512x512x3", "1920x1080x3"}
    for figures in result.values():
        assert figures["cuda_ipc_p50_us"] > 0 and figures["cuda_host_p50_us"] > 0
