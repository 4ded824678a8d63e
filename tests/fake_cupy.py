"""A stand-in for CuPy over host memory: device pointers are addresses in a table of numpy
buffers, IPC handles encode them, and every runtime call is logged in ``calls``. Only for
checking ``giris.runtime.cuda_pool``'s bookkeeping (offsets, bounds, caching, order of
teardown) on machines without a GPU; what CUDA itself does is the ``gpu`` tests' part."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

calls: list[tuple] = []
_heap: dict[int, np.ndarray] = {}  # base pointer -> its bytes
_next = [1 << 20]
_handles: dict[bytes, int] = {}


def _alloc(n: int) -> int:
    ptr = _next[0]
    _next[0] += ((n + 4095) // 4096 + 1) * 4096
    _heap[ptr] = np.zeros(n, np.uint8)
    return ptr


def _find(ptr: int) -> tuple[int, np.ndarray]:
    for base, buf in _heap.items():
        if base <= ptr < base + len(buf):
            return base, buf
    raise RuntimeError(f"illegal address {ptr:#x}")  # what a GPU would fault on


class Memory:
    def __init__(self, n: int) -> None:
        self.ptr, self.size = _alloc(n), n


class UnownedMemory:
    def __init__(self, ptr: int, size: int, owner: Any, device_id: int = -1) -> None:
        self.ptr, self.size, self.owner = ptr, size, owner


class MemoryPointer:
    def __init__(self, mem: Any, offset: int) -> None:
        self.mem, self.ptr = mem, mem.ptr + offset

    def __add__(self, offset: int) -> "MemoryPointer":
        return MemoryPointer(self.mem, self.ptr - self.mem.ptr + offset)


class _Stream:
    ptr = 0

    def synchronize(self) -> None:
        calls.append(("sync",))


class Device:
    def __init__(self, index: int = 0) -> None:
        self.id = index

    def use(self) -> None:
        pass

    def __enter__(self) -> "Device":
        calls.append(("device", self.id))
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


#: PCI bus id → this process's index of that GPU (another CUDA_VISIBLE_DEVICES: another map)
visible: dict[str, int] = {"0000:3B:00.0": 0}


def _bus_id(index: int) -> str:
    return next(bus for bus, i in visible.items() if i == index)


def _by_bus_id(bus: str) -> int:
    if bus not in visible:
        raise RuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
    return visible[bus]


def _ipc_handle(ptr: int) -> bytes:
    h = int(ptr).to_bytes(8, "little") * 8  # 64 bytes, as CUDA's
    _handles[h] = ptr
    return h


def _event(flags: int) -> int:
    calls.append(("evcreate", flags))
    return 7000 + len(calls)


def _open(h: bytes, flags: int = 1) -> int:
    calls.append(("open", _handles[bytes(h)]))
    return _handles[bytes(h)]


runtime = SimpleNamespace(
    eventDisableTiming=2, eventInterprocess=4, cudaIpcMemLazyEnablePeerAccess=1,
    getDeviceCount=lambda: 1, eventCreateWithFlags=_event, getDevice=lambda: 0,
    deviceGetPCIBusId=_bus_id, deviceGetByPCIBusId=_by_bus_id,
    ipcGetMemHandle=_ipc_handle, ipcGetEventHandle=_ipc_handle,
    ipcOpenMemHandle=_open, ipcOpenEventHandle=lambda h: _handles[bytes(h)],
    ipcCloseMemHandle=lambda p: calls.append(("close", p)),
    eventDestroy=lambda e: calls.append(("evdestroy", e)),
    deviceSynchronize=lambda: calls.append(("devsync",)),
    eventRecord=lambda e, s: calls.append(("record", e, s)),
    streamWaitEvent=lambda s, e, f=0: calls.append(("wait", s, e)),
    streamSynchronize=lambda s: calls.append(("sync", s)),
)
cuda = SimpleNamespace(Memory=Memory, UnownedMemory=UnownedMemory, MemoryPointer=MemoryPointer,
                       Device=Device, get_current_stream=lambda: _Stream(), runtime=runtime)
dtype = np.dtype
uint8 = np.uint8


class ndarray(np.ndarray):
    """A numpy array over a fake device buffer, with ``.data.ptr`` as CuPy has it."""

    def __new__(cls, shape: Any, dtype: Any, memptr: MemoryPointer, strides: Any = None) -> "ndarray":
        base, buf = _find(memptr.ptr)
        return np.ndarray(shape, dtype, buffer=buf, offset=memptr.ptr - base, strides=strides).view(cls)

    @property
    def data(self) -> SimpleNamespace:
        addr = self.__array_interface__["data"][0]
        for base, buf in _heap.items():
            start = buf.__array_interface__["data"][0]
            if start <= addr < start + max(1, len(buf)):
                return SimpleNamespace(ptr=base + addr - start)
        raise RuntimeError("not a fake device array")


def zeros(shape: Any, dt: Any) -> ndarray:
    return ndarray(shape, dt, MemoryPointer(Memory(int(np.prod(shape)) * np.dtype(dt).itemsize), 0))
