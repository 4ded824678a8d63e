"""``python -m perf ttff``: time to first frame, streaming vs batch, same run, same server.

Request sent → first rendered frame at the client, through a running ``giris serve``
(real Piper → visemes → motion → warp renderer, client over ipc). Streaming is the
product: the first clause is synthesized, animated and rendered while the rest is still
being spoken. The batch baseline synthesizes the whole text, then computes all
coefficients, then renders (``say(..., batch=True)``); its first frame is counted, which
flatters batch (a classic offline pipeline hands out nothing before the last frame: that
time is shown too, as ``batch_last_p50_ms``).
Each utterance is cancelled once its first frame is in, and the next one is sent after a
short pause (``--settle``, 0.3 s), so each request meets an idle runtime (a cancel lands
between two chunks: without the pause a request would also wait for the chunk the voice
was synthesizing when the previous one was cancelled).
The streaming requests are traced (``say(..., trace=True)``): a second table shows where
their first frames spent the time, hop by hop (p50 of each hop; they need not add up to
the p50 of the whole).
"""
from __future__ import annotations

import argparse
import time

from perf.common import emit_json, machine, pct, table
from perf.server import BenchServer

TEXTS = [
    "Hello there, and welcome to the show.",
    "Good morning, everyone. Today we talk about real-time avatars.",
    "I can hear you clearly. Let me think about that for a moment. Here is what I found.",
    "Thank you for waiting, it took a while. The weather will be sunny tomorrow. "
    "Rain comes back on Friday. Bring an umbrella just in case.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman. "
    "Every morning he rowed out before dawn. He knew every rock and every current. "
    "One day the sea was strangely calm. He cast his net and waited.",
]


def first_frame_ms(session, text: str, batch: bool, settle: float = 0.3,
                   traces: list | None = None) -> tuple[float, float, float]:
    """(ms to the first frame, ms to the last, ms to the first audio chunk): a streaming
    request is cancelled at its first frame (its last is not needed), a batch one runs to
    the end. With ``traces``, the request is traced and its first frame's stamps go there."""
    from giris.runtime.client import AudioChunk, Event, Frame

    t0 = time.perf_counter()
    utt = session.start_say(text, batch=batch, trace=traces is not None)
    first = last = audio = None
    for item in session.stream(utt, timeout=120):
        if isinstance(item, AudioChunk) and audio is None:
            audio = (time.perf_counter() - t0) * 1000
        if isinstance(item, Frame):
            last = (time.perf_counter() - t0) * 1000
            if first is None:
                first = last
                if traces is not None and item.trace:
                    traces.append(item.trace)
                if not batch:
                    session.cancel(utt)
            item.release()
        elif isinstance(item, Event) and item.kind == "utterance_done":
            break
    if first is None or last is None or audio is None:
        raise RuntimeError("no frame came back")
    time.sleep(settle)
    return first, last, audio


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf ttff")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--config", help="server config (default engines otherwise)")
    ap.add_argument("--settle", type=float, default=0.3, help="pause between requests, s")
    args = ap.parse_args(argv)
    stream: list[float] = []
    voice: list[float] = []
    traces: list[list] = []  # the streaming requests' first frames' stamps
    batch: list[float] = []
    batch_all: list[float] = []
    rows = [("sentences", "stream p50 ms", "(first audio)", "batch p50 ms", "batch / stream",
             "batch last frame ms")]
    with BenchServer(args.config) as srv:
        s = srv.client.open_session(size=args.size)
        first_frame_ms(s, "Warm up.", False)  # the session's first request is not timed
        for n, text in enumerate(TEXTS, 1):
            st, sa, bt, ba = [], [], [], []
            for _ in range(args.repeat):
                frame, _, audio = first_frame_ms(s, text, False, args.settle, traces)
                st.append(frame)
                sa.append(audio)
                first, last, _ = first_frame_ms(s, text, True, args.settle)
                bt.append(first)
                ba.append(last)
            stream += st
            voice += sa
            batch += bt
            batch_all += ba
            rows.append((str(n), pct(st, 50), pct(sa, 50), pct(bt, 50), f"{pct(bt, 50) / pct(st, 50):.1f}×",
                         pct(ba, 50)))
        s.close()
    res = {"stream_p50_ms": pct(stream, 50), "stream_p95_ms": pct(stream, 95),
           "batch_p50_ms": pct(batch, 50), "batch_p95_ms": pct(batch, 95),
           "batch_last_p50_ms": pct(batch_all, 50), "stream_audio_p50_ms": pct(voice, 50)}
    rows.append(("all p50", res["stream_p50_ms"], res["stream_audio_p50_ms"], res["batch_p50_ms"],
                 f"{res['batch_p50_ms'] / res['stream_p50_ms']:.1f}×", res["batch_last_p50_ms"]))
    rows.append(("all p95", res["stream_p95_ms"], pct(voice, 95), res["batch_p95_ms"],
                 f"{res['batch_p95_ms'] / res['stream_p95_ms']:.1f}×", pct(batch_all, 95)))
    print(f"perf ttff — request → first {args.size}² frame at the client ({machine()})")
    table(rows)
    print("goal: batch/stream ≥ 10×, stream p50 ≤ 100 ms (batch counted at its first frame; "
          "the last column is when a batch system would hand over a finished video)")
    hops = time_line(traces)
    if hops:
        print("where a streaming request's first frame spends its time (stamps in each process, p50 ms):")
        table([("from", "to", "p50 ms")] + [(a, b, ms) for a, b, ms in hops])
        res["hops_p50_ms"] = {f"{a} → {b}": ms for a, b, ms in hops}
    if args.json:
        emit_json(res)
    return 0


def time_line(traces: list[list]) -> list[tuple[str, str, float]]:
    """Median ms between consecutive stamps, over requests with the same stamps."""
    if not traces:
        return []
    names = [w for w, _ in traces[0]]
    same = [t for t in traces if [w for w, _ in t] == names]
    return [(names[i], names[i + 1], pct([(t[i + 1][1] - t[i][1]) * 1000 for t in same], 50))
            for i in range(len(names) - 1)]
