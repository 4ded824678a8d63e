"""The systemd notify protocol (sd_notify) without libsystemd.

Why not libsystemd/python-systemd: one more native dependency for what is a single
datagram on an AF_UNIX socket. The protocol is documented in ``sd_notify(3)``:
``$NOTIFY_SOCKET`` names a datagram socket (a filesystem path, or an abstract name written
with a leading ``@``), and each message is newline-separated ``KEY=VALUE`` assignments.

Everything here is a no-op when ``$NOTIFY_SOCKET`` is unset (not run by systemd, or
``Type=`` is not notify), and never raises on send errors: a lost status line must not
take the server down. The first failure is logged, later ones are silent.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping

log = logging.getLogger("giris.notify")


def _address(value: str) -> str | bytes:
    """``@name`` is an abstract socket: the kernel wants a leading NUL byte instead."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends sd_notify messages to ``address``; ``address=None`` makes every call a no-op."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Notifier":
        """A notifier for ``$NOTIFY_SOCKET`` (unset or empty: a no-op notifier).

        The variable is left in the environment on purpose: workers are our children and
        ``NotifyAccess=main`` makes systemd ignore them anyway.
        """
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    # ------------------------------------------------------------------ messages
    def notify(self, message: str) -> bool:
        """Send one raw message (``KEY=VALUE`` lines); True if it was sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode(), _address(self.address))
            return True
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("systemd notify failed (further failures are not logged)",
                            extra={"socket": self.address, "error": str(e)})
            return False

    def ready(self) -> bool:
        """Startup finished (every stage loaded): ``systemctl start`` returns now."""
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        """One line for ``systemctl status``; newlines would end the assignment."""
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """Keep-alive for ``WatchdogSec=``; send from the main loop so a hung loop stops it."""
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        """A reload began; send :meth:`ready` when it is done. systemd ≥ 253
        (``Type=notify-reload``) wants the CLOCK_MONOTONIC timestamp with it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    # ------------------------------------------------------------------ watchdog
    @staticmethod
    def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC`` as
        ``sd_watchdog_enabled(3)`` advises, or None when the watchdog is off, malformed, or
        meant for another process (``$WATCHDOG_PID`` set and not ours)."""
        env = os.environ if environ is None else environ
        pid = env.get("WATCHDOG_PID")
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2e6

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Notifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
