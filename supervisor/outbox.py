"""What the gateway sends each client, and what waits while a client is not reading.

ZeroMQ queues at most ``CLIENT_HWM`` messages for one client; past that the client counts
as not reading (stopped, suspended, on a slow link) and its messages wait here, in order,
tried again each turn of the supervisor's loop. A frame for a client that takes copies
(not zero-copy) is copied out of its pool slot only when it leaves, so one that waits
keeps its slot: the renderer then holds back that session alone (its share of the pool,
``session_slots``) and, after ``block_timeout``, fails its utterance with ``pool_full``.
Before, every frame was copied into ZeroMQ's queue at once with no bound but 10,000
messages: a client that stopped reading after three frames of a long text left the
supervisor holding the whole utterance (1.8 GB at 512², and its heap stayed that big). A
live frame that finds its client's queue full is dropped instead (late by then anyway).
When a session closes, its frames and audio still waiting here go; a client that went
away has everything of its own dropped at the first try.

What waits for one client is bounded (``CLIENT_BACKLOG_BYTES``, each message counted at
least ``MESSAGE_COST``), and what waits for all of them (``OUTBOX_BYTES``: past it, the
client with the most waiting): past it the client is not reading at all, and keeping its
answers only fed the supervisor's heap (a client saying long texts and reading nothing
grew it by 60 MB a second, one sending heartbeats without reading by 40 MB a second,
without end). Its sessions close, what waited for it goes, it is sent one error
(``limit_exceeded``) and a ``session_closed`` (``not_reading``) for each session, and,
until it has read those, its requests are dropped unread.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import zmq

from giris.runtime import protocol as P
from giris.runtime.errors import GirisError, LimitExceeded

if TYPE_CHECKING:  # pragma: no cover
    from giris.supervisor.supervisor import Supervisor

log = logging.getLogger("giris.gateway")

#: messages ZeroMQ holds for one client before it counts as not reading (a second of
#: live frames and audio; the client's I/O thread takes them off at once while it runs)
CLIENT_HWM = 64
#: how often waiting messages are tried again
RETRY_S = 0.005
#: what may wait for one client (its messages' buffers) before it is given up on ...
CLIENT_BACKLOG_BYTES = 64 * 1024 * 1024
#: ... each message counted at least this (a small reply costs the heap ~0.8 KiB) ...
MESSAGE_COST = 1024
#: ... and what may wait for every client together: past it, the client with the most
#: waiting is given up on (one bound per connection let many connections hold many times it)
OUTBOX_BYTES = 4 * CLIENT_BACKLOG_BYTES

MEDIA = frozenset({P.AUDIO, P.COEFFS, P.FRAME})


class Outbox:
    def __init__(self, sup: "Supervisor", sock: zmq.Socket) -> None:
        self.sup, self.sock = sup, sock
        #: client -> [message, copy it out of its pool when it leaves, that copy once made]
        self.waiting: dict[bytes, deque[list[Any]]] = {}
        #: client -> what waits for it, counted as CLIENT_BACKLOG_BYTES is
        self.backlog: dict[bytes, int] = {}
        self.total = 0  # (their sum)
        #: clients given up on: their requests are dropped until they read what waits
        self.stalled: set[bytes] = set()
        self.dropped_frames = 0

    def to(self, client: bytes, msg: P.Message, inline: bool = False, droppable: bool = False) -> None:
        """Send ``msg`` now, or keep it behind what already waits for ``client``.
        ``inline``: its pool tensors go as bytes, copied when it leaves (the slot held till
        then). ``droppable``: dropped rather than kept when it cannot leave now."""
        q = self.waiting.get(client)
        entry = [msg, inline, None]
        if q is None and self._send(client, entry):
            return
        if droppable:
            self.dropped_frames += 1
            self.sup.pools.release_all(msg)
            return
        if q is None:
            q = self.waiting[client] = deque()
            log.debug("client not reading: its messages wait", extra={"client": client.hex()[:8]})
        q.append(entry)
        self._charge(client, _cost(msg))
        if self.backlog[client] > CLIENT_BACKLOG_BYTES and client not in self.stalled:
            self._give_up(client)
        elif self.total > OUTBOX_BYTES:
            most = max((c for c in self.backlog if c not in self.stalled),
                       key=self.backlog.__getitem__, default=None)
            if most is not None:
                self._give_up(most)

    def _charge(self, client: bytes, n: int) -> None:
        """Count ``n`` more bytes (fewer, when negative) waiting for ``client``."""
        self.backlog[client] = self.backlog.get(client, 0) + n
        self.total += n

    def _give_up(self, client: bytes) -> None:
        """``client`` reads nothing: its sessions close, what waits for it goes, and one
        error tells it why (its requests are dropped until it has read what is left)."""
        waited = self.backlog[client]
        log.warning("client not reading: its sessions are closed", extra={
            "client": client.hex()[:8], "bytes_waiting": waited})
        self.stalled.add(client)
        recs = self.sup.registry.of_client(client)
        for rec in recs:
            self.sup.gateway.close_session(rec, reason="not_reading", notify=False)
        for e in self.waiting.pop(client, ()):
            self.sup.pools.release_all(e[0])
        err = LimitExceeded(f"{waited} bytes of answers waited for this client unread: its "
                            f"sessions are closed and its requests ignored until it reads this",
                            limit=CLIENT_BACKLOG_BYTES)
        self.sup.delivery.count_error(err.code)
        tell = [P.error(err)] + [P.event("session_closed", session=r.token, reason="not_reading")
                                 for r in recs]
        self.waiting[client] = deque([m, False, None] for m in tell)
        self._charge(client, MESSAGE_COST * len(tell) - self.backlog[client])

    def flush(self) -> None:
        for client, q in list(self.waiting.items()):
            while q and self._send(client, q[0]):
                self._charge(client, -_cost(q.popleft()[0]))
            if not q:
                del self.waiting[client]
                self.total -= self.backlog.pop(client, 0)
                self.stalled.discard(client)

    def next_due(self) -> float:
        return RETRY_S if self.waiting else 1.0

    def describe(self) -> dict[str, int]:
        return {"clients_waiting": len(self.waiting),
                "messages_waiting": sum(len(q) for q in self.waiting.values()),
                "live_frames_dropped": self.dropped_frames}

    def forget(self, session: str) -> None:
        """A closed session's media still waiting go, their pool slots with them."""
        for client, q in self.waiting.items():
            keep = deque()
            for e in q:
                if e[0].session == session and e[0].type in MEDIA:
                    self.sup.pools.release_all(e[0])
                    self._charge(client, -_cost(e[0]))
                else:
                    keep.append(e)
            q.clear()
            q.extend(keep)

    def copied(self, msg: P.Message) -> P.Message | None:
        """``msg`` with its pool tensors copied inline (its slots still held), or None when
        they cannot be read any more (the frame is lost: its slots are given back)."""
        try:
            arrays = self.sup.pools.arrays(msg)
        except GirisError as e:
            log.warning("frame lost", extra={"error": str(e)})
            self.sup.pools.release_all(msg)
            return None
        out = P.Message(msg.type, msg.session, msg.seq, msg.pts, msg.meta)
        for a in arrays:
            # A copy: zmq sends large frames from the caller's buffer later, on its own
            # thread, and the slot is free for the producer the moment it is released.
            out.add_inline(a.copy())
        return out

    def _send(self, client: bytes, entry: list[Any]) -> bool:
        """True when the message left (or can never leave: dropped); False when the
        client's queue is full."""
        msg, inline, out = entry
        if inline and out is None:
            out = self.copied(msg)
            if out is None:
                return True
            entry[2] = out  # made once, however often the client's queue is full
        try:
            self.sock.send_multipart([client, *P.encode(out or msg)], flags=zmq.DONTWAIT, copy=False)
        except zmq.Again:
            return False
        except zmq.ZMQError as e:  # EHOSTUNREACH: the client went away (the slots of its
            # zero-copy frames come back when its session closes)
            log.debug("client unreachable", extra={"error": str(e)})
        if inline:
            self.sup.pools.release_all(msg)
        return True


def _cost(msg: P.Message) -> int:
    """What ``msg`` counts against its client's backlog: its inline buffers (a pool
    frame's slot is bounded apart, by ``session_slots``), at least ``MESSAGE_COST``."""
    return max(MESSAGE_COST, sum(memoryview(b).nbytes for b in msg.buffers))
