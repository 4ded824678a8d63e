"""Sockets and tensors on the wire: send/receive Messages, resolve tensor references.

The only place that touches ZeroMQ frames for data; pools are looked up by name and
attached once per process (``PoolSet``), so a reference costs a dict lookup.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import zmq

from giris.runtime.errors import GirisError
from giris.runtime.protocol import Message, TensorRef, decode, encode
from giris.runtime.shm_pool import SlotPool


#: pyzmq copies frames under this size anyway; copy=False only pays off above it
ZERO_COPY_MIN = 64 * 1024


def send(sock: zmq.Socket, msg: Message, flags: int = 0) -> None:
    frames = encode(msg)
    if len(frames) == 1:  # a header alone (pool references): no multipart bookkeeping
        sock.send(frames[0], flags)
        return
    big = any(not isinstance(f, bytes) and memoryview(f).nbytes >= ZERO_COPY_MIN for f in frames[1:])
    sock.send_multipart(frames, flags=flags, copy=not big)


def recv(sock: zmq.Socket, max_bytes: int = 64 * 1024 * 1024, flags: int = 0) -> Message:
    """The header is received as bytes, inline buffers (if any) as zero-copy frames.

    ``recv_multipart`` costs ~3 µs more than one ``recv`` even for a one-frame message,
    and most hand-offs are one frame (tensors in pools)."""
    frames: list[Any] = [sock.recv(flags)]
    while sock.getsockopt(zmq.RCVMORE):  # the rest of a multipart message is already here
        frames.append(sock.recv(copy=False))
    return decode(frames, max_bytes=max_bytes)


def socket(ctx: zmq.Context, kind: int, linger: int = 0, **opts: Any) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, linger)
    for k, v in opts.items():
        s.setsockopt(getattr(zmq, k.upper()), v)
    return s


def ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


class PoolSet:
    """Pools this process has attached, by name (attach once, cache: mapping is not free)."""

    def __init__(self) -> None:
        self.pools: dict[str, SlotPool] = {}

    def add(self, pool: SlotPool) -> None:
        self.pools[pool.name] = pool

    def get(self, name: str) -> SlotPool:
        pool = self.pools.get(name)
        if pool is None:
            if not name.startswith("giris-"):
                raise GirisError(f"refusing to attach foreign pool {name!r}", code="bad_pool")
            pool = self.pools[name] = SlotPool.attach(name)
        return pool

    def array(self, msg: Message, ref: TensorRef) -> np.ndarray:
        if ref.pool is None:
            return msg.inline_array(ref)
        if ref.device != "cpu":
            raise GirisError(f"a {ref.device} tensor needs the CUDA pool", code="bad_pool")
        return self.get(ref.pool).array(ref)

    def arrays(self, msg: Message) -> list[np.ndarray]:
        return [self.array(msg, r) for r in msg.tensors]

    def release(self, ref: TensorRef) -> bool:
        if ref.pool is None:
            return False
        pool = self.pools.get(ref.pool)
        return bool(pool and pool.release(ref.slot, ref.lease))

    def release_all(self, msg: Message) -> None:
        for ref in msg.tensors:
            self.release(ref)

    def close(self) -> None:
        for p in self.pools.values():
            p.close()
        self.pools.clear()


def _runtime_root(base: str | None = None) -> str | None:
    import tempfile

    root = base or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return root if os.path.isdir(root) else None


def private_dir(base: str | None = None) -> str:
    """A fresh mode-0700 directory for ipc sockets (owner-only, so only we can connect),
    named ``giris-<pid>-…`` so that a later start can tell it was left by a dead process."""
    import tempfile

    path = tempfile.mkdtemp(prefix=f"giris-{os.getpid()}-", dir=_runtime_root(base))
    os.chmod(path, 0o700)
    return path


def clean_stale_dirs(base: str | None = None) -> list[str]:
    """Remove socket directories left by supervisors that died without cleaning (SIGKILL):
    ``giris-<pid>-…`` of ours whose pid is gone and that hold nothing but sockets."""
    import shutil
    import stat
    import tempfile

    from giris.runtime.shm_pool import left_by_the_dead

    root = _runtime_root(base) or tempfile.gettempdir()
    removed = []
    for entry in os.scandir(root):
        if not left_by_the_dead(entry.name):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat().st_uid != os.getuid():
                continue
            if not all(stat.S_ISSOCK(os.lstat(f.path).st_mode) for f in os.scandir(entry.path)):
                continue  # not only sockets: not a run dir of ours, leave it
            shutil.rmtree(entry.path)
            removed.append(entry.path)
        except OSError:
            continue
    return removed
