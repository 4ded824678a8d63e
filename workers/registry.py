"""Engines by name: the ``giris.engines`` entry-point group, with the built-ins as fallback."""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from giris.runtime.errors import GirisError

BUILTIN = {
    "piper": "giris.workers.tts_piper:PiperEngine",
    "coqui": "giris.workers.tts_coqui:CoquiEngine",
    "visemes": "giris.workers.coeffs_visemes:VisemeEngine",
    "prosody": "giris.workers.motion_prosody:ProsodyMotionEngine",
    "warp": "giris.workers.render_warp:WarpRenderEngine",
    "test-source": "giris.workers.testing:SourceTestEngine",
    "test-relay": "giris.workers.testing:RelayTestEngine",
    "test-frames": "giris.workers.testing:FrameTestEngine",
}


def known_engines() -> list[str]:
    """Every engine name this install can load (cheap: nothing is imported)."""
    return sorted({ep.name for ep in entry_points(group="giris.engines")} | set(BUILTIN))


def engine_class(name: str) -> type:
    """Load the engine class registered as ``name`` (third parties add entry points)."""
    for ep in entry_points(group="giris.engines"):
        if ep.name == name:
            return ep.load()
    target = BUILTIN.get(name)
    if target is None:
        raise GirisError(f"unknown engine {name!r}; known: {', '.join(known_engines())}",
                         code="unknown_engine")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
