"""Shared-memory slot pools: allocation, backpressure, leases, reclaim, no tracker games."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from giris.runtime.shm_pool import SHM_DIR, PoolFull, SlotPool, StaleReference, clean_stale


@pytest.fixture
def pool():
    p = SlotPool.create(f"giris-{os.getpid()}-test{time.monotonic_ns()}", 1024, 4)
    yield p
    p.unlink()
    p.close()


def test_alloc_write_read_through_a_second_mapping(pool):
    slot = pool.alloc(owner=5)
    arr = slot.array[:300].view(np.uint8).reshape(10, 10, 3)
    arr[:] = 7
    ref = pool.ref(slot, arr)
    other = SlotPool.attach(pool.name)
    seen = other.array(ref)
    assert seen.shape == (10, 10, 3) and int(seen.sum()) == 7 * 300
    assert not seen.flags.owndata  # zero-copy view
    assert other.release(ref.slot, ref.lease)
    assert pool.in_use() == 0
    other.close()


def test_backpressure_blocks_then_raises(pool):
    for _ in range(4):
        pool.alloc()
    t = time.monotonic()
    with pytest.raises(PoolFull):
        pool.alloc(timeout=0.1)
    assert 0.09 <= time.monotonic() - t < 1.0
    assert pool.try_alloc() is None


def test_stale_lease_is_refused_and_double_release_is_harmless(pool):
    slot = pool.alloc()
    ref = pool.ref(slot, slot.array[:8])
    assert pool.release(slot.index, slot.lease)
    assert not pool.release(slot.index, slot.lease)
    with pytest.raises(StaleReference):
        pool.array(ref)
    again = pool.alloc()
    assert not pool.release(again.index, again.lease - 1)  # an older lease frees nothing
    assert pool.in_use() == 1


def test_reset_makes_old_generation_stale(pool):
    slot = pool.alloc()
    ref = pool.ref(slot, slot.array[:8])
    pool.reset()
    with pytest.raises(StaleReference):
        pool.array(ref)


def test_reclaim_by_dead_holder_and_by_session_owner(pool):
    a = pool.alloc(owner=1)
    b = pool.alloc(owner=2)
    pool.hold(b.index, b.lease, pid=424242)
    assert pool.reclaim(holder=424242) == 1
    assert pool.owned_by(1) == 1
    assert pool.reclaim(owner=1) == 1
    assert pool.in_use() == 0 and a.index != b.index


def test_slot_records_seen_alike_by_every_mapping(pool):
    """The hand-off path writes the slot table through typed views; the supervisor reads it
    as columns: both must agree field by field."""
    t0 = time.monotonic()
    a = pool.alloc(owner=(1 << 62) + 3)
    other = SlotPool.attach(pool.name)
    rec = other.table[a.index]
    assert (int(rec["state"]), int(rec["lease"]), int(rec["holder"])) == (1, a.lease, os.getpid())
    assert int(rec["owner"]) == (1 << 62) + 3 == other.owner_of(a.index)
    assert t0 <= float(rec["stamp"]) <= time.monotonic()
    other.hold(a.index, a.lease, pid=777)
    assert int(pool.table[a.index]["holder"]) == 777
    assert pool.reclaim(older_than=3600) == 0 and pool.reclaim(holder=777) == 1
    pool.reset()
    assert other.generation == 2
    other.close()


def test_close_unmaps_the_segment(pool):
    other = SlotPool.attach(pool.name)
    slot = other.alloc()
    other.release(slot.index, slot.lease)
    del slot
    other.close()
    with open("/proc/self/maps") as f:
        maps = f.read().count(pool.name)
    assert maps == 1  # the fixture's own mapping only


def test_a_view_kept_after_close_keeps_its_memory(pool):
    """A consumer may hold a frame past its pool's close (a zero-copy Frame kept after the
    client closed): the view must keep the mapping, not read unmapped memory (SIGSEGV).
    In a child process, so a crash fails the test instead of the run."""
    code = f"""
import numpy as np
from giris.runtime.shm_pool import SlotPool
pool = SlotPool.attach({pool.name!r})
slot = pool.alloc()
view = slot.array[:300].reshape(10, 10, 3)
view[:] = 9
again = pool.array(pool.ref(slot, view))
del slot
pool.close()
print(int(view.sum()), int(again.sum()))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.split() == [str(9 * 300)] * 2


def test_ref_outside_slot_is_rejected(pool):
    slot = pool.alloc()
    with pytest.raises(ValueError):
        pool.ref(slot, np.zeros(4, np.uint8))
    with pytest.raises(ValueError):  # strided: a consumer would read it as if it were not
        pool.ref(slot, slot.array[:64].reshape(8, 8)[:, ::2])


def test_an_unrelated_process_attaching_never_unlinks_or_warns(pool):
    code = ("from giris.runtime.shm_pool import SlotPool; p = SlotPool.attach(%r); "
            "s = p.alloc(); p.release(s.index, s.lease)" % pool.name)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "leaked" not in r.stderr and "resource_tracker" not in r.stderr
    assert (SHM_DIR / pool.name).exists()


def test_clean_stale_removes_pools_of_dead_supervisors():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = SlotPool.create(f"giris-{dead.pid}-abc-render", 64, 1)
    stale.close()
    mine = SlotPool.create(f"giris-{os.getpid()}-abc-render", 64, 1)
    try:
        removed = clean_stale()
        assert stale.name in removed
        assert not (SHM_DIR / stale.name).exists()
        assert (SHM_DIR / mine.name).exists()
    finally:
        mine.unlink()
        mine.close()
