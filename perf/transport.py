"""``python -m perf transport``: hand one frame from one stage process to another.

Three ways, same run, same frames:

* ``pool``  Giris: the producer's frame lies in a shared-memory slot; a msgpack header
  with the tensor reference goes over ZeroMQ ipc (the project's own transport); the
  consumer maps a zero-copy view and releases the slot.
* ``zmq``   the frame's bytes sent over ZeroMQ ipc (``copy=False``) beside the header.
* ``queue`` the frame pickled through ``multiprocessing.Queue``.
* ``bare``  the header alone, no frame at all: the floor any ZeroMQ hand-off stands on.

Where CUDA and CuPy are present (or with ``--cuda``), two more, frame on the GPU at both
ends; the consumer's latency ends when its stream has the frame (a synchronize):

* ``cuda ipc``   Giris' CUDA pool: the slot's IPC event is recorded, the reference sent;
  the consumer (handles opened once, cached) waits on the event on its stream.
* ``cuda host``  copying through host memory: device → a CPU pool slot, the reference
  sent, the consumer uploads it to its device.

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
def _consumer(mode: str, run_dir: str, n: int, q: Any, ack_q: Any) -> None:
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
        if mode.startswith("cuda"):
            import cupy

            from giris.runtime.cuda_pool import CudaPoolCache

            gpu = CudaPoolCache()
            stream = cupy.cuda.get_current_stream()
        for _ in range(n):
            if mode.startswith("cuda"):
                msg = recv(sock)
                ref = msg.tensors[0]
                if mode == "cuda_ipc":  # ordered after the producer's writes
                    arr, owner = gpu.array(ref), gpu
                else:  # through host memory: upload
                    arr, owner = cupy.asarray(pools.array(msg, ref)), pools
                stream.synchronize()
                lat.append(time.perf_counter() - msg.meta["t"])
                del arr
                owner.release(ref)
            elif mode == "bare":
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
        if mode.startswith("cuda"):
            gpu.close()
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
    gpu_pool = device_frame = None
    if mode in ("pool", "cuda_host"):
        pool = SlotPool.create(f"giris-{os.getpid()}-bench-{mode}", frame.nbytes, 8)
        for i in range(pool.n_slots):  # the producer renders straight into its slots
            pool._data[i, :frame.nbytes] = frame.reshape(-1)
    if mode.startswith("cuda"):
        import cupy

        from giris.runtime.cuda_pool import CudaSlotPool

        device_frame = cupy.asarray(frame)
        if mode == "cuda_ipc":
            table = SlotPool.create(f"giris-{os.getpid()}-bench-{mode}", 64, 8)
            gpu_pool = CudaSlotPool(table, frame.nbytes)
            for _ in range(table.n_slots):  # rendered straight into the device slots
                slot, arr = gpu_pool.alloc(shape, np.uint8)
                arr[...] = device_frame
                table.release(slot.index, slot.lease)
            cupy.cuda.get_current_stream().synchronize()
    results = spawn.Queue()
    proc = spawn.Process(target=_consumer, args=(mode, run_dir, total, q, results))
    proc.start()
    try:
        t_start = 0.0
        for i in range(total):
            if i == warmup:
                t_start = time.perf_counter()
            if mode == "cuda_ipc":
                slot, arr = gpu_pool.alloc(shape, np.uint8, timeout=10)
                msg = P.Message(P.FRAME, seq=i, meta={"t": time.perf_counter()})
                msg.tensors.append(gpu_pool.publish(slot, arr))  # the slot's event, on our stream
                send(data, msg)
            elif mode == "cuda_host":
                slot = pool.alloc(timeout=10)
                view = slot.array[:frame.nbytes].reshape(shape)
                msg = P.Message(P.FRAME, seq=i, meta={"t": time.perf_counter()})
                device_frame.get(out=view)  # download (synchronous)
                msg.tensors.append(pool.ref(slot, view))
                send(data, msg)
            elif mode == "pool":
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
        if gpu_pool is not None:
            from giris.runtime.shm_pool import SHM_DIR

            gpu_pool.table.unlink()
            (SHM_DIR / f"{gpu_pool.name}.card").unlink(missing_ok=True)
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
    ap.add_argument("--cuda", action="store_true", help="also the GPU rows (an error without CUDA)")
    ap.add_argument("--cuda-only", action="store_true", help="the GPU rows alone")
    args = ap.parse_args(argv)
    from giris.runtime.cuda_pool import cuda_available

    gpu = args.cuda or args.cuda_only or cuda_available(ipc=True)
    if (args.cuda or args.cuda_only) and not cuda_available(ipc=True):
        print("perf transport: --cuda needs CUDA with IPC and CuPy (pip install 'giris[gpu]')")
        return 2
    ways = (() if args.cuda_only else ("pool", "zmq", "queue", "bare")) + (("cuda_ipc", "cuda_host") if gpu else ())
    result: dict[str, dict[str, float]] = {}
    rows = [("size", "way", "p50 µs", "p99 µs", "hand-offs/s", "p50 vs pool")]
    for shape in SIZES:
        key = _key(shape)
        modes = {}
        for mode in ways:
            n = args.n if mode != "queue" or shape[0] < 1000 else max(50, args.n // 3)
            modes[mode] = run_mode(mode, shape, n)
        base = modes["pool" if "pool" in modes else "cuda_ipc"]["p50_us"]
        for mode, r in modes.items():
            rows.append((key, mode.replace("_", " "), r["p50_us"], r["p99_us"], r["per_s"],
                         f"{r['p50_us'] / base:.1f}×"))
        result[key] = {}
        if "pool" in modes:
            result[key].update(pool_p50_us=modes["pool"]["p50_us"], pool_p99_us=modes["pool"]["p99_us"],
                               queue_p50_us=modes["queue"]["p50_us"], zmq_p50_us=modes["zmq"]["p50_us"],
                               pool_per_s=modes["pool"]["per_s"])
        if "cuda_ipc" in modes:
            result[key].update(cuda_ipc_p50_us=modes["cuda_ipc"]["p50_us"],
                               cuda_ipc_p99_us=modes["cuda_ipc"]["p99_us"],
                               cuda_host_p50_us=modes["cuda_host"]["p50_us"])
    print(f"perf transport — one frame between two processes ({machine()})")
    table(rows)
    small, big = result[_key(SIZES[0])], result[_key(SIZES[-1])]
    if "pool_p50_us" in big:
        print(f"pool 1080p / 256²: {big['pool_p50_us'] / small['pool_p50_us']:.2f}× (goal ≤ 2×); "
              f"queue / pool at 1080p: {big['queue_p50_us'] / big['pool_p50_us']:.0f}× (goal ≥ 200×)")
    if "cuda_ipc_p50_us" in big:
        print(f"GPU, 1080p: through host memory / CUDA IPC pool: "
              f"{big['cuda_host_p50_us'] / big['cuda_ipc_p50_us']:.1f}×")
    else:
        print("GPU rows: no CUDA here (they run where CUDA and CuPy are, or with --cuda)")
    if args.json:
        emit_json(result)
    return 0
