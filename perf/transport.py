"""``python -m perf transport``: hand one frame from one stage process to another.

Three ways, same run, same frames:

* ``pool``  Giris: the producer's frame lies in a shared-memory slot; a msgpack header
  with the tensor reference goes over ZeroMQ ipc (the project's own transport); the
  consumer maps a zero-copy view and releases the slot.
* ``zmq``   the frame's bytes sent over ZeroMQ ipc (``copy=False``) beside the header.
* ``queue`` the frame pickled through ``multiprocessing.Queue``.
* ``bare``  the header alone, no frame at all: the floor any ZeroMQ hand-off stands on.

Latency is one-way (producer's send → consumer holding a numpy array), one frame in
flight at a time (the consumer acks each), on the shared monotonic clock. Hand-offs/s is
that ping-pong's rate.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from typing import Any

import numpy as np
import zmq

from perf.common import emit_json, machine, pct, table

SIZES = [(256, 256, 3), (512, 512, 3), (1080, 1920, 3)]


def _key(shape: tuple[int, int, int]) -> str:
    h, w, c = shape
    return f"{w}x{h}x{c}"


# ---------------------------------------------------------------------- consumer side
def _consumer(mode: str, run_dir: str, pool_name: str | None, n: int, q: Any, ack_q: Any) -> None:
    from giris.runtime import protocol as P
    from giris.runtime.transport import PoolSet, recv

    ctx = zmq.Context()
    ack = ctx.socket(zmq.PUSH)
    ack.connect(f"ipc://{run_dir}/ack.sock")
    lat = []
    if mode == "queue":
        for _ in range(n):
            t0, frame = q.get()
            _ = frame[0, 0, 0]
            lat.append(time.perf_counter() - t0)
            ack.send(b"")
    else:
        sock = ctx.socket(zmq.PULL)
        sock.connect(f"ipc://{run_dir}/data.sock")
        pools = PoolSet()
        for _ in range(n):
            if mode == "bare":
                msg = recv(sock)
                lat.append(time.perf_counter() - msg.meta["t"])
            elif mode == "pool":
                msg = recv(sock)
                arr = pools.array(msg, msg.tensors[0])
                _ = arr[0, 0, 0]
                lat.append(time.perf_counter() - msg.meta["t"])
                pools.release(msg.tensors[0])
            else:
                frames = sock.recv_multipart(copy=False)
                msg = P.decode(frames[:1])
                arr = np.frombuffer(frames[1].buffer, np.uint8).reshape(msg.meta["shape"])
                _ = arr[0, 0, 0]
                lat.append(time.perf_counter() - msg.meta["t"])
            ack.send(b"")
        pools.close()
        sock.close(0)
    ack_q.put(lat)
    ack.close(0)
    ctx.term()


# ---------------------------------------------------------------------- producer side
def run_mode(mode: str, shape: tuple[int, int, int], n: int, warmup: int = 20) -> dict[str, float]:
    from giris.runtime import protocol as P
    from giris.runtime.shm_pool import SlotPool
    from giris.runtime.transport import private_dir, send

    run_dir = private_dir()
    spawn = mp.get_context("spawn")
    ctx = zmq.Context()
    ack = ctx.socket(zmq.PULL)
    ack.bind(f"ipc://{run_dir}/ack.sock")
    data = q = pool = None
    frame = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    total = n + warmup
    if mode == "queue":
        q = spawn.Queue(maxsize=4)
    else:
        data = ctx.socket(zmq.PUSH)
        data.bind(f"ipc://{run_dir}/data.sock")
    if mode == "pool":
        pool = SlotPool.create(f"giris-{os.getpid()}-bench-{mode}", frame.nbytes, 8)
        for i in range(pool.n_slots):  # the producer renders straight into its slots
            pool._data[i, :frame.nbytes] = frame.reshape(-1)
    results = spawn.Queue()
    proc = spawn.Process(target=_consumer, args=(mode, run_dir, pool.name if pool else None, total, q, results))
    proc.start()
    try:
        t_start = 0.0
        for i in range(total):
            if i == warmup:
                t_start = time.perf_counter()
            if mode == "pool":
                slot = pool.alloc(timeout=10)
                view = slot.array[:frame.nbytes].reshape(shape)
                msg = P.Message(P.FRAME, seq=i, meta={"t": time.perf_counter()})
                msg.tensors.append(pool.ref(slot, view))
                send(data, msg)
            elif mode == "bare":
                send(data, P.Message(P.FRAME, seq=i, meta={"t": time.perf_counter()}))
            elif mode == "zmq":
                msg = P.Message(P.FRAME, seq=i, meta={"t": time.perf_counter(), "shape": list(shape)})
                data.send_multipart([P.encode(msg)[0], frame], copy=False)
            else:
                q.put((time.perf_counter(), frame))
            if not ack.poll(30000):
                raise RuntimeError(f"{mode}: consumer stopped answering")
            ack.recv()
        elapsed = time.perf_counter() - t_start
        lat = results.get(timeout=60)[warmup:]
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        if pool is not None:
            pool.unlink()
            pool.close()
        for s in (ack, data):
            if s is not None:
                s.close(0)
        ctx.term()
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
    us = [x * 1e6 for x in lat]
    return {"p50_us": pct(us, 50), "p99_us": pct(us, 99), "per_s": n / elapsed}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf transport")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-n", type=int, default=300, help="hand-offs per mode and size")
    args = ap.parse_args(argv)
    result: dict[str, dict[str, float]] = {}
    rows = [("size", "way", "p50 µs", "p99 µs", "hand-offs/s", "p50 vs pool")]
    for shape in SIZES:
        key = _key(shape)
        modes = {}
        for mode in ("pool", "zmq", "queue", "bare"):
            n = args.n if mode != "queue" or shape[0] < 1000 else max(50, args.n // 3)
            modes[mode] = run_mode(mode, shape, n)
        base = modes["pool"]["p50_us"]
        for mode, r in modes.items():
            rows.append((key, mode, r["p50_us"], r["p99_us"], r["per_s"], f"{r['p50_us'] / base:.1f}×"))
        result[key] = {"pool_p50_us": modes["pool"]["p50_us"], "pool_p99_us": modes["pool"]["p99_us"],
                       "queue_p50_us": modes["queue"]["p50_us"], "zmq_p50_us": modes["zmq"]["p50_us"],
                       "pool_per_s": modes["pool"]["per_s"]}
    print(f"perf transport — one frame between two processes ({machine()})")
    table(rows)
    small, big = result[_key(SIZES[0])], result[_key(SIZES[-1])]
    print(f"pool 1080p / 256²: {big['pool_p50_us'] / small['pool_p50_us']:.2f}× (goal ≤ 2×); "
          f"queue / pool at 1080p: {big['queue_p50_us'] / big['pool_p50_us']:.0f}× (goal ≥ 200×)")
    if args.json:
        emit_json(result)
    return 0
