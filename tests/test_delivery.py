"""The supervisor's delivery step in-process (no server): what reaches a client, and
what happens to the pool slots of frames on their way."""
from __future__ import annotations

import os
import time
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import pytest

from giris.runtime import protocol as P
from giris.runtime.shm_pool import SlotPool
from giris.runtime.transport import PoolSet
from giris.supervisor.delivery import Delivery
from giris.supervisor.sessions import SessionRecord, SessionRegistry, Utterance

RENDER_PID = 999_999  # a renderer that is not this process (and has died)


@pytest.fixture
def pools() -> Iterator[PoolSet]:
    ps = PoolSet()
    ps.add(SlotPool.create(f"giris-{os.getpid()}-deliv{time.monotonic_ns()}", 64 * 64 * 3, 8))
    yield ps
    for p in ps.pools.values():
        p.unlink()
    ps.close()


def _delivery(pools: PoolSet, **spec: Any) -> tuple[Delivery, SessionRecord, list[P.Message]]:
    """A Delivery over one open offline session whose utterance 1 is in flight; the list
    collects what goes to its client."""
    sent: list[P.Message] = []
    registry = SessionRegistry({})
    rec = SessionRecord(token="tok", client=b"c", user=None, estimate={},
                        spec={"want": ["audio", "frames"], "fps": 25, **spec}, avatar=None)
    now = time.monotonic()
    rec.utterances[1] = Utterance(id=1, said_at=now, last_progress=now)
    registry.add(rec)
    gateway = SimpleNamespace(to=lambda client, msg, inline=False, droppable=False: sent.append(msg),
                              stop_stages=lambda rec, utt: None)
    sup = SimpleNamespace(registry=registry, pools=pools, gateway=gateway, metrics=None,
                          offers=lambda: ["audio", "coeffs", "frames"])
    return Delivery(sup), rec, sent  # type: ignore[arg-type]


def _frame(pool: SlotPool, rec: SessionRecord, seq: int) -> P.Message:
    """A frame as the renderer (pid RENDER_PID) sends it: in a slot it holds."""
    slot = pool.alloc(owner=rec.tag)
    pool.hold(slot.index, slot.lease, pid=RENDER_PID)
    image = slot.array[:64 * 64 * 3].reshape(64, 64, 3)
    image[...] = seq
    msg = P.Message(P.FRAME, session=rec.token, seq=seq, meta={"utterance": 1, "final": False})
    msg.tensors.append(pool.ref(slot, image))
    return msg


def test_a_frame_of_a_dead_renderer_reclaimed_on_its_way_is_dropped_not_sent(pools):
    """Zero-copy: a frame the renderer sent just before it died, read from the sink after
    the supervisor reclaimed its slots, was held (``hold`` checked the lease, not that the
    slot was free) and sent: the client's read raised ``StaleReference`` out of the user's
    loop. It is dropped now, and not counted among the utterance's frames."""
    (pool,) = pools.pools.values()
    d, rec, sent = _delivery(pools, zero_copy=True)
    kept, lost = _frame(pool, rec, 0), _frame(pool, rec, 1)
    d.on_result(kept)  # came before the renderer died
    assert pool.reclaim(holder=RENDER_PID) == 1  # the supervisor saw it die (on_worker_exit)
    d.on_result(lost)  # still in the sink then
    assert [m.seq for m in sent] == [0]
    assert rec.utterances[1].frames == 1 and d.frames_out == 1
    assert pool.in_use() == 1  # the client's frame 0 only
    # and a stale reference is never marked held
    assert not pool.hold(lost.tensors[0].slot, lost.tensors[0].lease, pid=0)


def test_the_final_frame_lost_with_its_renderer_still_ends_the_utterance(pools):
    (pool,) = pools.pools.values()
    d, rec, sent = _delivery(pools, zero_copy=True)
    rec.utterances[1].finals = {P.AUDIO, P.COEFFS}
    last = _frame(pool, rec, 0)
    last.meta.update(final=True, end=True)
    pool.reclaim(holder=RENDER_PID)
    d.on_result(last)
    assert [(m.type, m.meta.get("kind"), m.meta.get("frames")) for m in sent] == [
        (P.EVENT, "utterance_done", 0)]
    assert np.count_nonzero(pool.table["state"]) == 0


def test_a_frame_waiting_for_a_slow_client_outlives_its_renderer(pools):
    """A copy-taking client slow to read: its frames wait in the outbox, in their slots
    (copied when they leave). The renderer that made them dying meanwhile took those
    slots with it (reclaimed by holder pid), and the frames were lost though counted in
    ``utterance_done``. The supervisor holds a frame's slots from its arrival now."""
    (pool,) = pools.pools.values()
    d, rec, sent = _delivery(pools)
    waiting = _frame(pool, rec, 0)
    d.on_result(waiting)  # into the outbox (the stub keeps it, as a full client queue does)
    assert sent == [waiting]
    assert pool.reclaim(holder=RENDER_PID) == 0  # the renderer dies
    assert int(pools.arrays(waiting)[0][0, 0, 0]) == 0  # still readable: it leaves whole
    pools.release_all(waiting)  # as the outbox does once it left
    assert pool.in_use() == 0
