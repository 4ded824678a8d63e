"""Structured, quiet logging: one line per event on stderr, key=value or JSON.

Nothing goes to stdout (a journal would split it badly, and ``giris status --json``
owns stdout).
"""
from __future__ import annotations

import json
import logging
import sys
import time

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in vars(record).items() if k not in _STD}
        base = {"ts": round(time.time(), 3), "level": record.levelname.lower(),
                "logger": record.name, "event": record.getMessage()}
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info).replace("\n", " | ")
        if self.as_json:
            return json.dumps({**base, **fields}, default=str)
        extra = " ".join(f"{k}={_q(v)}" for k, v in fields.items())
        return f"{base['level']:7s} {record.name}: {base['event']}" + (f" {extra}" if extra else "")


def _q(v: object) -> str:
    s = str(v)
    return json.dumps(s) if (" " in s or "=" in s or not s) else s


def setup_logging(level: str | int = "WARNING", as_json: bool = False) -> None:
    root = logging.getLogger("giris")
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_Formatter(as_json))
    root.addHandler(h)
    root.setLevel(level if isinstance(level, int) else level.upper())
    root.propagate = False
