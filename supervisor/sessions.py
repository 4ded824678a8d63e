"""Open sessions, who owns them, and what they cost each device (admission by budget)."""
from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

from giris.runtime.errors import BudgetExceeded, LimitExceeded, SessionNotFound
from giris.runtime.shm_pool import session_tag


@dataclass
class Utterance:
    id: int
    said_at: float
    last_progress: float
    frames: int = 0
    first_frame_at: float | None = None
    interrupted: bool = False
    cancelled: bool = False
    #: when the last stage's final frame (or mark) came; the utterance is done once the
    #: client streams from earlier stages (audio, coefficients) have ended too
    ended_at: float | None = None
    #: message types whose final message came (``audio``, ``coeffs``)
    finals: set = field(default_factory=set)


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
    requests: deque = field(default_factory=deque)
    frames_out: int = 0
    #: the highest frame index delivered, to tell clients where a gap starts
    last_frame: int = -1

    def __post_init__(self) -> None:
        self.tag = session_tag(self.token)

    @property
    def zero_copy(self) -> bool:
        return bool(self.spec.get("zero_copy"))

    @property
    def realtime(self) -> bool:
        return bool(self.spec.get("realtime"))

    def rate_check(self, per_second: float, now: float) -> None:
        """At most ``per_second`` requests in any one-second window."""
        while self.requests and self.requests[0] <= now - 1.0:
            self.requests.popleft()
        if len(self.requests) >= per_second:
            raise LimitExceeded(f"more than {per_second:g} requests per second", code="rate_limited",
                                limit=per_second)
        self.requests.append(now)


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
