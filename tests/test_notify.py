"""sd_notify datagrams on a real AF_UNIX socket (path and abstract)."""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from giris.supervisor.notify import Notifier


def recv(sock: socket.socket) -> str:
    sock.settimeout(2.0)
    return sock.recv(4096).decode()


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    yield path, s
    s.close()


def test_messages_on_path_socket(path_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    path, s = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = Notifier.from_env()
    assert n.enabled
    assert n.ready()
    assert recv(s) == "READY=1"
    n.status("2 sessions\nworkers ok")
    assert recv(s) == "STATUS=2 sessions workers ok"
    n.watchdog()
    assert recv(s) == "WATCHDOG=1"
    n.stopping()
    assert recv(s) == "STOPPING=1"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    lines = recv(s).split("\n")
    assert lines[0] == "RELOADING=1"
    key, usec = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= before + 5_000_000
    n.close()


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"giris-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        with Notifier.from_env() as n:
            assert n.ready()
            assert recv(s) == "READY=1"
    finally:
        s.close()


def test_unset_is_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier.from_env()
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False and n.reloading() is False


def test_send_errors_do_not_raise_and_log_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier(str(tmp_path / "nobody-listens.sock"))
    with caplog.at_level(logging.WARNING, logger="giris.notify"):
        assert n.ready() is False
        assert n.status("x") is False
    assert len([r for r in caplog.records if r.name == "giris.notify"]) == 1


def test_watchdog_interval() -> None:
    pid = str(os.getpid())
    assert Notifier.watchdog_interval({}) is None
    assert Notifier.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert Notifier.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert Notifier.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert Notifier.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert Notifier.watchdog_interval({"WATCHDOG_USEC": "abc"}) is None
    assert Notifier(None).watchdog_interval({"WATCHDOG_USEC": "1000000"}) == 0.5


def test_watchdog_interval_from_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert Notifier.from_env().watchdog_interval() == 2.0
