"""What a session spec may hold, and the checks on its values: one definition for the
gateway (each ``open_session``) and the config (its ``[defaults]``, at load)."""
from __future__ import annotations

import math
from typing import Any

from giris.runtime import protocol as P
from giris.runtime.errors import BadInput, LimitExceeded

SPEC_KEYS = frozenset({"avatar_name", "voice", "emotion", "intensity", "fps", "size", "rate",
                       "realtime", "zero_copy", "want", "seed", "playout_delay"})
WANTS = frozenset({"audio", "coeffs", "frames"})


def number(d: dict, key: str, lo: float, hi: float) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise BadInput(f"{key} must be a number in {lo:g}..{hi:g}, got {v!r}")
    return float(v)


def check_keys(raw: Any) -> None:
    if not isinstance(raw, dict):
        raise BadInput("spec must be a map")
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise BadInput(f"unknown session option(s): {', '.join(sorted(map(str, unknown)))}")


def check_values(spec: dict[str, Any], limits: Any) -> dict[str, Any]:
    """``spec`` (defaults and the client's options merged) with its numbers checked
    against ``limits`` (a :class:`~giris.runtime.config.Limits`) and normalised. What
    only an engine knows (a voice, an emotion, an avatar) is checked by that engine."""
    fps = number(spec, "fps", 1, limits.max_fps)
    size = number(spec, "size", limits.min_size, limits.max_size)
    if size != int(size) or int(size) % 2:
        raise BadInput("size must be an even integer")
    spec["size"], spec["fps"] = int(size), fps
    number(spec, "intensity", 0.0, 1.0)
    if "rate" in spec:
        number(spec, "rate", *P.RATE_RANGE)
    number(spec, "playout_delay", *P.PLAYOUT_DELAY_RANGE)
    for key in ("emotion", "voice", "avatar_name"):
        if key in spec and not isinstance(spec[key], str):
            raise BadInput(f"{key} must be a string")
    want = spec.get("want")
    if want is not None and not (isinstance(want, list) and all(type(w) is str and w in WANTS for w in want)):
        raise BadInput(f"want must be a list drawn from {sorted(WANTS)}")
    for key in ("realtime", "zero_copy"):
        spec[key] = spec.get(key, False)
        if type(spec[key]) is not bool:
            raise BadInput(f"{key} must be true or false")
    seed = spec.get("seed")
    if seed is not None and (type(seed) is not int or not 0 <= seed < 2**63):
        raise BadInput(f"seed must be an integer in 0..2^63-1, got {seed!r}")
    return spec


def session_spec(defaults: dict[str, Any], raw: Any, limits: Any) -> dict[str, Any]:
    """A session's spec: the server's ``defaults`` under the client's options (``raw``,
    its unset ones ignored), keys and numbers checked (:func:`check_values`)."""
    check_keys(raw)
    spec = dict(defaults)
    spec.update({k: v for k, v in raw.items() if v is not None})
    return check_values(spec, limits)


def check_text(text: Any, limits: Any) -> str:
    """An utterance's text: a non-blank string within ``limits.max_text_chars``."""
    if not isinstance(text, str) or not text.strip():
        raise BadInput("text must be a non-empty string")
    if len(text) > limits.max_text_chars:
        raise LimitExceeded(f"text of {len(text)} characters exceeds {limits.max_text_chars}",
                            code="too_large", limit=limits.max_text_chars, size=len(text))
    return text
