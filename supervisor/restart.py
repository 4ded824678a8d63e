"""When to restart a crashed stage, and when to give up on it."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class RestartPolicy:
    """Exponential backoff; more than ``max_restarts`` crashes in ``window`` s = failed."""

    backoff_initial: float = 0.25
    backoff_max: float = 8.0
    max_restarts: int = 5
    window: float = 60.0
    crashes: deque = field(default_factory=deque)

    def record_crash(self, now: float | None = None) -> float | None:
        """Note a crash; return the delay before the next start, or None to give up."""
        now = time.monotonic() if now is None else now
        self.crashes.append(now)
        while self.crashes and self.crashes[0] < now - self.window:
            self.crashes.popleft()
        n = len(self.crashes)
        if n > self.max_restarts:
            return None
        return min(self.backoff_max, self.backoff_initial * (2 ** (n - 1)))

    def reset(self) -> None:
        self.crashes.clear()
