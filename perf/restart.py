"""``python -m perf restart``: how long a session waits when a stage crashes.

For each stage of a running ``giris serve`` (default engines, or ``--config``; ``--stages``
to pick): SIGKILL its worker, then time until the supervisor has it ready again, and
until the first frame of a new request reaches the client. Two servers in the same run: workers forked from the launcher that
preloaded their engines (``server.launcher = "fork"``, the default) against fresh
interpreters (``"spawn"``, the baseline). Each stage is killed ``--repeat`` times (p50).
"""
from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time

from perf.common import emit_json, machine, pct, table
from perf.server import BenchServer

STAGES = ("tts", "coeffs", "motion", "render")


def _config(launcher: str, base: str | None = None) -> str:
    """A config file: ``base`` (a TOML file; default engines without one) with
    ``server.launcher`` set."""
    import re
    import tomllib

    text = open(base, encoding="utf-8").read() if base else ""
    server = tomllib.loads(text).get("server", {})
    if "launcher" in server:
        raise SystemExit("perf restart: the config sets server.launcher; the benchmark sets it")
    line = f'launcher = "{launcher}"\n'
    text, n = re.subn(r"(?m)^\[server\][ \t]*(?:\r?\n|\Z)", lambda m: m.group(0).rstrip() + "\n" + line,
                      text, count=1)
    if not n:
        text += f"\n[server]\n{line}"
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        raise SystemExit("perf restart: cannot add server.launcher to this config; give its "
                         "server settings as a [server] table") from None
    fd, path = tempfile.mkstemp(prefix="giris-restart-", suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def one_kill(srv: BenchServer, session, stage: str) -> tuple[float, float]:
    """(s until the stage is ready again, s until a new request's first frame)."""
    from giris.runtime.client import Frame

    pid = next(w["pid"] for w in srv.client.status()["workers"] if w["stage"] == stage)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    ready = None
    while ready is None:
        w = next(w for w in srv.client.status()["workers"] if w["stage"] == stage)
        if w["pid"] not in (pid, None) and w["state"] == "ready":
            ready = time.monotonic() - t0
        else:
            time.sleep(0.01)
    first = None
    for item in session.say("Back again.", timeout=60):
        if isinstance(item, Frame):
            if first is None:
                first = time.monotonic() - t0
            item.release()
    if first is None:
        raise RuntimeError("no frame after the restart")
    return ready, first


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf restart")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--config", help="server config (default engines otherwise), e.g. another tts engine")
    ap.add_argument("--stages", default=",".join(STAGES), help="stages to kill, comma-separated")
    args = ap.parse_args(argv)
    stages = [x for x in args.stages.split(",") if x]
    if not set(stages) <= set(STAGES):
        ap.error(f"--stages: choose among {', '.join(STAGES)}")
    result: dict[str, dict[str, dict[str, float]]] = {}
    for launcher in ("spawn", "fork"):
        config = _config(launcher, args.config)
        try:
            with BenchServer(config, log_level="ERROR") as srv:  # the kills are on purpose
                s = srv.client.open_session(size=args.size)
                list(s.say("Warm up."))
                for stage in stages:
                    runs = [one_kill(srv, s, stage) for _ in range(args.repeat)]
                    result.setdefault(stage, {})[launcher] = {
                        "ready_s": pct([r[0] for r in runs], 50), "first_frame_s": pct([r[1] for r in runs], 50)}
                s.close()
        finally:
            os.unlink(config)
    rows = [("stage", "spawn: ready s", "first frame s", "fork: ready s", "first frame s", "spawn / fork")]
    for stage in stages:
        a, b = result[stage]["spawn"], result[stage]["fork"]
        rows.append((stage, *(f"{x:.2f}" for x in (a["ready_s"], a["first_frame_s"], b["ready_s"],
                                                   b["first_frame_s"])),
                     f"{a['first_frame_s'] / b['first_frame_s']:.1f}×"))
    print(f"perf restart — SIGKILL of a stage → ready again, → first frame of a new request ({machine()})")
    table(rows)
    print("fork: workers forked from the launcher that preloaded their engines (the default); "
          "spawn: a fresh interpreter per worker")
    if args.json:
        emit_json(result)
    return 0
