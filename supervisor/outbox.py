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
"""
from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import zmq

from giris.runtime import protocol as P
from giris.runtime.errors import GirisError

if TYPE_CHECKING:  # pragma: no cover
    from giris.supervisor.supervisor import Supervisor

log = logging.getLogger("giris.gateway")

#: messages ZeroMQ holds for one client before it counts as not reading (a second of
#: live frames and audio; the client's I/O thread takes them off at once while it runs)
CLIENT_HWM = 64
#: how often waiting messages are tried again
RETRY_S = 0.005

MEDIA = frozenset({P.AUDIO, P.COEFFS, P.FRAME})


class Outbox:
    def __init__(self, sup: "Supervisor", sock: zmq.Socket) -> None:
        self.sup, self.sock = sup, sock
        #: client -> [message, copy it out of its pool when it leaves, that copy once made]
        self.waiting: dict[bytes, deque[list[Any]]] = {}
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

    def flush(self) -> None:
        for client, q in list(self.waiting.items()):
            while q and self._send(client, q[0]):
                q.popleft()
            if not q:
                del self.waiting[client]

    def next_due(self) -> float:
        return RETRY_S if self.waiting else 1.0

    def describe(self) -> dict[str, int]:
        return {"clients_waiting": len(self.waiting),
                "messages_waiting": sum(len(q) for q in self.waiting.values()),
                "live_frames_dropped": self.dropped_frames}

    def forget(self, session: str) -> None:
        """A closed session's media still waiting go, their pool slots with them."""
        for q in self.waiting.values():
            keep = deque()
            for e in q:
                if e[0].session == session and e[0].type in MEDIA:
                    self.sup.pools.release_all(e[0])
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
