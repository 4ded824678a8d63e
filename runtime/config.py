"""Configuration: one dataclass tree with working defaults, loadable from TOML.

With no file at all the defaults serve the default pipeline (Piper → visemes → prosody
motion → warp renderer) on the CPU over a private ``ipc://`` socket.
"""
from __future__ import annotations

import copy
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping

from giris.runtime.errors import BadInput
from giris.runtime.spec import check_keys, check_values

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STAGES = ("tts", "coeffs", "motion", "render")
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1024**2,
          "g": 1e9, "gb": 1e9, "gib": 1024**3, "t": 1e12, "tb": 1e12, "tib": 1024**4}


def parse_bytes(value: Any) -> int:
    """``8GiB``, ``512 MB``, ``1e9`` or an int -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(value))
        try:
            n = float(m.group(1)) * _UNITS[m.group(2).lower()] if m else math.nan
        except (ValueError, KeyError):
            n = math.nan
    if not math.isfinite(n):  # (int(inf) raised OverflowError from deep in the load)
        raise ValueError(f"not a size: {value!r}")
    return int(value) if isinstance(value, int) else int(n)


def _size(table: Mapping[str, Any], key: str, where: str) -> int:
    """``parse_bytes`` of ``table[key]``, a refusal naming the key ("not a size: 'lots'"
    did not say which)."""
    try:
        return parse_bytes(table[key])
    except ValueError as e:
        raise ValueError(f"[{where}] {key}: {e} (e.g. \"512MiB\", \"8GiB\" or a byte count)") from None


@dataclass
class StageConfig:
    engine: str
    #: "cpu" or "cuda:N"; a cuda stage gets CUDA_VISIBLE_DEVICES=N before torch loads
    device: str = "cpu"
    #: CPU cores to pin the worker to; None = the supervisor spreads stages round-robin,
    #: [] = no pinning
    cpus: list[int] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    #: slots of the stage's output pool (0: outputs travel inline in the message)
    pool_slots: int = 0
    pool_slot_bytes: int = 0
    #: what the producer does when every slot is busy: "block" (up to block_timeout) or "drop"
    backpressure: str = "block"
    block_timeout: float = 5.0
    #: most slots one session may hold at once (0: pool_slots // 4, at least 4): a client
    #: slow to give frames back holds back its own session, not everyone's
    session_slots: int = 0


@dataclass
class ServerConfig:
    #: ipc://PATH (default, in the private run dir), tcp://HOST:PORT (needs CURVE keys or
    #: insecure = true), or inproc://NAME (embedded)
    endpoint: str = ""
    run_dir: str = ""
    curve_secret_key: str = ""
    #: a directory (or one file) of allowed client public keys
    curve_client_keys: str = ""
    insecure: bool = False
    metrics_host: str = "127.0.0.1"
    #: 0 = off
    metrics_port: int = 0
    #: largest message a client may send (an avatar image travels in one)
    max_message_bytes: int = 24 * 1024 * 1024
    #: permissions of an ipc:// gateway socket: owner only by default; 0o660 lets the
    #: service's group connect too
    ipc_mode: int = 0o600
    #: how workers start: "fork" from a launcher that preloaded the engines (a crashed
    #: stage is back in ~0.5-2 s), or "spawn", a fresh interpreter each (~1-5 s)
    launcher: str = "fork"


@dataclass
class Timeouts:
    worker_heartbeat: float = 0.5
    #: a worker silent this long is hung and gets killed and restarted
    worker_timeout: float = 10.0
    #: time a worker has to load its models and report ready
    worker_start: float = 180.0
    #: a session whose client sent nothing (not even a heartbeat) this long is closed
    client_idle: float = 30.0
    #: an utterance cut by a stage restart that shows no progress this long is reported lost
    lost_after: float = 5.0
    #: how long a request that needs every stage may take (opening a session)
    request: float = 60.0
    shutdown: float = 10.0


@dataclass
class RestartConfig:
    backoff_initial: float = 0.25
    backoff_max: float = 8.0
    #: more than this many crashes within window seconds marks the stage failed
    max_restarts: int = 5
    window: float = 60.0
    #: a stage marked failed after a crash loop is tried again this long after (with a
    #: fresh series of restarts): what made it crash may have passed (a GPU another
    #: process had filled, a model file being replaced); 0 = never
    failed_retry: float = 120.0


@dataclass
class Limits:
    max_sessions: int = 16
    max_sessions_per_client: int = 8
    max_text_chars: int = 2000
    max_image_bytes: int = 12 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    #: ``say`` requests per session in any one second (``audio_in`` has a budget of its
    #: own in seconds of audio; ``cancel`` is not limited)
    max_requests_per_second: float = 20.0
    #: utterances a session has asked for and not seen end (``utterance_done``), idle
    #: streams included: one more ``say`` (or new ``audio_in`` utterance) is refused
    max_utterances_per_session: int = 16
    min_size: int = 128
    max_size: int = 1024
    max_fps: float = 60.0
    #: live (realtime) sessions the server takes at once, counted in 512² sessions at
    #: 25 FPS (a 256² one is a quarter, 30 FPS 1.2×); 0: no limit. Set it from ``python
    #: -m perf render --capacity`` on the host: past it, every live session stalls
    live_capacity: float = 0.0


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    timeouts: Timeouts = field(default_factory=Timeouts)
    restart: RestartConfig = field(default_factory=RestartConfig)
    limits: Limits = field(default_factory=Limits)
    #: device -> bytes sessions may hold there ("cpu", "cuda:0"); absent = unlimited
    budgets: dict[str, int] = field(default_factory=dict)
    #: the pipeline in order; names are free, the defaults are tts, coeffs, motion, render
    stages: dict[str, StageConfig] = field(default_factory=dict)
    #: session defaults, overridable per session
    defaults: dict[str, Any] = field(default_factory=lambda: {
        "fps": 25, "size": 512, "emotion": "neutral", "intensity": 0.6, "avatar_name": "astronaut",
        # live (realtime) sessions: frames are held this long after the first one is
        # made, so a late frame does not stall playback (a player's jitter buffer)
        "playout_delay": 0.12})

    def stage_names(self) -> list[str]:
        return list(self.stages)


def frame_bytes(max_size: int) -> int:
    """A pool slot's default size: the largest frame allowed (``max_size``² RGB)."""
    return max_size * max_size * 3


def default_stages(max_size: int = 1024) -> dict[str, StageConfig]:
    return {
        # unpinned: synthesis comes in bursts and the first one is what a viewer waits
        # for, so it may use every core (the steady stages stay pinned)
        "tts": StageConfig(engine="piper", cpus=[]),
        "coeffs": StageConfig(engine="visemes"),
        "motion": StageConfig(engine="prosody"),
        "render": StageConfig(engine="warp", pool_slots=48, pool_slot_bytes=frame_bytes(max_size)),
    }


def default_config() -> Config:
    cfg = Config()
    cfg.stages = default_stages(cfg.limits.max_size)
    return cfg


def load(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file (if any), then ``overrides`` (a nested mapping)."""
    data: dict[str, Any] = {}
    if path:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    if overrides:
        data = _merge(data, overrides)
    return from_mapping(data)


def from_mapping(data: Mapping[str, Any]) -> Config:
    cfg = Config()
    unknown = set(data) - {f.name for f in fields(Config)}
    if unknown:
        raise ValueError(f"unknown config section(s): {', '.join(sorted(unknown))}")
    sizes = {"server": ("max_message_bytes",), "limits": ("max_image_bytes",)}
    for name in ("server", "timeouts", "restart", "limits"):
        if name in data:
            section = dict(_table(data[name], name))
            for key in sizes.get(name, ()):
                if key in section:
                    section[key] = _size(section, key, name)
            setattr(cfg, name, _fill(type(getattr(cfg, name)), section, name))
    budgets = _table(data.get("budgets", {}), "budgets")
    cfg.budgets = {str(k): _size(budgets, k, "budgets") for k in budgets}
    if "defaults" in data:
        cfg.defaults.update(_table(data["defaults"], "defaults"))
    stages = _table(data.get("stages", {}), "stages")
    if stages:
        cfg.stages = {}
        for name, sc in stages.items():
            sc = dict(_table(sc, f"stages.{name}"))  # a copy: sizes are parsed in it
            if "pool_slot_bytes" in sc:
                sc["pool_slot_bytes"] = _size(sc, "pool_slot_bytes", f"stages.{name}")
            elif sc.get("pool_slots"):  # a pool of empty slots sent every output inline, unsaid
                sc["pool_slot_bytes"] = frame_bytes(cfg.limits.max_size)
            cfg.stages[name] = _fill(StageConfig, sc, f"stages.{name}")
    else:
        cfg.stages = default_stages(cfg.limits.max_size)
    _check_ranges(cfg)
    if cfg.server.launcher not in ("fork", "spawn"):
        raise ValueError("server.launcher must be 'fork' or 'spawn'")
    for name, sc in cfg.stages.items():
        if sc.backpressure not in ("block", "drop"):
            raise ValueError(f"stages.{name}.backpressure must be 'block' or 'drop'")
    return cfg


#: the annotation of a scalar config field → (accepted type, its name for a message);
#: a float field takes an integer too, no numeric field takes true/false
_SCALARS: dict[str, tuple[Any, str]] = {"int": (int, "an integer"), "float": ((int, float), "a number"),
                                        "bool": (bool, "true or false"), "str": (str, "a string")}


#: the smallest ``max_message_bytes``: a ``say`` of ``max_text_chars`` with its header
#: fits many times over (0 or a negative size failed every request, status included)
MIN_MESSAGE_BYTES = 64 * 1024


def _check_ranges(cfg: "Config") -> None:
    """Numbers out of their range, in one place (a negative idle timeout closed every
    session as it opened, after a SIGHUP reload took it live)."""
    _check_finite(cfg)
    for section in ("timeouts", "limits", "restart"):
        for f in fields(getattr(cfg, section)):
            v = getattr(getattr(cfg, section), f.name)
            # max_restarts 0: a stage that crashes is failed at once; live_capacity 0: no limit
            zero_ok = f.name in ("max_restarts", "live_capacity", "failed_retry")
            if not (v >= 0 if zero_ok else v > 0):
                raise ValueError(f"[{section}] {f.name} must be {'≥ 0' if zero_ok else '> 0'}, not {v!r}")
    if cfg.timeouts.worker_heartbeat >= cfg.timeouts.worker_timeout:
        raise ValueError("[timeouts] worker_heartbeat must be below worker_timeout (a worker "
                         "beating less often than it is waited for is killed as hung)")
    if not 0 <= cfg.server.metrics_port <= 65535:
        raise ValueError(f"[server] metrics_port must be 0 (off) or a port in 1..65535, "
                         f"not {cfg.server.metrics_port}")
    if cfg.server.max_message_bytes < MIN_MESSAGE_BYTES:
        raise ValueError(f"[server] max_message_bytes must be at least {MIN_MESSAGE_BYTES} "
                         f"(64 KiB; an avatar image travels in one message), not {cfg.server.max_message_bytes}")
    _check_ipc_mode(cfg.server.ipc_mode)
    for device, n in cfg.budgets.items():
        if n < 0:
            raise ValueError(f"[budgets] {device} must be ≥ 0 bytes, not {n}")
    if cfg.limits.min_size > cfg.limits.max_size:
        raise ValueError("[limits] min_size must not exceed max_size")
    try:  # a bad default made a server on which every session open failed
        check_keys(cfg.defaults)
        check_values(dict(cfg.defaults), cfg.limits)
    except BadInput as e:
        raise ValueError(f"[defaults] {e}") from None
    if cfg.restart.backoff_max < cfg.restart.backoff_initial:
        raise ValueError("[restart] backoff_max must not be below backoff_initial")
    for name, sc in cfg.stages.items():
        for key in ("pool_slots", "pool_slot_bytes", "session_slots"):
            if getattr(sc, key) < 0:
                raise ValueError(f"[stages.{name}] {key} must be ≥ 0")
        if sc.block_timeout <= 0:
            raise ValueError(f"[stages.{name}] block_timeout must be > 0")


def _check_finite(cfg: "Config") -> None:
    """``inf`` and ``nan`` are valid TOML but no setting's value (``worker_start = inf``
    was taken, then crashed the server with an OverflowError): one rule for every number
    of every section (a stage's ``options`` are its engine's to judge)."""
    tables = to_mapping(cfg)
    for name, stage in tables.pop("stages").items():
        stage.pop("options", None)
        tables[f"stages.{name}"] = stage
    for where, table in tables.items():
        for key, v in table.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"[{where}] {key} must be a finite number, not {v!r}")


def _check_ipc_mode(mode: int) -> None:
    """The ipc socket's permission bits: 0..0o777, and the owner (the server's user) may
    connect. A decimal ``600`` (0o1130) or ``-1`` (0o7777 once masked: anyone) was
    chmod'ed as is; a value past 0o777 written in octal digits gets the octal spelling."""
    if not 0 <= mode <= 0o777:
        digits = str(mode)
        hint = (f"; write it in octal: ipc_mode = 0o{digits}" if mode > 0o777 and set(digits) <= set("01234567")
                and int(digits, 8) <= 0o777 else "")
        raise ValueError(f"[server] ipc_mode must be permission bits in 0o000..0o777 "
                         f"(e.g. 0o600, 0o660), not {mode}{hint}")
    if mode & 0o600 != 0o600:
        raise ValueError(f"[server] ipc_mode {mode:#o} leaves the server's own user unable to "
                         "connect (it needs 0o600: read and write)")


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"[{where}] must be a table, not {value!r}")
    return value


def _fill(cls: type, values: Any, where: str) -> Any:
    _table(values, where)
    if cls is StageConfig and "engine" not in values:
        raise ValueError(f"[{where}] needs an engine (e.g. engine = \"warp\"; the giris.engines entry points)")
    kinds = {f.name: str(f.type) for f in fields(cls)}
    unknown = set(values) - set(kinds)
    if unknown:
        raise ValueError(f"unknown key(s) in [{where}]: {', '.join(sorted(unknown))}")
    for key, v in values.items():  # a wrong type fails here, named, not deep inside a worker
        want = _SCALARS.get(kinds[key])
        if want is not None and not (isinstance(v, want[0]) and not isinstance(v, bool) or type(v) is want[0]):
            raise ValueError(f"[{where}] {key} must be {want[1]}, not {v!r}")
    if cls is StageConfig:
        cpus = values.get("cpus")
        if cpus is not None and not (isinstance(cpus, list) and all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cpus)):
            raise ValueError(f"[{where}] cpus must be a list of CPU numbers (e.g. [0, 1]), not {cpus!r}")
        if not isinstance(values.get("options", {}), Mapping):
            raise ValueError(f"[{where}] options must be a table, not {values['options']!r}")
    obj = cls(**{k: copy.deepcopy(v) for k, v in values.items() if k != "engine"},
              **({"engine": values["engine"]} if "engine" in values else {}))
    return obj


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def to_mapping(cfg: Config) -> dict[str, Any]:
    """The config as plain data (for passing to workers and printing)."""
    def conv(x: Any) -> Any:
        if is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in fields(x)}
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        return x
    return conv(cfg)


def default_endpoint() -> str:
    """Where ``giris serve`` listens and ``giris status`` looks when told nothing:
    ``ipc://$XDG_RUNTIME_DIR/giris/gateway.sock`` (or under /tmp/giris-UID), owner only."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "giris" if base and os.path.isdir(base) else Path(f"/tmp/giris-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return f"ipc://{path}/gateway.sock"
