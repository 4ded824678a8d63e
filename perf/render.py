"""``python -m perf render``: frames/s through the runtime with 1, 2 and 4 sessions.

Throughput: every session says the same long text as an offline consumer (frames as
fast as they come); total frames / time from the first frame to the last. Jitter: the
same sessions live (``realtime=True``, paced to 25 FPS by the server); per session, the
p99 of |inter-frame interval − 40 ms| at the client. One server (real engines) for all.
The client is on the same host, so it reads frames zero-copy from the render pool (as a
local product would); ``--inline`` has every frame copied into its message instead, as a
remote client gets them.

``--upstream test``: the renderer fed by the small test engines (a tone per word, jaw
from loudness) instead of Piper, visemes and motion: the render stage alone is measured,
and a host needs neither Piper nor dlib (the bundled avatar's points ship with it), e.g. a
GPU host: ``--upstream test --device cuda:0``.

``--capacity``: how many live sessions hold 25 FPS at each size: 1, 2, 4, … live
sessions at once (doubling, then bisecting), a count *holds* when every session gets
its frames at ≥ 24.5 FPS with inter-frame jitter p99 ≤ 10 ms.
"""
from __future__ import annotations

import argparse
import threading
import time

from giris.runtime.errors import GirisError
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
    ap.add_argument("--capacity", action="store_true", help="live sessions that hold 25 FPS, per size")
    ap.add_argument("--upstream", choices=["real", "test"], default="real",
                    help="what feeds the renderer: the default engines, or the small test engines")
    ap.add_argument("--device", help="the render stage's device (cpu, cuda:0); with --upstream test")
    ap.add_argument("--max-sessions", type=int, default=64)
    args = ap.parse_args(argv)
    if args.upstream == "test":
        args.config = render_only_config(args.device or "cpu")
    elif args.device:
        ap.error("--device goes with --upstream test (or set it in a --config)")
    if args.capacity:
        return capacity(args)
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


def holds(stamps: list[list[float]]) -> tuple[bool, float, float]:
    """(every live session at ≥ 24.5 FPS with jitter p99 ≤ 10 ms, worst FPS, worst p99)."""
    rates, p99s = [], []
    for s in stamps:
        if len(s) < 3:
            return False, 0.0, float("inf")
        rates.append((len(s) - 1) / (s[-1] - s[0]))
        p99s.append(pct([abs((b - a) - 0.04) * 1000 for a, b in zip(s, s[1:])], 99))
    worst_fps, worst_p99 = min(rates), max(p99s)
    return worst_fps >= 24.5 and worst_p99 <= 10.0, worst_fps, worst_p99


def capacity(args: argparse.Namespace) -> int:
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = [("size", "live sessions", "holds 25 FPS", "worst FPS", "worst jitter p99 ms")]
    result: dict[str, int] = {}
    with BenchServer(args.config) as srv:
        for size in sizes:
            tried: dict[int, bool] = {}

            def trial(n: int) -> bool:
                try:
                    stamps, _ = run_sessions(srv.client, n, size, True, SHORT, not args.inline)
                except GirisError as e:  # a limit of the server's, or its memory: not held
                    rows.append((f"{size}²", str(n), f"no ({e.code})", "-", "-"))
                    tried[n] = False
                    return False
                ok, fps, p99 = holds(stamps)
                rows.append((f"{size}²", str(n), "yes" if ok else "no", fps, p99))
                tried[n] = ok
                return ok

            good, n = 0, 1
            while n <= args.max_sessions and trial(n):
                good, n = n, n * 2
            bad = n if n <= args.max_sessions else None
            while bad is not None and bad - good > 1:  # bisect between the last good and bad
                mid = (good + bad) // 2
                if trial(mid):
                    good = mid
                else:
                    bad = mid
            result[str(size)] = good
    print(f"perf render --capacity — live sessions holding 25 FPS ({machine()})")
    table(rows)
    print("  ".join(f"{s}²: {n} session(s)" for s, n in result.items()))
    if args.json:
        emit_json({"capacity": result})
    return 0


def render_only_config(device: str) -> str:
    """A config whose renderer is fed by the test engines (written to a private file)."""
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix="giris-render-only-", suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write(f"""[limits]
max_sessions = 128
max_sessions_per_client = 128

[stages.tts]
engine = "test-source"
options = {{ word_s = 0.2 }}

[stages.coeffs]
engine = "test-relay"

[stages.motion]
engine = "test-relay"

[stages.render]
engine = "warp"
device = "{device}"
pool_slots = 64
pool_slot_bytes = "3MiB"
""")
    return path

