"""``giris``: say (text → MP4), serve (the server), status, keys, bench."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import zmq

from giris.runtime.config import Config, default_endpoint, load
from giris.runtime.errors import GirisError
from giris.runtime.logs import setup_logging

log = logging.getLogger("giris.cli")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parser() -> argparse.ArgumentParser:
    """The command line, apart from running it: the README's examples are checked against it."""
    p = argparse.ArgumentParser(prog="giris", description="Real-time talking-avatar runtime.")
    p.add_argument("--log-level", default=os.environ.get("GIRIS_LOG_LEVEL") or "WARNING",
                   type=str.upper, choices=LOG_LEVELS, help="default: $GIRIS_LOG_LEVEL or WARNING")
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("say", help="speak TEXT with the avatar and write an MP4")
    s.add_argument("text")
    s.add_argument("-o", "--output", default="giris.mp4")
    s.add_argument("--avatar", help="portrait image path, or a bundled avatar name")
    s.add_argument("--emotion")
    s.add_argument("--intensity", type=float)
    s.add_argument("--voice", help="voice name or .onnx path")
    s.add_argument("--rate", type=float, help="speaking rate (1.0 normal)")
    s.add_argument("--size", type=int)
    s.add_argument("--fps", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--coeffs", help="also write the coefficient stream (CSV)")
    s.add_argument("--connect", help="use a running server at this endpoint instead of embedding")
    s.add_argument("--server-key", help="server public key file (tcp with CURVE)")
    s.add_argument("--client-key", help="client key file (tcp with CURVE)")
    s.add_argument("--config", help="TOML config for the embedded runtime")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--trace", action="store_true",
                   help="add where the first frame spent its time (ms per hop) to the summary")

    v = sub.add_parser("serve", help="run the server in the foreground")
    v.add_argument("--config")
    v.add_argument("--endpoint", help="ipc://PATH or tcp://HOST:PORT (overrides the config)")
    v.add_argument("--insecure", action="store_true", help="allow tcp without CURVE (not advised)")
    v.add_argument("--metrics-port", type=int, help="Prometheus port on the metrics host (0 = off)")

    st = sub.add_parser("status", help="workers, sessions and budgets of a running server")
    st.add_argument("--endpoint", default=None)
    st.add_argument("--server-key")
    st.add_argument("--client-key")
    st.add_argument("--json", action="store_true")
    st.add_argument("--timeout", type=float, default=5.0)

    k = sub.add_parser("keys", help="generate a CURVE key pair")
    k.add_argument("--dir", default=".")
    k.add_argument("--name", default="giris")
    k.add_argument("--force", action="store_true", help="replace existing files")

    b = sub.add_parser("bench", help="run a benchmark from perf/ (from the repo root)")
    b.add_argument("name")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.log_level not in LOG_LEVELS:  # argparse checks a flag's value, not its default
        p.error(f"GIRIS_LOG_LEVEL: invalid choice: {args.log_level!r} (choose from {', '.join(LOG_LEVELS)})")
    setup_logging(args.log_level, args.log_json)
    try:
        return {"say": cmd_say, "serve": cmd_serve, "status": cmd_status, "keys": cmd_keys,
                "bench": cmd_bench}[args.cmd](args)
    except GirisError as e:
        _fail(args, str(e), e.code)
        return 2
    except KeyboardInterrupt:
        return 130
    except Interrupted as e:
        return 128 + e.signum
    except BrokenPipeError:  # `giris status | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141
    except (OSError, ValueError, zmq.ZMQError) as e:  # a file, a config value, an endpoint
        log.debug("failed", exc_info=True)
        _fail(args, _said(e), None)
        return 2


def _fail(args: argparse.Namespace, text: str, code: str | None) -> None:
    """The command's last line when it fails (the journal's last line of a failed start
    was plain text under ``--log-json``)."""
    _line(args, "error", text, f"giris: error [{code}]: {text}" if code else f"giris: error: {text}",
          **({"code": code} if code else {}))


def _line(args: argparse.Namespace, level: str, event: str, plain: str, **fields: Any) -> None:
    """A line the command says whatever the log level (where it serves, why it failed):
    ``plain`` for a person, or under ``--log-json`` a JSON object like every log line."""
    if getattr(args, "log_json", False):
        plain = json.dumps({"ts": round(time.time(), 3), "level": level, "logger": "giris.cli",
                            "event": event, **fields})
    print(plain, file=sys.stderr, flush=True)


def _said(e: BaseException) -> str:
    """An error in a user's words: the file with an OS error, the message otherwise."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, zmq.ZMQError):
        return f"cannot connect: {e}"
    return str(e) or type(e).__name__


# ---------------------------------------------------------------------- say
class Interrupted(BaseException):
    """SIGTERM or SIGHUP during ``giris say``: it unwinds as Ctrl-C's KeyboardInterrupt
    does, so the same cleanup runs (a BaseException: no ``except Exception`` stops it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Interruptible:
    """SIGINT, SIGTERM and SIGHUP end the work once, as Ctrl-C does (the temporary files
    go, an embedded runtime stops its workers and unlinks its segments: SIGTERM killed
    the process and left them); a signal during that cleanup is ignored, not let cut it
    short. Only in the main thread, where Python runs signal handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self) -> "_Interruptible":
        self.fired = False
        self._old: dict = {}
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.fired:
            return
        self.fired = True
        raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted(signum)

    def cleaning(self) -> None:
        """From here on the cleanup runs whole: signals are ignored."""
        self.fired = True

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


@contextmanager
def _writing(target: Path) -> Iterator[None]:
    """An OS error while a file is written under its temporary name, said with the name
    the user gave (a failed CSV write said only "File too large")."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(target)) from None


def cmd_say(args: argparse.Namespace) -> int:
    with _Interruptible() as signals:
        return _say(args, signals)


def _say(args: argparse.Namespace, signals: _Interruptible) -> int:
    from giris.runtime.client import AudioChunk, Client, Coefficients, Event, Frame
    from giris.runtime.media import Mp4Writer, partial_path, write_coefficients

    _one_mode(args)
    output = _output_path(args.output, ".mp4")
    coeffs_path = _output_path(args.coeffs, ".csv") if args.coeffs else None
    # both files are written under temporary names beside their targets and renamed only
    # when both are whole: a failed or interrupted run leaves the previous ones as they were
    partials = [partial_path(output)] + ([partial_path(coeffs_path)] if coeffs_path else [])
    want = ["audio", "frames"] + (["coeffs"] if args.coeffs else [])
    # zero-copy (where the server is on this host; over tcp it sends bytes): a frame read
    # but not yet encoded holds its pool slot, so the renderer waits for the encoder
    # instead of every frame of a long text piling up in this process (1.8 GB for a
    # 2,000-character text at 512², the encoder being slower than the renderer)
    opts = dict(voice=args.voice, emotion=args.emotion, intensity=args.intensity, fps=args.fps,
                size=args.size, rate=args.rate, want=want, seed=args.seed, zero_copy=True)
    runtime = client = session = writer = None
    done = False
    t0 = time.monotonic()
    progress = Progress(enabled=not args.quiet and _progress_wanted(os.environ.get("GIRIS_PROGRESS"),
                                                                    sys.stderr.isatty()))
    try:
        if args.connect:
            _server_socket(args.connect)
            client = Client(args.connect, server_key=args.server_key, client_keys=args.client_key)
        else:
            from giris.runtime.embed import Runtime

            cfg = load(args.config) if args.config else load()
            _precheck(args.text, opts, cfg)
            progress.note("loading models")
            if args.voice and (args.voice.endswith(".onnx") or os.sep in args.voice):
                # a voice file named on the command line: this user owns the embedded
                # server, so the file becomes a configured voice (sessions name voices only)
                tts = next(iter(cfg.stages.values()))
                name = Path(args.voice).stem
                tts.options = {**tts.options, "voices": {**dict(tts.options.get("voices") or {}),
                                                         name: os.path.abspath(args.voice)}}
                opts["voice"] = name
            if not args.avatar:  # the bundled avatar's points ship with it: no dlib to load
                render = list(cfg.stages.values())[-1]
                if render.engine == "warp":
                    render.options = {**render.options, "preload_landmarks": False}
            # the global flags reach the embedded workers as they reach `giris serve`'s;
            # assigned before start(): the `finally` stops whatever an interrupted start left
            runtime = Runtime(cfg, log_level=args.log_level, log_json=args.log_json)
            runtime.start()
            client = runtime.client
        assert client is not None
        session = client.open_session(args.avatar, **opts)
        fps = session.fps
        coeff_rows: list = []
        ended: dict = {}
        restarted: list[str] = []
        early: list[tuple[Any, int]] = []  # frames before the first audio (the writer needs its rate)
        audio_end = frames = 0
        sample_rate = 0
        size = int(session.spec.get("size", 512))
        first_frame_s = None
        first_trace: list | None = None
        ready_s = time.monotonic() - t0  # models loaded (embedded) and the session open
        t_say = time.monotonic()
        with _writing(output):
            for item in session.say(args.text, timeout=120, trace=args.trace):
                if isinstance(item, AudioChunk):
                    if writer is None:
                        sample_rate = item.sample_rate
                        writer = Mp4Writer(partials[0], fps=fps, width=size, height=size,
                                           sample_rate=sample_rate)
                        for image, index in early:
                            writer.add_frame(image, index)
                        early.clear()
                    writer.add_audio(item.pcm, item.start_sample)
                    audio_end = max(audio_end, item.start_sample + len(item.pcm))
                elif isinstance(item, Frame):
                    if first_frame_s is None:
                        first_frame_s = time.monotonic() - t_say
                        first_trace = item.trace
                    if writer is None:
                        early.append((item.image.copy(), item.index))
                    else:
                        writer.add_frame(item.image, item.index)
                    item.release()
                    frames += 1
                elif isinstance(item, Coefficients):
                    coeff_rows.append(item)
                elif isinstance(item, Event):
                    if item.kind == "stage_restarted":
                        restarted.append(str(item.meta.get("stage")))
                    elif item.kind == "utterance_done":
                        ended = item.meta
                expected = math.ceil(audio_end * fps / sample_rate) if sample_rate else 0
                progress.update(frames, expected, audio_end / sample_rate if sample_rate else 0.0)
            if not ended.get("complete"):  # a stage crashed mid-way: the video would lack a part
                why = f" (stage {', '.join(restarted)} restarted)" if restarted else ""
                raise GirisError(f"the utterance was cut short{why}: {frames} frames made; nothing "
                                 "written, try again", code="incomplete")
            if writer is None:
                raise GirisError("nothing was synthesized", code="internal")
            writer.close()
            writer = None
        if coeffs_path is not None:
            with _writing(coeffs_path):
                write_coefficients(partials[1], coeff_rows)
        for partial, target in zip(partials, [output, coeffs_path]):
            os.replace(partial, target)  # type: ignore[arg-type] - a finished file, or the old one
        done = True
        progress.done()
        summary = {"output": args.output, "frames": frames, "fps": fps,
                   "audio_s": round(audio_end / sample_rate, 3),
                   "audio_samples": audio_end, "sample_rate": sample_rate,
                   "ready_s": round(ready_s, 3), "first_frame_s": round(first_frame_s or 0, 3),
                   "wall_s": round(time.monotonic() - t0, 3)}
        if first_trace:
            summary["first_frame_trace_ms"] = {f"{a} → {b}": round((tb - ta) * 1000, 2)
                                               for (a, ta), (b, tb) in zip(first_trace, first_trace[1:])}
        print(json.dumps(summary, ensure_ascii=False))
        return 0
    finally:
        signals.cleaning()
        progress.done()  # an error goes on a line of its own
        if not done:
            if writer is not None:
                try:
                    writer.abort()
                except Exception:  # noqa: BLE001 - the file goes anyway
                    pass
            for partial in partials:
                partial.unlink(missing_ok=True)
        if session is not None and not session.closed:
            try:
                session.close()
            except GirisError:
                pass  # the server is gone or closed it: nothing is held there
        if runtime is not None:
            runtime.stop()
        elif client is not None:
            client.close()


def _one_mode(args: argparse.Namespace) -> None:
    """Flags of the other mode are refused, not ignored (``--config`` with ``--connect``
    ran on the server's own config without a word, the keys without it on no server)."""
    if args.connect and args.config:
        raise GirisError("--config configures the embedded runtime; with --connect the server's "
                         "own config applies", code="bad_input")
    if not args.connect and (args.server_key or args.client_key):
        raise GirisError("--server-key and --client-key are for a tcp:// server named with "
                         "--connect; the embedded runtime needs no keys", code="bad_input")


def _precheck(text: str, opts: dict[str, Any], cfg: Config) -> None:
    """What the embedded server would refuse without its models (an empty text, an odd
    size), refused before they load (3–8 s): the same checks on the same limits."""
    from giris.runtime.spec import check_text, session_spec

    check_text(text, cfg.limits)
    session_spec(cfg.defaults, opts, cfg.limits)


def _output_path(name: str, suffix: str) -> Path:
    """Where a result goes, checked before any work: the folder must exist and the name
    say what it will hold, and fit the file system."""
    from giris.runtime.media import name_max

    path = Path(name).expanduser()
    if path.suffix.lower() != suffix:
        raise GirisError(f"{name}: the output is {suffix[1:].upper()}; name it *{suffix}",
                         code="bad_input")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise GirisError(f"{name}: no folder {folder}", code="bad_input")
    if not os.access(folder, os.W_OK):
        raise GirisError(f"{name}: the folder {folder} is not writable", code="bad_input")
    if len(os.fsencode(path.name)) > name_max(folder):
        raise GirisError(f"{name}: the file name is longer than the {name_max(folder)} bytes "
                         "the file system allows", code="bad_input")
    if path.is_dir():
        raise GirisError(f"{name} is a folder", code="bad_input")
    return path


class Progress:
    """A one-line progress bar on stderr (on a terminal, or where ``GIRIS_PROGRESS`` is
    set); :meth:`done` ends the line, so what follows starts on a line of its own."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.last = 0.0
        self.open = False  # a progress line is on the screen

    def _show(self, text: str) -> None:
        sys.stderr.write(f"\r\033[K{text}")
        sys.stderr.flush()
        self.open = True

    def note(self, text: str) -> None:
        if self.enabled:
            self._show(f"{text}…")

    def update(self, frames: int, expected: int, audio_s: float) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.1:
            return
        self.last = now
        width = 30
        done = int(width * frames / expected) if expected else 0
        self._show(f"[{'#' * done}{'.' * (width - done)}] frames {frames}/{expected} "
                   f"audio {audio_s:.1f} s")

    def done(self) -> None:
        """Clear the line on a terminal; elsewhere (a log file) end it."""
        if self.open:
            sys.stderr.write("\r\033[K" if sys.stderr.isatty() else "\n")
            sys.stderr.flush()
            self.open = False


# ---------------------------------------------------------------------- serve
def serve_config(args: argparse.Namespace) -> Config:
    # the flags go in as the file's values would, so the config's own checks judge them
    flags = {"endpoint": args.endpoint or None, "metrics_port": args.metrics_port,
             "insecure": True if args.insecure else None}
    server = {k: v for k, v in flags.items() if v is not None}
    cfg = load(args.config or None, overrides={"server": server} if server else None)
    if not cfg.server.endpoint:
        cfg.server.endpoint = default_endpoint()
    if cfg.server.endpoint.startswith("inproc://"):  # it served where no client could reach
        raise GirisError(f"cannot listen on {cfg.server.endpoint}: inproc:// reaches only its own "
                         "process (an embedded Runtime); serve on ipc:// or tcp://", code="bad_endpoint")
    return cfg


def _progress_wanted(setting: str | None, terminal: bool) -> bool:
    """``GIRIS_PROGRESS``: unset or empty, a bar on a terminal only; ``0``, ``false``,
    ``no`` or ``off``, never (a terminal recording a session); anything else, always (a
    log that wants it). ``0`` used to turn it on, as any set value did."""
    if not setting:
        return terminal
    return setting.strip().lower() not in ("0", "false", "no", "off")


def cmd_serve(args: argparse.Namespace) -> int:
    from giris.supervisor.service import ServiceHooks
    from giris.supervisor.supervisor import Supervisor

    cfg = serve_config(args)
    hooks = ServiceHooks.create(cfg)
    sup = Supervisor(cfg, notifier=hooks.notifier, metrics=hooks.metrics,
                     log_level=args.log_level, log_json=args.log_json)
    stopped_by: list[int] = []

    def stop(sig: int, _frame: Any) -> None:
        stopped_by.append(sig)
        sup.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, lambda *_: hooks.request_reload())
    if os.environ.get("GIRIS_TEST_HOOKS") == "1":
        # Tests only: SIGUSR2 blocks the supervisor loop for 3 s (its threads run on), to
        # show that a hung loop stops the systemd watchdog pings.
        signal.signal(signal.SIGUSR2, lambda *_: time.sleep(3.0))
    hooks.reload_from = (args, serve_config)

    def ready() -> None:  # not before: a bad [defaults] stops a server that said it served
        _announce(args, "serving on", sup.endpoint)
        if hooks.metrics is not None and hooks.metrics_port:
            _announce(args, "metrics on", f"http://{cfg.server.metrics_host}:{hooks.metrics_port}/metrics")

    hooks.notifier.on_ready = ready  # type: ignore[union-attr] - create() made it
    try:
        sup.start(wait=False)
        sup.serve_forever()
    finally:
        sup.shutdown()
        hooks.close()
    if sup.fatal is not None:
        raise sup.fatal
    # SIGTERM is how a service is stopped: 0. Ctrl-C is an interruption: 130, as a shell
    # reports it (a script running `giris serve` can tell the two apart)
    return 130 if stopped_by and stopped_by[0] == signal.SIGINT else 0


def _announce(args: argparse.Namespace, what: str, where: str) -> None:
    """Where the server listens (a person or a script waits for it)."""
    _line(args, "info", what, f"giris: {what} {where}", url=where)


def _server_socket(endpoint: str) -> None:
    """An ipc endpoint with no socket file has no server: say so now, not after the
    client's timeout (``say --connect`` waited 30 s)."""
    from giris.runtime.transport import ipc_path

    path = ipc_path(endpoint)
    if path is not None and not os.path.exists(path):
        raise GirisError(f"no server at {endpoint} (no socket file {path}; is `giris serve` "
                         "running, on this endpoint?)", code="server_gone")


# ---------------------------------------------------------------------- status
def cmd_status(args: argparse.Namespace) -> int:
    from giris.runtime.client import Client

    endpoint = args.endpoint or default_endpoint()
    _server_socket(endpoint)
    with Client(endpoint, server_key=args.server_key, client_keys=args.client_key,
                timeout=args.timeout) as c:
        st = c.status(timeout=args.timeout)
    if args.json:
        print(json.dumps(st))
        return 0
    print(f"giris {st['state']} on {st['endpoint']} (pid {st['pid']}, up {st['uptime_s']:.0f} s), "
          f"{st['sessions']} session(s), {st['frames_out']} frames out")
    offers = (st.get("pipeline") or {}).get("offers")
    if offers is not None:
        print(f"streams offered: {', '.join(offers) or 'none'}")
    live = st.get("live") or {}
    if live.get("load") or live.get("capacity"):
        cap = f"{live['capacity']:g}" if live.get("capacity") else "unlimited"
        print(f"live load: {live.get('load', 0):.2f} of {cap} (512² sessions at 25 FPS)")
    rows = [("stage", "engine", "pid", "state", "restarts", "cpus", "device", "sessions", "queued")]
    for w in st["workers"]:
        state = w["state"] + (f" (retry in {w['retry_in_s']:.0f} s)" if w.get("retry_in_s") is not None else "")
        rows.append((w["stage"], str(w["engine"]), str(w["pid"]), state, str(w["restarts"]),
                     ",".join(map(str, w["cpus"] or [])) or "-", w["device"], str(w["sessions"]),
                     str(w["queued"])))
    _table(rows)
    if st["budgets"]:
        print()
        _table([("device", "used", "budget")] + [
            (d, _size(b["used"]), _size(b["limit"]) if b["limit"] else "unlimited")
            for d, b in st["budgets"].items()])
    if st["pools"]:
        print()
        _table([("pool", "slots", "in use")] + [(n, str(p["slots"]), str(p["in_use"]))
                                                 for n, p in st["pools"].items()])
    out = st.get("outbox") or {}
    if out.get("clients_waiting") or out.get("live_frames_dropped"):
        print(f"\nclients not reading: {out['clients_waiting']} ({out['messages_waiting']} messages "
              f"waiting; {out['live_frames_dropped']} live frames dropped for them)")
    return 0


def _table(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def _size(n: Any) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------------- keys, bench
def cmd_keys(args: argparse.Namespace) -> int:
    """``giris keys``: its errors as every command's (``giris: error …``, exit 2, JSON
    under ``--log-json``)."""
    from giris.runtime.keys import generate_keypair

    public, secret = generate_keypair(args.dir, args.name, overwrite=args.force)
    print(f"public key: {public}  (give to peers; servers list client keys in curve_client_keys)")
    print(f"secret key: {secret}  (keep private, mode 0600)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if not Path("perf/__main__.py").exists():
        raise GirisError("run `giris bench` from the repository root (perf/ is not installed)",
                         code="bad_input")
    sys.path.insert(0, os.getcwd())
    from perf.__main__ import main as perf_main

    return perf_main([args.name, *args.rest])


if __name__ == "__main__":
    sys.exit(main())
