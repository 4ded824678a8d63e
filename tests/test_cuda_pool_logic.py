"""The CUDA pool's bookkeeping, on any machine: CuPy replaced by a stand-in over host
memory (``tests/fake_cupy.py``). What CUDA does (IPC across processes, events, streams)
is checked by the ``gpu`` tests in ``test_cuda_pool.py``; this checks what Giris adds on
top: references' offsets and bounds, handles opened once, stale references refused
before anything is opened, teardown after the device is idle."""
from __future__ import annotations

import os
import sys

import pytest

from giris.runtime.protocol import TensorRef
from giris.runtime.shm_pool import SHM_DIR, SlotPool, StaleReference
from tests import fake_cupy


@pytest.fixture
def cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    fake_cupy.calls.clear()
    return fake_cupy


def test_extent_of_strided_views():
    from giris.runtime.cuda_pool import _extent

    assert _extent((512, 512, 3), (1536, 3, 1), 1) == (0, 512 * 512 * 3)
    assert _extent((4, 5), None, 4) == (0, 80)
    assert _extent((0, 5), (20, 4), 4) == (0, 0)
    assert _extent((3,), (-8,), 8) == (-16, 8)


def test_references_offsets_bounds_cache_and_teardown(cupy):
    from giris.runtime.cuda_pool import CudaPoolCache, CudaSlotPool

    name = f"giris-{os.getpid()}-fakegpu"
    table = SlotPool.create(name, 64, 4)
    try:
        pool = CudaSlotPool(table, 100 * 100 * 3)
        card = SHM_DIR / f"{name}.card"
        assert card.stat().st_mode & 0o777 == 0o600  # its handles open the device memory
        slot, arr = pool.alloc((100, 100, 3), "uint8")
        slot2, arr2 = pool.alloc((100, 100, 3), "uint8")
        arr[...] = 3
        arr2[...] = 9
        for foreign in (cupy.zeros((100, 100, 3), cupy.uint8), arr2):  # not in this slot
            with pytest.raises(ValueError):
                pool.publish(slot, foreign)
        ref = pool.publish(slot, arr)
        assert ref.offset == slot.index * pool.slot_bytes
        # the event follows the stream that drew the frame: CuPy's current, or one named
        pool.publish(slot, arr, stream=type("TorchStream", (), {"cuda_stream": 4242})())
        pool.publish(slot, arr, stream=77)
        assert [c[2] for c in cupy.calls if c[0] == "record"] == [0, 4242, 77]
        ref_sub = pool.publish(slot, arr[10:20, 5:7])  # a view: its own offset
        assert ref_sub.offset == ref.offset + 10 * 300 + 5 * 3

        cache = CudaPoolCache()
        a = cache.array(ref)
        assert a.shape == (100, 100, 3) and int(a.sum()) == 3 * 100 * 100 * 3
        b = cache.array(ref_sub)
        assert b.shape == (10, 2, 3) and int(b.sum()) == 3 * 60
        # into the other slot under this slot's lease, or past it by its strides: refused
        for forged in ({"offset": slot2.index * pool.slot_bytes}, {"strides": (30000, 3, 1)}):
            with pytest.raises(StaleReference):
                cache.array(TensorRef(**{**ref.__dict__, **forged}))
        assert cache.release(ref) and not cache.release(ref)
        assert sum(c[0] == "open" for c in cupy.calls) == 1  # opened once, then cached
        # a reader on a stream of its own (torch's): that stream waits, and is waited for
        torch_stream = type("TorchStream", (), {"cuda_stream": 5151})()
        cache.array(pool.publish(slot2, arr2), stream=torch_stream)
        assert cupy.calls[-1] == ("wait", 5151, cache.opened[name].events[slot2.index])
        cache.release(pool.publish(slot2, arr2), stream=torch_stream)
        assert ("sync", 5151) in cupy.calls

        # the producer restarts: an old reference is refused before anything is opened,
        # a new one reopens, after the old mapping was let go with the device idle
        pool2 = CudaSlotPool(table, 100 * 100 * 3)
        with pytest.raises(StaleReference):
            cache.array(ref_sub)
        assert sum(c[0] == "open" for c in cupy.calls) == 1
        s3, a3 = pool2.alloc((100, 100, 3), "uint8")
        a3[...] = 1
        assert int(cache.array(pool2.publish(s3, a3)).sum()) == 100 * 100 * 3
        # the next restart caught half-way (table reset, card not yet rewritten): the card
        # names memory that is going, so nothing is opened
        table.reset()
        with pytest.raises(StaleReference):
            cache._open(name)
        names = [c[0] for c in cupy.calls]
        first_teardown = names.index("evdestroy")
        assert names[first_teardown - 1] == "devsync"
        assert names[first_teardown:names.index("close")] == ["evdestroy"] * table.n_slots
        cache.close()
        names = [c[0] for c in cupy.calls]
        assert names.count("close") == 2 and names.count("evdestroy") == 2 * table.n_slots
        assert not cache.opened and not cache.tables
    finally:
        table.unlink()
        table.close()
        (SHM_DIR / f"{name}.card").unlink(missing_ok=True)


def test_a_gpu_without_cuda_ipc_is_said_so(cupy, monkeypatch):
    """Some CUDA hosts cannot export IPC handles (WSL2, Tegra): the GPU tests and benchmark
    rows ask for IPC and skip there, and a pool says why it cannot be made."""
    from giris.runtime import cuda_pool
    from giris.runtime.errors import GirisError

    monkeypatch.setattr(cuda_pool, "_IPC", [])
    assert cuda_pool.cuda_available() and cuda_pool.cuda_available(ipc=True)

    def unsupported(ptr):
        raise RuntimeError("cudaErrorNotSupported: operation not supported")

    monkeypatch.setattr(cupy.runtime, "ipcGetMemHandle", unsupported)
    monkeypatch.setattr(cuda_pool, "_IPC", [])
    assert cuda_pool.cuda_available() and not cuda_pool.cuda_available(ipc=True)
    table = SlotPool.create(f"giris-{os.getpid()}-noipc", 64, 2)
    try:
        cupy.calls.clear()
        with pytest.raises(GirisError, match="cannot share memory") as e:
            cuda_pool.CudaSlotPool(table, 1024)
        assert e.value.code == "engine_unavailable"
        created = [c for c in cupy.calls if c[0] == "evcreate"]
        assert len([c for c in cupy.calls if c[0] == "evdestroy"]) == len(created) == 2  # none leak
    finally:
        table.unlink()
        table.close()
        (SHM_DIR / f"{table.name}.card").unlink(missing_ok=True)


def test_a_consumer_finds_the_pools_gpu_by_its_pci_bus_id(cupy, monkeypatch):
    """The card names the GPU by PCI bus id, not by index: a render stage on the server's
    second GPU sees it as its cuda:0, a client seeing every GPU as cuda:1. The consumer
    opens and reads the pool on its own index of that GPU, and says so when it cannot
    see it at all."""
    import numpy as np

    from giris.runtime.cuda_pool import CudaPoolCache, CudaSlotPool
    from giris.runtime.errors import GirisError

    monkeypatch.setattr(cupy, "visible", {"0000:3B:00.0": 0})  # the producer's view
    table = SlotPool.create(f"giris-{os.getpid()}-busid", 64, 2)
    try:
        pool = CudaSlotPool(table, 4 * 4 * 3)
        slot, arr = pool.alloc((4, 4, 3), np.uint8)
        arr[...] = 9
        ref = pool.publish(slot, arr)
        monkeypatch.setattr(cupy, "visible", {"0000:AF:00.0": 0, "0000:3B:00.0": 1})  # the client's
        cache = CudaPoolCache()
        cupy.calls.clear()
        view = cache.array(ref)
        assert int(view[0, 0, 0]) == 9
        opened = [c for c in cupy.calls if c[0] in ("device", "open")]
        assert opened[:2] == [("device", 1), ("open", opened[1][1])]  # opened on its GPU 1
        assert ("device", 1) in cupy.calls[cupy.calls.index(opened[1]) + 1:]  # and read there
        cache.close()
        monkeypatch.setattr(cupy, "visible", {"0000:AF:00.0": 0})  # a client without that GPU
        other = CudaPoolCache()
        with pytest.raises(GirisError, match="PCI 0000:3B:00.0") as e:
            other.array(ref)
        assert e.value.code == "bad_pool"
        other.close()
    finally:
        table.unlink()
        table.close()
        (SHM_DIR / f"{table.name}.card").unlink(missing_ok=True)
