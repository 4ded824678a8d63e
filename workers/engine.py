"""The engine interface: what a stage's model implements, free of sockets and pools.

A stage worker (``giris.workers.stage``) owns the sockets, the tensor pools and the
session table; it hands each engine plain numpy arrays and routes what the engine
yields. Engines are found by name through the entry-point group ``giris.engines``.

Messages between stages (``StageInput.type`` → what the stage yields):

* ``tts``    ``say`` {utterance, text, emotion?, intensity?, rate?}
             ``audio_in`` [int16 pcm (n,)] {utterance, sample_rate, final}
             ``cancel`` {utterance}
             → ``audio`` [int16 pcm (n,)] {utterance, sample_rate, start_sample, final,
               text, phonemes: [[ipa, start_rel_sample, n_samples], ...] or None}
               (sent downstream *and* to the client; ``start_sample`` is on the session clock)
* ``coeffs`` ``audio`` → ``coeffs`` [float32 (n, 73) coefficients, float32 (n, 3) prosody]
             {utterance, fps, first_frame, final, emotion?, intensity?}
* ``motion`` ``coeffs`` → ``coeffs`` [float32 (n, 73)] (same meta; pose/blinks/brows filled;
             sent downstream and to the client)
* ``render`` ``coeffs`` → one ``frame`` [uint8 (H, W, 3)] per row, ``seq`` = frame index,
             meta {utterance, final}; a ``mark`` {utterance, final} when a final block has
             no rows, so the end of every utterance is seen downstream.

``pts`` is seconds on the session clock: ``start_sample / sample_rate`` for audio,
``frame / fps`` for coefficients and frames.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Mapping

import numpy as np

from giris.runtime.errors import GirisError

log = logging.getLogger("giris.engine")


class EngineError(GirisError):
    """Raised by an engine for a request it cannot serve (bad avatar, unknown voice...).

    The worker turns it into an ``error`` event for that session; the worker lives on.
    """


@dataclass
class StageInput:
    type: str
    seq: int
    pts: float
    meta: dict
    tensors: list[np.ndarray] = field(default_factory=list)


@dataclass
class Output:
    type: str
    seq: int
    pts: float
    meta: dict
    tensors: list[np.ndarray] = field(default_factory=list)
    #: also deliver to the client (audio chunks, final coefficients)
    to_client: bool = False
    #: deliver to the next stage (the last stage's outputs always go to the client)
    downstream: bool = True


@dataclass
class EngineContext:
    """What the worker lends an engine."""

    stage: str
    device: str = "cpu"
    #: ``alloc(shape, dtype) -> ndarray``: an output buffer, inside a shared-memory pool
    #: slot when the stage has a pool (so the frame is never copied), else plain memory.
    alloc: Callable[[tuple, Any], np.ndarray] = lambda shape, dtype: np.empty(shape, dtype)
    log: logging.Logger = log
    #: ``busy() -> int``: the worker's other sessions with work waiting, now; an engine may
    #: trade a little latency for throughput when it is not alone (see the piper engine)
    busy: Callable[[], int] = lambda: 0


class Options(Mapping[str, Any]):
    """A stage's ``options`` (a copy), remembering which keys its engine looked up: one
    never looked up once the engine has loaded is most likely a typo (``smoothng``), and
    the worker says so (every other config key is checked, but options are each engine's
    own: ``options = { smoothng = 0.5 }`` ran as if unset, without a word). Iterating
    counts as reading every key (an engine that passes the whole table on)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)
        #: every key looked up, there or not (the option names the engine knows)
        self.looked_up: set[str] = set()
        #: the key looked up last: the likely culprit of a value the engine cannot convert
        self.last: str | None = None

    def __getitem__(self, key: str) -> Any:
        self.looked_up.add(key)
        self.last = key
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        self.looked_up.update(self._values)
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Options({self._values!r})"

    def unread(self) -> list[str]:
        """The keys given that nothing looked up."""
        return sorted(set(self._values) - self.looked_up)


class Engine:
    """One model behind one stage. Load once in ``__init__``; sessions are cheap."""

    stage: ClassVar[str] = ""
    #: options this engine reads only elsewhere than ``__init__`` and ``warmup`` (in
    #: ``preload``, or per session): the others are looked up by then, and one given that
    #: was not is logged as a likely typo
    late_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, options: Mapping[str, Any], context: EngineContext) -> None:
        #: (the worker's own ``Options``, so reads of the mapping it passed count too)
        self.options = options if isinstance(options, Options) else Options(options)
        self.ctx = context

    @classmethod
    def preload(cls, options: Mapping[str, Any]) -> None:
        """Work done once in the launcher, before any worker of this engine is forked
        (:mod:`giris.supervisor.launcher`): imports and read-only data that every worker
        would load the same. Never threads, sockets or a GPU: a fork does not carry them.
        The engine's module is imported already."""

    def estimate(self, spec: Mapping[str, Any]) -> dict[str, int]:
        """Bytes a session with ``spec`` will hold, per device (``"cpu"``, ``"cuda:0"``)."""
        return {}

    def open_session(self, spec: Mapping[str, Any]) -> Any:
        """Build per-session state; raise :class:`EngineError` for an unusable spec."""
        return {}

    def process(self, item: StageInput, state: Any) -> Iterator[Output | None]:
        """Yield outputs as soon as each is ready (a generator: streaming, cancellable).
        ``None`` yields the worker to its other sessions between two long pieces of work
        that make one output (the worker steps the session again when it is its turn)."""
        raise NotImplementedError

    def cancel(self, state: Any, utterance: int) -> None:
        """Forget queued work of ``utterance`` (the worker already stops its generator)."""

    def held(self, state: Any) -> dict[str, int]:
        """Bytes the session actually holds now, per device (defaults to the estimate)."""
        return {}

    def close_session(self, state: Any) -> None:
        """Drop everything the session held."""

    def check(self, spec: Mapping[str, Any]) -> None:
        """Raise :class:`EngineError`, as ``open_session`` would, if a session with ``spec``
        could not open. The server asks it of its ``[defaults]`` once the stages are ready
        and on a reload, so a bad default stops the server at start instead of failing
        every session open after it. Cheap: no model loads, no image decodes. The default
        checks the values ``accepts`` lists; engines override it with the validators their
        ``open_session`` uses."""
        for key, values in self.accepts().items():
            value = spec.get(key)
            if value is not None and str(value) not in values:
                raise EngineError(f"{key} {value!r} is not one this engine knows: {', '.join(values)}",
                                  code="bad_input")

    def accepts(self) -> dict[str, list[str]]:
        """Session options whose every valid value this engine can list (e.g.
        ``{"emotion": [...]}``), for the default ``check`` (an engine whose values are a
        closed list need write no ``check``). Open-ended values (paths) list nothing."""
        return {}

    def warmup(self) -> None:
        """Run once before the worker reports ready, so the first request is not slow."""
