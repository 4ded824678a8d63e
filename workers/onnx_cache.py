"""A voice's graphs, cut and optimized once per machine, kept on disk.

Every start (and restart) of a ``tts`` worker used to cut the voice's graph in two with
``onnx`` (~0.7 s) and have ONNX Runtime optimize the front again for each of the voice's
two sessions (~1 s each: fusions, the NCHWc layout). All of it depends only on the voice
file, the cut (:data:`FORMAT`), the ONNX Runtime version and the CPU. So the first start
writes the optimized graphs to a cache directory and later ones load them as they are:
a worker is ready ~2 s sooner, and a crashed one is back ~2 s sooner.

An entry is named by a digest of those four, so a graph optimized for one machine is never
loaded on another; its manifest (written last) lists its files and their sizes, so a
half-written entry is not taken. An entry that loads badly anyway is dropped and made
again (:func:`drop`). Only CPU sessions use it: the CUDA provider wants the plain graph.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

from giris.workers.piper_net import Graphs, session

#: bump when ``load_graphs`` cuts a voice differently
FORMAT = 2  # 2: the flow cut from the front
#: entries kept (a few voices; older ONNX Runtimes and voices go)
KEEP = 6


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/giris/onnx`` (``~/.cache/giris/onnx``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "giris" / "onnx"


def entry_key(model: Path) -> str:
    import onnxruntime

    h = hashlib.blake2b(digest_size=16)
    with open(model, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(f"|{FORMAT}|{onnxruntime.__version__}|{_cpu_signature()}".encode())
    return h.hexdigest()


def load(cache: Path, key: str) -> Graphs | None:
    """The cached graphs of entry ``key``, or None (absent or incomplete)."""
    manifest = cache / f"{key}.json"
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
        parts = {name: cache / f"{key}.{name}.onnx" for name in m["sizes"]}
        if any(p.stat().st_size != m["sizes"][name] for name, p in parts.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    decoder, flow = parts.get("decoder"), parts.get("flow")
    if flow and not m.get("flow_inputs"):
        return None  # a flow whose inputs are not named cannot be fed: made again
    os.utime(manifest)  # recently used: kept by _prune
    return Graphs(front=str(parts["front"]), decoder=str(decoder) if decoder else None,
                  latent=str(m.get("latent", "")), flow=str(flow) if flow else None,
                  flow_inputs=tuple(str(x) for x in m.get("flow_inputs", ())), optimized=True)


def store(cache: Path, key: str, graphs: Graphs) -> Graphs:
    """Optimize ``graphs`` into entry ``key`` and return them as that entry's files; the
    plain graphs back when the directory cannot be written."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for stale in cache.glob(f".{key}.*.tmp"):  # left by a worker killed mid-write
            stale.unlink(missing_ok=True)
        sizes = {}
        for name, graph in (("front", graphs.front), ("flow", graphs.flow), ("decoder", graphs.decoder)):
            if graph is None:
                continue
            path = cache / f"{key}.{name}.onnx"
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            session(graph, save_to=str(tmp))  # made only for what it writes
            os.replace(tmp, path)
            sizes[name] = path.stat().st_size
        manifest = cache / f"{key}.json"
        tmp = manifest.with_name(f".{manifest.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"sizes": sizes, "latent": graphs.latent,
                                   "flow_inputs": list(graphs.flow_inputs)}), encoding="utf-8")
        os.replace(tmp, manifest)  # last: the entry is whole
    except Exception:  # noqa: BLE001 - a read-only or full disk, an ORT refusal: no cache
        return graphs
    _prune(cache)
    return load(cache, key) or graphs


def recall(cache: Path, key: str, name: str) -> list | None:
    """``[value]`` noted for entry ``key`` under ``name`` (see :func:`note`), or None."""
    try:
        value = json.loads((cache / f"{key}.notes").read_text(encoding="utf-8"))[name]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [value]


def note(cache: Path, key: str, name: str, value: Any) -> None:
    """Keep a small fact measured on entry ``key``'s graphs beside them (a voice's
    calibrated gain: measuring it is half a second of synthesis at every start)."""
    path = cache / f"{key}.notes"
    try:
        notes = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        notes[name] = value
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(notes), encoding="utf-8")
        os.replace(tmp, path)
    except (OSError, ValueError, TypeError, AttributeError):
        pass  # no cache: measured again next time


def drop(cache: Path, key: str) -> None:
    for p in cache.glob(f"{key}.*"):
        p.unlink(missing_ok=True)


def _prune(cache: Path) -> None:
    entries = sorted(cache.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP:]:
        drop(cache, old.name[:-len(".json")])


@lru_cache(maxsize=1)
def _cpu_signature() -> str:
    """What an optimized graph may depend on: the machine and its instruction sets."""
    flags = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{flags}"
