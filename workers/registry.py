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


def engine_class(name: str) -> type:
    """Load the engine class registered as ``name`` (third parties add entry points)."""
    target = None
    for ep in entry_points(group="giris.engines"):
        if ep.name == name:
            return ep.load()
    target = BUILTIN.get(name)
    if target is None:
        known = sorted({ep.name for ep in entry_points(group="giris.engines")} | set(BUILTIN))
        raise GirisError(f"unknown engine {name!r}; known: {', '.join(known)}", code="unknown_engine")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
