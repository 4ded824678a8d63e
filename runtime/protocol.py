"""The wire protocol: every message type, the header schema, packing and validation.

A message is a ZeroMQ multipart message ``[header, *buffers]``:

* ``header`` is a msgpack map::

      {"v": 1, "type": str, "session": str, "seq": int, "pts": float,
       "meta": {...}, "tensors": [ref, ...]}

* each ``ref`` says where a tensor's bytes are::

      {"pool": str | None, "generation": int, "slot": int, "offset": int,
       "nbytes": int, "dtype": str, "shape": [int], "strides": [int] | None,
       "device": "cpu" | "cuda:N", "frame": int | None, "lease": int}

  ``pool = None`` means the bytes travel inline as buffer number ``frame`` (1-based
  frame index in the multipart message); otherwise they lie in slot ``slot`` of the named
  shared-memory (or CUDA IPC) pool at byte ``offset``; ``generation`` must match the pool's
  (it changes when the producing stage restarts) and ``lease`` the slot's (it changes on
  every allocation), else the reference is stale and refused.

Nothing else in the project packs or unpacks bytes: every process imports this module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import msgpack
import numpy as np

from giris.runtime.errors import ProtocolError

VERSION = 1

# Client -> server
OPEN_SESSION = "open_session"
CLOSE_SESSION = "close_session"
SAY = "say"
AUDIO_IN = "audio_in"
CANCEL = "cancel"
RELEASE = "release"
HEARTBEAT = "heartbeat"
STATUS = "status"
# Server -> client
REPLY = "reply"
AUDIO = "audio"
COEFFS = "coeffs"
FRAME = "frame"
EVENT = "event"
# Between stages only
MARK = "mark"
# Supervisor <-> worker control
READY = "ready"
STOP = "stop"
#: would a session with ``meta.spec`` open? (``Engine.check``: the server's ``[defaults]``)
#: answered by a ``reply`` {req, refused: the error's wire form, or None}
CHECK = "check"

CLIENT_TYPES = frozenset({OPEN_SESSION, CLOSE_SESSION, SAY, AUDIO_IN, CANCEL, RELEASE,
                          HEARTBEAT, STATUS})
TYPES = CLIENT_TYPES | {REPLY, AUDIO, COEFFS, FRAME, EVENT, MARK, READY, STOP, CHECK}

#: event kinds carried in ``meta["kind"]`` of an ``event``
EVENT_KINDS = ("error", "stage_restarted", "session_closed", "utterance_done")

#: ranges of session / say options every component agrees on
RATE_RANGE = (0.25, 4.0)          # speaking rate, 1.0 = the voice's own
PLAYOUT_DELAY_RANGE = (0.0, 2.0)  # seconds a live session's frames are held to absorb jitter

MAX_HEADER_BYTES = 256 * 1024
MAX_FRAMES = 64
MAX_TENSORS = 16
MAX_DIMS = 8
ITEMSIZE = {"uint8": 1, "int8": 1, "bool": 1, "int16": 2, "uint16": 2, "float16": 2,
            "int32": 4, "float32": 4, "int64": 8, "float64": 8}
DTYPES = frozenset(ITEMSIZE)


_DTYPE_NAMES: dict[np.dtype, str] = {}


def dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, cached: numpy builds that string anew on every call (~2.5 µs, a
    fifth of a hand-off's Python cost)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype.name
    return name


@dataclass
class TensorRef:
    """Where one tensor's bytes are: inline in the message, or in a pool slot."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    pool: str | None = None
    generation: int = 0
    slot: int = -1
    offset: int = 0
    strides: tuple[int, ...] | None = None
    device: str = "cpu"
    frame: int | None = None
    #: the slot's lease number: bumps on every allocation, so a stale reference is refused
    lease: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"pool": self.pool, "generation": self.generation, "slot": self.slot,
                "offset": self.offset, "nbytes": self.nbytes, "dtype": self.dtype,
                "shape": list(self.shape),
                "strides": None if self.strides is None else list(self.strides),
                "device": self.device, "frame": self.frame, "lease": self.lease}

    @classmethod
    def from_wire(cls, d: Any, n_buffers: int) -> "TensorRef":
        # Every field checked by exact type (msgpack gives int, str, list, None): this
        # runs on every hand-off, and a cold process pays for each step it takes.
        if type(d) is not dict:
            raise ProtocolError("tensor reference must be a map")
        get = d.get
        dtype, shape, nbytes = get("dtype"), get("shape"), get("nbytes")
        pool, frame, strides = get("pool"), get("frame"), get("strides")
        generation, slot, offset, lease = get("generation", 0), get("slot", -1), get("offset", 0), get("lease", 0)
        device = get("device", "cpu")
        if type(dtype) is not str or dtype not in ITEMSIZE:
            raise ProtocolError(f"unsupported dtype {dtype!r}")
        if type(shape) is not list or len(shape) > MAX_DIMS or not all(type(n) is int and n >= 0 for n in shape):
            raise ProtocolError(f"bad shape {shape!r}")
        if not (type(nbytes) is type(generation) is type(slot) is type(offset) is type(lease) is int):
            raise ProtocolError("bad tensor reference: nbytes, generation, slot, offset and lease "
                                "must be integers")
        if strides is not None and (type(strides) is not list or not all(type(n) is int for n in strides)):
            raise ProtocolError("bad tensor reference: strides must be integers")
        if (pool is not None and type(pool) is not str) or type(device) is not str:
            raise ProtocolError("bad tensor reference: pool and device must be strings")
        if math.prod(shape) * ITEMSIZE[dtype] != nbytes:
            raise ProtocolError(f"nbytes {nbytes} does not match shape {shape} of {dtype}")
        if pool is None and (type(frame) is not int or not 1 <= frame <= n_buffers):
            raise ProtocolError("inline tensor names a missing buffer")
        if offset < 0:
            raise ProtocolError("negative offset")
        return cls(dtype, tuple(shape), nbytes, pool, generation, slot, offset,
                   None if strides is None else tuple(strides), device,
                   frame if type(frame) is int else None, lease)


@dataclass
class Message:
    type: str
    session: str = ""
    seq: int = 0
    pts: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: list[TensorRef] = field(default_factory=list)
    #: inline buffers (frames 1..n of the multipart message)
    buffers: list[Any] = field(default_factory=list)

    def add_inline(self, array: np.ndarray) -> TensorRef:
        """Attach ``array`` as an inline buffer (small tensors, or remote clients)."""
        ref = self.inline_ref(array)
        self.tensors.append(ref)
        return ref

    def inline_ref(self, array: np.ndarray) -> TensorRef:
        """Attach ``array`` as an inline buffer; its reference, for the caller to place
        (``add_inline`` appends it; a client swaps it for a pool reference it copied)."""
        a = np.ascontiguousarray(array)
        self.buffers.append(memoryview(a).cast("B") if a.nbytes else b"")
        return TensorRef(dtype=dtype_name(a.dtype), shape=tuple(a.shape), nbytes=a.nbytes,
                         frame=len(self.buffers))

    def inline_array(self, ref: TensorRef) -> np.ndarray:
        """The array behind an inline reference (a view on the received buffer)."""
        buf = self.buffers[ref.frame - 1]  # type: ignore[operator]
        mv = memoryview(buf)
        if mv.nbytes != ref.nbytes:
            raise ProtocolError("inline buffer size does not match its reference")
        return np.frombuffer(mv, dtype=ref.dtype).reshape(ref.shape)


def encode(msg: Message) -> list[Any]:
    """Message -> multipart frames (header first, buffers as separate zero-copy frames)."""
    header = {"v": VERSION, "type": msg.type, "session": msg.session, "seq": int(msg.seq),
              "pts": float(msg.pts), "meta": msg.meta,
              "tensors": [t.to_wire() for t in msg.tensors]}
    return [msgpack.packb(header, use_bin_type=True), *msg.buffers]


def decode(frames: Sequence[Any], max_bytes: int = 64 * 1024 * 1024) -> Message:
    """Multipart frames -> validated Message; anything malformed raises ProtocolError."""
    n = len(frames)
    if not n:
        raise ProtocolError("empty message")
    if n > MAX_FRAMES:
        raise ProtocolError(f"too many frames ({n} > {MAX_FRAMES})", code="too_large")
    raw = frames[0]
    if type(raw) is not bytes:
        raw = _bytes_of(raw)
    total = len(raw)
    if total > MAX_HEADER_BYTES:
        raise ProtocolError("header too large", code="too_large")
    buffers = [_buffer_of(f) for f in frames[1:]] if n > 1 else []
    if buffers:
        total += sum(memoryview(b).nbytes for b in buffers)
    if total > max_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the limit of {max_bytes}",
                            code="too_large", limit=max_bytes, size=total)
    try:
        h = _unpackb(raw)
    except Exception as e:  # msgpack raises several unrelated types
        raise ProtocolError(f"header is not msgpack: {type(e).__name__}") from None
    if type(h) is not dict:
        raise ProtocolError("header must be a map")
    get = h.get
    v = get("v")
    if v != VERSION or type(v) is not int:
        raise ProtocolError(f"unsupported protocol version {v!r} (this server speaks {VERSION})",
                            code="unsupported_version", supported=VERSION)
    typ = get("type")
    if type(typ) is not str or typ not in TYPES:
        raise ProtocolError(f"unknown message type {typ!r}", code="unknown_type")
    session, seq, pts, meta, tensors = get("session", ""), get("seq", 0), get("pts", 0.0), get("meta", {}), get("tensors", [])
    if type(session) is not str or len(session) > 128:
        raise ProtocolError("session must be a short string")
    if type(seq) is not int:
        raise ProtocolError("seq must be an integer")
    if type(pts) is not float and type(pts) is not int or not math.isfinite(pts):
        raise ProtocolError("pts must be a finite number")
    if type(meta) is not dict:
        raise ProtocolError("meta must be a map")
    if type(tensors) is not list or len(tensors) > MAX_TENSORS:
        raise ProtocolError("tensors must be a short list")
    nb = len(buffers)
    refs = [TensorRef.from_wire(t, nb) for t in tensors] if tensors else []
    return Message(typ, session, seq, float(pts), meta, refs, buffers)


def request_id(frames: Sequence[Any]) -> int | str | None:
    """``meta.req`` of a message that failed validation, if its header still reads as a
    map (a wrong field elsewhere should not leave the client waiting for its timeout)."""
    try:
        raw = _bytes_of(frames[0])
        if len(raw) > MAX_HEADER_BYTES:
            return None
        h = _unpackb(raw)
        req = h["meta"]["req"]
    except Exception:  # noqa: BLE001 - not even that much is readable
        return None
    return req if type(req) in (int, str) and (type(req) is int or len(req) <= 128) else None


def event(kind: str, session: str = "", **meta: Any) -> Message:
    if kind not in EVENT_KINDS:  # (a failed stage or a refused budget is an error's code)
        raise ValueError(f"not an event kind: {kind!r}")
    return Message(type=EVENT, session=session, meta={"kind": kind, **meta})


def error(err: Any, session: str = "", req: Any = None) -> Message:
    """An ``event`` of kind ``error`` from a GirisError (or its wire dict)."""
    payload = err.to_wire() if hasattr(err, "to_wire") else dict(err)
    meta = {"kind": "error", **payload}
    if req is not None:
        meta["req"] = req
    return Message(type=EVENT, session=session, meta=meta)


#: msgpack's defaults are what the protocol wants (str for str, bin for bytes, map keys
#: only str/bytes); bound once, called with no keyword parsing
_unpackb = msgpack.unpackb


def _bytes_of(frame: Any) -> bytes:
    if isinstance(frame, bytes):
        return frame
    if hasattr(frame, "bytes"):  # zmq.Frame
        return frame.bytes
    return bytes(frame)


def _buffer_of(frame: Any) -> Any:
    if hasattr(frame, "buffer"):  # zmq.Frame: a zero-copy view
        return frame.buffer
    return frame


def frames_nbytes(frames: Iterable[Any]) -> int:
    return sum(memoryview(f).nbytes if not hasattr(f, "buffer") else len(f.buffer) for f in frames)
