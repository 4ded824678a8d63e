"""``python -m perf render``: frames/s through the runtime with 1, 2 and 4 sessions.

Throughput: every session says the same long text as an offline consumer (frames as
fast as they come); total frames / time from the first frame to the last. Jitter: the
same sessions live (``realtime=True``, paced to 25 FPS by the server); per session, the
p99 of |inter-frame interval − 40 ms| at the client. One server (real engines) for all.
The client is on the same host, so it reads frames zero-copy from the render pool (as a
local product would); ``--inline`` has every frame copied into its message instead, as a
remote client gets them.
"""
from __future__ import annotations

import argparse
import threading
import time

from perf.common import emit_json, machine, pct, table
from perf.server import BenchServer

LONG = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump. Sphinx of black quartz, judge my vow.")
SHORT = "The quick brown fox jumps over the lazy dog, twice."


def run_sessions(client, n: int, size: int, realtime: bool, text: str,
                 zero_copy: bool = True) -> tuple[list[list[float]], int]:
    from giris.runtime.client import Frame

    sessions = [client.open_session(size=size, realtime=realtime, want=["frames"], zero_copy=zero_copy)
                for _ in range(n)]
    for s in sessions:  # warm: the avatar is fitted, the first call is not timed
        for item in s.say("Hi."):
            if isinstance(item, Frame):
                item.release()
    stamps: list[list[float]] = [[] for _ in sessions]
    barrier = threading.Barrier(n)

    def consume(i: int) -> None:
        barrier.wait()
        for item in sessions[i].say(text, timeout=300):
            if isinstance(item, Frame):
                stamps[i].append(time.perf_counter())
                item.release()

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in sessions:
        s.close()
    return stamps, sum(len(x) for x in stamps)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf render")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--sessions", default="1,2,4")
    ap.add_argument("--config")
    ap.add_argument("--inline", action="store_true", help="frames as message bytes, not zero-copy")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    counts = [int(x) for x in args.sessions.split(",")]
    result: dict[str, dict[str, dict[str, float]]] = {}
    rows = [("size", "sessions", "frames/s total", "per session", "jitter p99 ms", "vs 1 session")]
    with BenchServer(args.config) as srv:
        for size in sizes:
            result[str(size)] = {}
            base = None
            for n in counts:
                stamps, total = run_sessions(srv.client, n, size, False, LONG, not args.inline)
                t_first = min(s[0] for s in stamps if s)
                t_last = max(s[-1] for s in stamps if s)
                fps = total / (t_last - t_first)
                live, _ = run_sessions(srv.client, n, size, True, SHORT, not args.inline)
                jit = [abs((b - a) - 0.04) * 1000 for s in live for a, b in zip(s, s[1:])]
                j99 = pct(jit, 99)
                base = base or fps
                result[str(size)][str(n)] = {"fps_total": fps, "jitter_p99_ms": j99}
                rows.append((f"{size}²", str(n), fps, fps / n, j99, f"{fps / base:.2f}×"))
    how = "frames inline in messages" if args.inline else "zero-copy frames"
    print(f"perf render — frames through the runtime, {how} ({machine()})")
    table(rows)
    print("goal: ≥ 100 frames/s total at 512² with 4 sessions, jitter p99 ≤ 10 ms")
    if args.json:
        emit_json(result)
    return 0
