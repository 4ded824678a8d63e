"""CPU tensor pools: fixed-size slots in one POSIX shared-memory segment.

The supervisor creates every pool before it spawns workers and unlinks them at shutdown;
workers and local clients only attach. The segment is a plain file under ``/dev/shm``
mapped with ``mmap``: unlike ``multiprocessing.shared_memory`` nothing registers it with
Python's resource tracker, so no process but the supervisor can ever unlink it.

Layout: a 64-byte header, a slot table (one 32-byte record per slot) and the slots,
page aligned. Each record holds the slot's state (free/busy), its lease number (bumped
on every allocation, so stale references are refused), the pid of the process holding
it, the tag of the session that owns it, and when it was taken.

Concurrency: each pool has exactly one producer, the only process that turns a slot
from free to busy; consumers (and the supervisor, reclaiming) only turn busy to free,
after checking the lease. Single aligned stores are atomic on the platforms we run on.
"""
from __future__ import annotations

import mmap
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from giris.runtime.errors import GirisError
from giris.runtime.protocol import TensorRef, dtype_name

SHM_DIR = Path("/dev/shm")
MAGIC = b"GIRISPL1"
HEADER = np.dtype([("magic", "S8"), ("n_slots", "<u4"), ("pad", "<u4"),
                   ("slot_bytes", "<u8"), ("generation", "<u8"), ("data_offset", "<u8"),
                   ("reserved", "<u8", 3)])
SLOT = np.dtype([("state", "<u4"), ("lease", "<u4"), ("holder", "<i4"), ("pad", "<u4"),
                 ("owner", "<u8"), ("stamp", "<f8")])
_GEN_OFFSET = HEADER.fields["generation"][1]
FREE, BUSY = 0, 1
PAGE = mmap.PAGESIZE
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class PoolFull(GirisError):
    """No free slot before the deadline: the consumer is behind (backpressure)."""

    code = "pool_full"


class StaleReference(GirisError):
    """The reference names a slot that was freed and reused, or an older pool generation."""

    code = "stale_reference"


@dataclass
class Slot:
    index: int
    lease: int
    array: np.ndarray  # uint8 view of the whole slot


def session_tag(token: str) -> int:
    """A stable 63-bit tag for a session token (0 is 'no owner')."""
    import hashlib

    return (int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
            >> 1) or 1


class SlotPool:
    """A mapped pool. Use :meth:`create` (supervisor) or :meth:`attach` (everyone else)."""

    def __init__(self, name: str, mm: mmap.mmap, owner: bool) -> None:
        self.name = name
        self._mm = mm
        self._owner = owner
        # np.frombuffer, not np.ndarray(buffer=): only frombuffer keeps the mapping's buffer
        # exported while a view lives, so close() cannot unmap memory a caller still reads
        # (a zero-copy frame kept after its client closed read unmapped memory: SIGSEGV)
        self._header = np.frombuffer(mm, HEADER, 1, 0).reshape(())
        if bytes(self._header["magic"]) != MAGIC:
            raise GirisError(f"{name} is not a Giris pool", code="bad_pool")
        self.n_slots = int(self._header["n_slots"])
        self.slot_bytes = int(self._header["slot_bytes"])
        self._data_offset = int(self._header["data_offset"])
        self.table = np.frombuffer(mm, SLOT, self.n_slots, HEADER.itemsize)
        self._data = np.frombuffer(mm, np.uint8, self.n_slots * self.slot_bytes,
                                   self._data_offset).reshape(self.n_slots, self.slot_bytes)
        # Column views for the vectorised work (search, reclaim, counts) ...
        self._state = self.table["state"]
        self._holders, self._owners = self.table["holder"], self.table["owner"]
        # ... and flat typed memoryviews of the same bytes for the per-hand-off reads and
        # writes: an item there costs ~50 ns against ~300 ns for a numpy scalar, and a
        # woken process pays several times that for every object it touches.
        table_bytes = memoryview(mm)[HEADER.itemsize:HEADER.itemsize + SLOT.itemsize * self.n_slots]
        self._gen = memoryview(mm)[_GEN_OFFSET:_GEN_OFFSET + 8].cast("Q")
        self._u32 = table_bytes.cast("I")   # record i: [8i] state, [8i+1] lease
        self._i32 = table_bytes.cast("i")   # [8i+2] holder pid
        self._u64 = table_bytes.cast("Q")   # [4i+2] owner tag
        self._f64 = table_bytes.cast("d")   # [4i+3] stamp
        #: every buffer exported from the mapping, released by close()
        self._mv = [table_bytes, self._gen, self._u32, self._i32, self._u64, self._f64]
        self._slots = [self._data[i] for i in range(self.n_slots)]
        self._base = self._data.__array_interface__["data"][0]
        self._flat = self._data.reshape(-1)  # one view: a reference costs one slice
        self._cursor = 0
        self._pid = os.getpid()

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, name: str, slot_bytes: int, n_slots: int) -> "SlotPool":
        if not _NAME.match(name):
            raise ValueError(f"bad pool name {name!r}")
        slot_bytes = -(-int(slot_bytes) // 64) * 64
        data_offset = -(-(HEADER.itemsize + SLOT.itemsize * n_slots) // PAGE) * PAGE
        size = data_offset + slot_bytes * n_slots
        path = SHM_DIR / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        h = np.ndarray((), HEADER, buffer=mm, offset=0)
        h["n_slots"], h["slot_bytes"], h["generation"] = n_slots, slot_bytes, 1
        h["data_offset"] = data_offset
        h["magic"] = MAGIC  # last: a reader never sees a half-written header as valid
        return cls(name, mm, owner=True)

    @classmethod
    def attach(cls, name: str) -> "SlotPool":
        if not _NAME.match(name):
            raise GirisError(f"bad pool name {name!r}", code="bad_pool")
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR)
        except FileNotFoundError:
            raise GirisError(f"no pool named {name!r}", code="bad_pool") from None
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, mm, owner=False)

    def close(self) -> None:
        """Unmap (views handed out keep the mapping alive until they are gone)."""
        for mv in reversed(self._mv):  # exported buffers pin the mapping: let go first
            mv.release()
        self._mv = []
        self._header = self.table = self._data = None  # type: ignore[assignment]
        self._state = self._holders = self._owners = self._flat = None  # type: ignore[assignment]
        self._slots = []
        try:
            self._mm.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes with it

    def unlink(self) -> None:
        try:
            os.unlink(SHM_DIR / self.name)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ slots
    @property
    def generation(self) -> int:
        return self._gen[0]

    def in_use(self) -> int:
        return int(np.count_nonzero(self._state == BUSY))

    def try_alloc(self, owner: int = 0) -> Slot | None:
        u32 = self._u32
        i = self._cursor
        if u32[8 * i] != FREE:  # the common case: the next slot in turn is free
            free = np.flatnonzero(self._state == FREE)
            if free.size == 0:
                return None
            after = free[free >= i]
            i = int(after[0] if after.size else free[0])
        self._cursor = (i + 1) % self.n_slots
        lease = (u32[8 * i + 1] + 1) & 0xFFFFFFFF or 1
        u32[8 * i + 1] = lease
        self._i32[8 * i + 2] = self._pid
        self._u64[4 * i + 2] = owner
        self._f64[4 * i + 3] = time.monotonic()
        u32[8 * i] = BUSY  # last: the slot is whole before anyone can see it busy
        return Slot(i, lease, self._slots[i])

    def alloc(self, owner: int = 0, timeout: float | None = 1.0) -> Slot:
        """Take a free slot, waiting up to ``timeout`` seconds (None: forever)."""
        slot = self.try_alloc(owner)
        if slot is not None:
            return slot
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0002
        while True:
            time.sleep(delay)
            delay = min(delay * 2, 0.005)
            slot = self.try_alloc(owner)
            if slot is not None:
                return slot
            if deadline is not None and time.monotonic() >= deadline:
                raise PoolFull(f"pool {self.name}: all {self.n_slots} slots busy",
                               pool=self.name, slots=self.n_slots)

    def release(self, index: int, lease: int) -> bool:
        """Give a slot back; False when the lease no longer matches (already reclaimed)."""
        if not self._busy(index, lease):
            return False
        self._u32[8 * index] = FREE
        return True

    def _busy(self, index: int, lease: int) -> bool:
        """Whether slot ``index`` is taken under ``lease`` (not freed, reclaimed or reused)."""
        return 0 <= index < self.n_slots and self._u32[8 * index + 1] == lease and self._u32[8 * index] == BUSY

    def owner_of(self, index: int) -> int:
        """The session tag a slot was taken for (0: none)."""
        return self._u64[4 * index + 2]

    def hold(self, index: int, lease: int, pid: int | None = None) -> bool:
        """Mark the slot as held by ``pid`` (the consumer), so its death frees it. False
        (nothing marked) when the reference is stale: the slot was freed (a dead
        producer's, reclaimed) or reused; its lease alone still matched a freed slot."""
        if not self._busy(index, lease):
            return False
        self._i32[8 * index + 2] = os.getpid() if pid is None else pid
        return True

    # ------------------------------------------------------------------ references
    def ref(self, slot: Slot, array: np.ndarray, device: str = "cpu") -> TensorRef:
        """The reference to ``array``, which must lie inside ``slot`` and be C-contiguous
        (a consumer's view of it is: a strided view would be read as if it were not)."""
        if not array.flags.c_contiguous:
            raise ValueError("only C-contiguous arrays can be handed over through a pool slot")
        off = array.__array_interface__["data"][0] - self._base - slot.index * self.slot_bytes
        if not 0 <= off <= self.slot_bytes - array.nbytes:
            raise ValueError("array does not lie inside the slot")
        return TensorRef(dtype=dtype_name(array.dtype), shape=tuple(array.shape), nbytes=array.nbytes,
                         pool=self.name, generation=self._gen[0], slot=slot.index,
                         offset=self._data_offset + slot.index * self.slot_bytes + off,
                         strides=tuple(array.strides), device=device, lease=slot.lease)

    def array(self, ref: TensorRef) -> np.ndarray:
        """A zero-copy view of the referenced tensor; refuses stale or out-of-range refs."""
        self.check(ref)
        base = ref.offset - self._data_offset
        start = base - ref.slot * self.slot_bytes
        if ref.nbytes > self.slot_bytes - start or start < 0:
            raise StaleReference("reference out of the slot's bounds")
        raw = self._flat[base:base + ref.nbytes]
        return (raw if ref.dtype == "uint8" else raw.view(ref.dtype)).reshape(ref.shape)

    def check(self, ref: TensorRef) -> None:
        if ref.generation != self._gen[0]:
            raise StaleReference(f"pool {self.name} is at generation {self.generation}, "
                                 f"reference has {ref.generation}")
        i = ref.slot
        if not 0 <= i < self.n_slots:
            raise StaleReference("no such slot")
        if not self._busy(i, ref.lease):
            raise StaleReference(f"slot {ref.slot} of {self.name} was released")

    # ------------------------------------------------------------------ supervisor side
    def reclaim(self, holder: int | None = None, owner: int | None = None,
                older_than: float | None = None) -> int:
        """Free busy slots held by a dead ``holder`` pid and/or owned by a closed session."""
        mask = self._state == BUSY
        if holder is not None:
            mask &= self._holders == holder
        if owner is not None:
            mask &= self._owners == owner
        if older_than is not None:
            mask &= self.table["stamp"] < time.monotonic() - older_than
        idx = np.flatnonzero(mask)
        self._state[idx] = FREE
        return int(idx.size)

    def reset(self) -> None:
        """New generation, every slot free: the producer restarted."""
        self._gen[0] = self.generation + 1
        self._state[:] = FREE

    def owned_by(self, owner: int) -> int:
        return int(np.count_nonzero((self._state == BUSY) & (self._owners == owner)))


def clean_stale(prefix: str = "giris-") -> list[str]:
    """Unlink pools left by supervisors that died without cleaning (SIGKILL).

    Pool names are ``giris-<pid>-<run>-<stage>``; a pool whose pid is no longer alive is
    stale.
    """
    removed = []
    for path in SHM_DIR.glob(prefix + "*"):
        if not left_by_the_dead(path.name):
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except OSError:
            pass
    return removed


def left_by_the_dead(name: str) -> bool:
    """Whether ``name`` is ``giris-<pid>-…`` of a process that is gone (not this one): what
    a supervisor makes carries its pid so a later start can tell what was left behind."""
    parts = name.split("-")
    if len(parts) < 3 or parts[0] != "giris" or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    return pid != os.getpid() and not pid_alive(pid)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
