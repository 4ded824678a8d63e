"""GPU tensor pools: one device allocation per producing stage, shared by CUDA IPC.

The producer allocates its pool once at start-up and exports one IPC memory handle and
one IPC event per slot; consumers open the handle once per pool generation and cache it
(opening costs ~10 ms to hundreds of ms), so per message only an offset moves. Ordering
is on the device: the producer records the slot's event on its stream after writing;
the consumer makes its stream wait on that event. No host synchronisation.

Bookkeeping (free/busy, leases, owners, holders) is a CPU :class:`SlotPool` created by
the supervisor, exactly as for CPU pools, so release, reclaim and backpressure are the
same code. The handles live in a small "card" segment beside it (``NAME.card``): the
generation, the memory handle, and the event handles. A producer that restarts writes a
new card with a new generation; references to the old memory are refused as stale.

Needs CuPy (``pip install giris[gpu]``); torch sees the arrays through
``__cuda_array_interface__`` / DLPack.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Any

from giris.runtime.errors import GirisError
from giris.runtime.protocol import TensorRef
from giris.runtime.shm_pool import SHM_DIR, Slot, SlotPool, StaleReference

HANDLE = 64  # sizeof(cudaIpcMemHandle_t) == sizeof(cudaIpcEventHandle_t)
#: magic, generation, slot_bytes, n_slots, and the GPU by its PCI bus id: a device
#: *index* means another GPU in a process with another CUDA_VISIBLE_DEVICES (a stage
#: on cuda:1 sees its GPU as 0, a client seeing them all as 1)
CARD = struct.Struct("<8sQQQ16s")
MAGIC = b"GIRISGP2"


def _cupy() -> Any:
    try:
        import cupy
    except ImportError:
        raise GirisError("GPU pools need CuPy: pip install 'giris[gpu]'", code="engine_unavailable") from None
    return cupy


def cuda_available(ipc: bool = False) -> bool:
    """A GPU CuPy can use; with ``ipc``, one that can also share its memory and events with
    other processes, which not every CUDA host can (WSL2, Tegra boards): probed once."""
    try:
        cupy = _cupy()
        if cupy.cuda.runtime.getDeviceCount() <= 0:
            return False
    except Exception:  # noqa: BLE001 - no driver, no device, no CuPy: all mean "no"
        return False
    return not ipc or _ipc_works()


_IPC: list[bool] = []  # the probe's answer, once known


def _ipc_works() -> bool:
    """Export a handle to a fresh allocation and to an interprocess event, as a pool does."""
    if not _IPC:
        rt = _cupy().cuda.runtime
        try:
            mem = _cupy().cuda.Memory(256)
            rt.ipcGetMemHandle(mem.ptr)
            ev = rt.eventCreateWithFlags(rt.eventDisableTiming | rt.eventInterprocess)
            try:
                rt.ipcGetEventHandle(ev)
            finally:
                rt.eventDestroy(ev)
            _IPC.append(True)
        except Exception:  # noqa: BLE001 - cudaErrorNotSupported and kin
            _IPC.append(False)
    return _IPC[0]


@dataclass
class _Opened:
    generation: int
    device: int  # this process's index of the GPU the memory is on
    base: Any  # cupy MemoryPointer of the whole pool
    events: list[int]
    nbytes: int
    slot_bytes: int


def _extent(shape: tuple, strides: tuple | None, itemsize: int) -> tuple[int, int]:
    """Bytes [lo, hi) a strided view touches, relative to its first element's address."""
    if math.prod(shape) == 0:
        return 0, 0
    if strides is None:
        return 0, math.prod(shape) * itemsize
    lo = sum((n - 1) * s for n, s in zip(shape, strides) if s < 0)
    hi = sum((n - 1) * s for n, s in zip(shape, strides) if s > 0) + itemsize
    return lo, hi


def _stream_ptr(stream: Any, cupy: Any) -> int:
    """The ``cudaStream_t`` of a CuPy or torch stream, a raw handle, or CuPy's current one."""
    if stream is None:
        return int(cupy.cuda.get_current_stream().ptr)
    if isinstance(stream, int):
        return stream
    for attr in ("ptr", "cuda_stream"):  # CuPy, torch
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    raise TypeError(f"not a CUDA stream: {stream!r}")


class CudaSlotPool:
    """The producer's side: device memory, events, and the card that shares them."""

    def __init__(self, table: SlotPool, slot_bytes: int, device: int = 0) -> None:
        cupy = _cupy()
        self.table = table
        self.name = table.name
        self.device = device
        self.slot_bytes = -(-int(slot_bytes) // 256) * 256  # keep every slot 256-byte aligned
        cupy.cuda.Device(device).use()
        rt = cupy.cuda.runtime
        self.nbytes = self.slot_bytes * table.n_slots
        # A cudaMalloc of its own, not CuPy's pool: an IPC handle opens the *allocation*
        # at its base, so a pointer sub-allocated inside a larger pool block would be read
        # at the wrong address by every consumer.
        self.memory = cupy.cuda.MemoryPointer(cupy.cuda.Memory(self.nbytes), 0)
        self.events = [rt.eventCreateWithFlags(rt.eventDisableTiming | rt.eventInterprocess)
                       for _ in range(table.n_slots)]
        generation = table.generation + 1
        table.reset()  # a new generation: references into older memory are stale
        try:
            mem_handle = rt.ipcGetMemHandle(self.memory.ptr)
            ev_handles = b"".join(rt.ipcGetEventHandle(e) for e in self.events)
        except Exception as e:  # noqa: BLE001 - CUDA's own words are the useful part
            for ev in self.events:
                rt.eventDestroy(ev)
            raise GirisError(f"this GPU cannot share memory with other processes (CUDA IPC: {e}); "
                             "frames must go through host memory here", code="engine_unavailable") from e
        bus = rt.deviceGetPCIBusId(device).encode("ascii")
        card = CARD.pack(MAGIC, generation, self.slot_bytes, table.n_slots, bus) + mem_handle + ev_handles
        tmp = SHM_DIR / f"{self.name}.card.tmp{os.getpid()}"
        # owner-only, as the pools' segments: the handles open the producer's device memory
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(card)
        os.replace(tmp, SHM_DIR / f"{self.name}.card")  # atomic: readers never see half a card

    @classmethod
    def for_stage(cls, table_name: str, slot_bytes: int, device: int = 0) -> "CudaSlotPool":
        return cls(SlotPool.attach(table_name), slot_bytes, device)

    def alloc(self, shape: tuple, dtype: Any, owner: int = 0, timeout: float | None = 1.0) -> tuple[Slot, Any]:
        """A free slot and a CuPy array over it, to render into on the current stream."""
        cupy = _cupy()
        slot = self.table.alloc(owner=owner, timeout=timeout)
        dt = cupy.dtype(dtype)
        n = math.prod(shape) * dt.itemsize
        if n > self.slot_bytes:
            self.table.release(slot.index, slot.lease)
            raise GirisError(f"{n} bytes do not fit a {self.slot_bytes}-byte slot", code="too_large")
        ptr = self.memory + slot.index * self.slot_bytes
        return slot, cupy.ndarray(shape, dt, memptr=ptr)

    def publish(self, slot: Slot, array: Any, stream: Any = None) -> TensorRef:
        """Record the slot's event on the stream that wrote ``array`` and make the reference.

        ``array`` must lie inside ``slot`` (the array :meth:`alloc` gave, or a view of it):
        its offset is taken from its own address, not assumed to be the slot's start.
        ``stream``: the stream the frame was drawn on, when not CuPy's current one (a
        ``torch.cuda.Stream``, a CuPy stream, or a raw ``cudaStream_t``); consumers wait on
        the event, so it must follow the writes."""
        cupy = _cupy()
        offset = int(array.data.ptr) - int(self.memory.ptr)
        lo, hi = _extent(tuple(array.shape), tuple(array.strides), array.dtype.itemsize)
        start = slot.index * self.slot_bytes
        if not start <= offset + lo <= offset + hi <= start + self.slot_bytes:
            raise ValueError(f"array does not lie inside slot {slot.index} of {self.name}")
        cupy.cuda.runtime.eventRecord(self.events[slot.index], _stream_ptr(stream, cupy))
        return TensorRef(dtype=str(array.dtype), shape=tuple(array.shape), nbytes=int(array.nbytes),
                         pool=self.name, generation=self.table.generation, slot=slot.index,
                         offset=offset, strides=tuple(array.strides),
                         device=f"cuda:{self.device}", lease=slot.lease)


class CudaPoolCache:
    """The consumer's side: handles opened once per pool generation, then only offsets."""

    def __init__(self) -> None:
        self.opened: dict[str, _Opened] = {}
        self.tables: dict[str, SlotPool] = {}

    def _open(self, name: str) -> _Opened:
        cupy = _cupy()
        rt = cupy.cuda.runtime
        card = (SHM_DIR / f"{name}.card").read_bytes()
        magic, generation, slot_bytes, n_slots, bus = CARD.unpack_from(card)
        if magic != MAGIC:
            raise GirisError(f"{name} has no valid CUDA card", code="bad_pool")
        table = self.tables.get(name)
        if table is not None and generation != table.generation:
            # the producer resets the table before it writes its new card: a restart is
            # under way, and this card names memory that is going or gone
            raise StaleReference(f"{name}: the producer is restarting")
        cached = self.opened.get(name)
        if cached is not None and cached.generation == generation:
            return cached
        if cached is not None:  # the producer restarted: drop the old mapping
            # not under work still queued on it (unmapping memory a kernel reads is a
            # fault that poisons this process's context); arrays over it are dangling now
            with cupy.cuda.Device(cached.device):
                rt.deviceSynchronize()
            self._close(cached)
            del self.opened[name]
        bus_id = bus.rstrip(b"\0").decode("ascii", "replace")
        try:
            device = rt.deviceGetByPCIBusId(bus_id)
        except Exception:  # noqa: BLE001 - cudaErrorInvalidDevice: not one this process sees
            raise GirisError(f"{name} lies on the GPU at PCI {bus_id}, which this process does not "
                             "see (its CUDA_VISIBLE_DEVICES)", code="bad_pool") from None
        off = CARD.size
        with cupy.cuda.Device(device):  # opened, and later read, on the GPU it lies on
            ptr = rt.ipcOpenMemHandle(card[off:off + HANDLE], rt.cudaIpcMemLazyEnablePeerAccess)
            nbytes = slot_bytes * n_slots
            mem = cupy.cuda.UnownedMemory(ptr, nbytes, self, device)
            events = [rt.ipcOpenEventHandle(card[off + HANDLE * (1 + i): off + HANDLE * (2 + i)])
                      for i in range(n_slots)]
        self.opened[name] = _Opened(generation, device, cupy.cuda.MemoryPointer(mem, 0), events, nbytes,
                                    slot_bytes)
        return self.opened[name]

    def array(self, ref: TensorRef, stream: Any = None) -> Any:
        """A CuPy view of the referenced slot, ordered after the producer's writes on the
        stream that will read it (``stream``: a torch or CuPy stream, a raw handle; CuPy's
        current one by default: a reader on another stream was not ordered)."""
        cupy = _cupy()
        table = self.tables.get(ref.pool) or self.tables.setdefault(ref.pool, SlotPool.attach(ref.pool))  # type: ignore[arg-type]
        # Stale references are refused first, before any handle is opened: the card may
        # still name the memory of a producer that died (it writes its card after it
        # resets the table), and opening that fails with a CUDA error, not StaleReference.
        table.check(ref)
        pool = self.opened.get(ref.pool)  # type: ignore[arg-type]
        if pool is None or pool.generation != ref.generation:
            pool = self._open(ref.pool)  # type: ignore[arg-type]  # the card is read only then
        if ref.generation != pool.generation:
            raise StaleReference(f"{ref.pool}: generation {ref.generation} is gone")
        dtype = cupy.dtype(ref.dtype)
        lo, hi = _extent(tuple(ref.shape), None if ref.strides is None else tuple(ref.strides), dtype.itemsize)
        start = ref.slot * pool.slot_bytes
        # inside its own slot (the one whose lease was checked), as the CPU pools check
        if not start <= ref.offset + lo <= ref.offset + hi <= min(start + pool.slot_bytes, pool.nbytes):
            raise StaleReference("reference out of the slot's bounds")
        with cupy.cuda.Device(pool.device):  # the reading stream (on that GPU) waits
            cupy.cuda.runtime.streamWaitEvent(_stream_ptr(stream, cupy), pool.events[ref.slot], 0)
            return cupy.ndarray(ref.shape, dtype, memptr=pool.base + ref.offset, strides=ref.strides)

    def release(self, ref: TensorRef, stream: Any = None) -> bool:
        """Give the slot back once the reads queued on ``stream`` (as for :meth:`array`)
        are done: the producer writes into a slot the moment it is free, and its stream
        does not wait for ours."""
        table = self.tables.get(ref.pool or "")
        if table is None:
            return False
        cupy = _cupy()
        opened = self.opened.get(ref.pool or "")
        with cupy.cuda.Device(opened.device if opened is not None else cupy.cuda.runtime.getDevice()):
            cupy.cuda.runtime.streamSynchronize(_stream_ptr(stream, cupy))
        return table.release(ref.slot, ref.lease)

    def close(self) -> None:
        """Let go of every opened pool (handles, imported events, slot tables), after the
        work queued on them. Arrays still held over them must not be used afterwards."""
        cupy = _cupy() if self.opened else None
        for device in sorted({o.device for o in self.opened.values()}):
            with cupy.cuda.Device(device):  # type: ignore[union-attr]
                cupy.cuda.runtime.deviceSynchronize()  # type: ignore[union-attr]
        for opened in self.opened.values():
            self._close(opened)
        self.opened.clear()
        for table in self.tables.values():
            table.close()
        self.tables.clear()

    @staticmethod
    def _close(opened: _Opened) -> None:
        rt = _cupy().cuda.runtime
        for event in opened.events:  # imported events are this process's to destroy
            rt.eventDestroy(event)
        rt.ipcCloseMemHandle(opened.base.ptr)
