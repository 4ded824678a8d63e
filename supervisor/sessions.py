"""Open sessions, who owns them, and what they cost each device (admission by budget)."""
from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

from giris.runtime.errors import BudgetExceeded, LimitExceeded, SessionNotFound
from giris.runtime.shm_pool import session_tag


#: live audio in (``audio_in``) has a budget of its own, apart from requests (``say``):
#: seconds of audio per second of wall time, averaged over a burst of AUDIO_BURST_S of audio
#: (a client may send ahead, or catch up after a stall) ...
AUDIO_RATE = 4.0
AUDIO_BURST_S = 12.0
#: ... and messages per second, however short (10 ms chunks are 100 a second)
AUDIO_MESSAGES_PER_S = 500


@dataclass
class Utterance:
    id: int
    said_at: float
    last_progress: float
    frames: int = 0
    first_frame_at: float | None = None
    interrupted: bool = False
    cancelled: bool = False
    #: its input ended (a say, or audio_in with final): no more audio may join it
    closed_input: bool = False
    #: a ``say``: its text is with the first stage, and lost with it if that stage dies
    #: before its audio ended (``audio_in`` goes on: its client sends the rest)
    from_text: bool = False
    #: an idle stream (``audio_in`` with ``idle``): it yields to the session's next
    #: utterance when that one's first frame is paced (a live session)
    yields: bool = False
    #: its stages were told to drop it (what they made of it still plays)
    stopped: bool = False
    #: when the last stage's final frame (or mark) came; the utterance is done once the
    #: client streams from earlier stages (audio, coefficients) have ended too
    ended_at: float | None = None
    #: message types whose final message came (``audio``, ``coeffs``)
    finals: set = field(default_factory=set)
    #: its audio as the supervisor saw it: [start, stop) samples at ``sample_rate`` (the
    #: frames it must make); a restart of any stage but the first cut nothing if they all came
    audio_start: int | None = None
    audio_stop: int = 0
    sample_rate: int = 0
    #: its first and last frame index
    first_seq: int | None = None
    last_seq: int = -1
    #: the first stage died while it was in flight: what it held cannot be told (live
    #: audio in it is gone without a trace in the output)
    source_cut: bool = False


@dataclass
class SessionRecord:
    token: str
    client: bytes
    #: the CURVE public key the client proved (None on ipc/inproc/insecure tcp)
    user: str | None
    spec: dict[str, Any]
    avatar: bytes | None
    estimate: dict[str, int]
    tag: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    next_utterance: int = 1
    utterances: dict[int, Utterance] = field(default_factory=dict)
    #: end of the audio seen so far on the session clock (replayed to a restarted tts)
    audio_end: int = 0
    #: audio chunks numbered so far (``seq``), also replayed: a restarted tts numbered
    #: from 0 again, and the session's chunk numbers repeated
    audio_chunks: int = 0
    requests: deque = field(default_factory=deque)
    #: audio_in messages in the last second, and the audio budget left (seconds) as of when
    audio_messages: deque = field(default_factory=deque)
    audio_budget: tuple[float, float] | None = None
    frames_out: int = 0
    #: the highest frame index delivered, to tell clients where a gap starts
    last_frame: int = -1

    def __post_init__(self) -> None:
        self.tag = session_tag(self.token)

    def live_utterances(self) -> Iterator[Utterance]:
        """The session's utterances, oldest first, each only while it still is one:
        ending one may end others (an idle stream with the one before it), and a loop
        that ends them must skip those."""
        for utt in list(self.utterances.values()):
            if utt.id in self.utterances:
                yield utt

    @property
    def client_tag(self) -> int:
        """A stable tag for the connection (and CURVE key) that owns the session: stages
        cap what one client's sessions hold together (``session_tag`` space, never 0)."""
        return session_tag("client:" + self.client.hex() + ":" + (self.user or ""))

    @property
    def zero_copy(self) -> bool:
        return bool(self.spec.get("zero_copy"))

    @property
    def realtime(self) -> bool:
        return bool(self.spec.get("realtime"))

    def rate_check(self, per_second: float, now: float) -> None:
        """At most ``per_second`` requests in any one-second window."""
        _within(self.requests, per_second, now, "requests")
        self.requests.append(now)

    def audio_check(self, seconds: float, now: float) -> None:
        """Live audio: its own budget, so 10 ms chunks (100 a second) never count against
        ``say`` and ``cancel``. A token bucket of AUDIO_BURST_S seconds of audio refilled at
        AUDIO_RATE seconds per second, and at most AUDIO_MESSAGES_PER_S messages in any
        one-second window. A message longer than the burst passes on a full bucket (and
        overdraws it). Nothing is charged for a refused message."""
        _within(self.audio_messages, AUDIO_MESSAGES_PER_S, now, "audio_in messages")
        left, at = self.audio_budget or (AUDIO_BURST_S, now)
        left = min(AUDIO_BURST_S, left + (now - at) * AUDIO_RATE)
        if seconds > left and left < AUDIO_BURST_S:  # one long message alone may overdraw
            raise LimitExceeded(f"live audio faster than {AUDIO_RATE:g} s per second (bursts of "
                                f"{AUDIO_BURST_S:g} s)", code="rate_limited", limit=AUDIO_RATE,
                                burst=AUDIO_BURST_S)
        self.audio_budget = (left - seconds, now)
        self.audio_messages.append(now)


def _within(window: deque, per_second: float, now: float, what: str) -> None:
    """Forget the stamps in ``window`` older than a second; refuse one more past
    ``per_second`` of them (the caller appends ``now`` when it takes it)."""
    while window and window[0] <= now - 1.0:
        window.popleft()
    if len(window) >= per_second:
        raise LimitExceeded(f"more than {per_second:g} {what} per second", code="rate_limited",
                            limit=per_second)


class SessionRegistry:
    def __init__(self, budgets: dict[str, int]) -> None:
        self.budgets = dict(budgets)
        self.sessions: dict[str, SessionRecord] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def __iter__(self) -> Iterator[SessionRecord]:
        return iter(list(self.sessions.values()))

    @staticmethod
    def new_token() -> str:
        return secrets.token_urlsafe(24)  # 192 bits: unguessable

    def add(self, rec: SessionRecord) -> None:
        self.sessions[rec.token] = rec

    def remove(self, token: str) -> SessionRecord | None:
        return self.sessions.pop(token, None)

    def lookup(self, token: str) -> SessionRecord | None:
        return self.sessions.get(token)

    def owned(self, token: str, client: bytes, user: str | None) -> SessionRecord:
        """The session, if ``client`` owns it. A foreign token reads exactly like a made-up
        one, so a client learns nothing about other clients' sessions."""
        rec = self.sessions.get(token)
        if rec is None or rec.client != client or rec.user != user:
            raise SessionNotFound("no such session for this client", code="unknown_session")
        return rec

    def of_client(self, client: bytes) -> list[SessionRecord]:
        return [r for r in self.sessions.values() if r.client == client]

    def of_tenant(self, client: bytes, user: str | None) -> list[SessionRecord]:
        """The sessions of one client as limits count it: every connection of its CURVE
        key (``user``), or its connection where it has no key."""
        if user is None:
            return self.of_client(client)
        return [r for r in self.sessions.values() if r.user == user]

    def live_load(self) -> float:
        """The live sessions' load, in 512² sessions at 25 FPS (see ``live_load``)."""
        return sum(live_load(r.spec) for r in self.sessions.values())

    def admit_live(self, spec: dict[str, Any], capacity: float) -> None:
        """Raise LimitExceeded, with the figures, if a live session of ``spec`` would take
        the live sessions past ``capacity`` (0: no limit)."""
        need = live_load(spec)
        if not capacity or not need:
            return
        used = self.live_load()
        if used + need > capacity + 1e-9:
            raise LimitExceeded(
                f"live sessions: this one needs {need:.2f} of the server's live capacity, "
                f"{used:.2f} of {capacity:g} in use (in 512² sessions at 25 FPS); try a "
                "smaller size, fewer frames per second, or an offline session",
                limit=capacity, requested=round(need, 4), in_use=round(used, 4))

    def usage(self) -> dict[str, int]:
        used: dict[str, int] = {}
        for rec in self.sessions.values():
            for dev, n in rec.estimate.items():
                used[dev] = used.get(dev, 0) + int(n)
        return used

    def admit(self, estimate: dict[str, int]) -> None:
        """Raise BudgetExceeded, with the figures, if ``estimate`` does not fit every budget."""
        used = self.usage()
        for dev, need in estimate.items():
            budget = self.budgets.get(dev)
            if budget is None or need <= 0:
                continue
            if used.get(dev, 0) + need > budget:
                raise BudgetExceeded(
                    f"{dev}: session needs {need} bytes, {used.get(dev, 0)} of {budget} in use",
                    device=dev, requested=int(need), in_use=int(used.get(dev, 0)), budget=int(budget))


def live_load(spec: dict[str, Any]) -> float:
    """What a session costs the renderer live, in 512² sessions at 25 FPS: pixels times
    frame rate (0 for an offline session, which takes frames as they come)."""
    if not spec.get("realtime"):
        return 0.0
    return (float(spec.get("size", 512)) / 512) ** 2 * float(spec.get("fps", 25)) / 25
