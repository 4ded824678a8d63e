"""Embedding: run the whole runtime inside a product, no network socket involved.

``with Runtime() as rt: session = rt.open_session(...)`` starts the supervisor on a
background thread (its gateway on ``inproc://``) and the stage workers as child
processes, and hands out the very same :class:`Session` objects a remote client gets.
Leaving the block closes the sessions, stops the workers and unlinks every segment.
"""
from __future__ import annotations

import os
import threading
from typing import Any

import zmq

from giris.runtime.client import Client, Session
from giris.runtime.config import Config, default_config
from giris.runtime.errors import GirisError, StageFailed


class Runtime:
    def __init__(self, config: Config | None = None, *, start_timeout: float | None = None,
                 log_level: str = "WARNING") -> None:
        self.config = config or default_config()
        self.config.server.endpoint = f"inproc://giris-{os.getpid()}-{id(self)}"
        self.start_timeout = start_timeout or self.config.timeouts.worker_start
        self.log_level = log_level
        self.ctx = zmq.Context()
        self.supervisor: Any = None
        self.client: Client | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> "Runtime":
        from giris.supervisor.supervisor import Supervisor

        self.supervisor = Supervisor(self.config, context=self.ctx, log_level=self.log_level)

        def run() -> None:
            try:
                self.supervisor.start(wait=True)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error = e
                self._started.set()
                self.supervisor.shutdown()
                return
            self._started.set()
            self.supervisor.serve_forever()

        self._thread = threading.Thread(target=run, name="giris-supervisor", daemon=True)
        self._thread.start()
        if not self._started.wait(self.start_timeout + 5):
            self.stop()
            raise GirisError("runtime did not start in time", code="start_timeout")
        if self._error is not None:
            self.stop()
            raise self._error
        failed = self.supervisor.failed_stages()
        if failed:  # a product embedding the runtime wants to know now, not at its first say
            self.stop()
            raise StageFailed(f"stage(s) {', '.join(failed)} could not start (see the log above "
                              "for the engine's reason)", stages=failed)
        self.client = Client(self.config.server.endpoint, context=self.ctx)
        return self

    def open_session(self, avatar: Any = None, **kw: Any) -> Session:
        if self.client is None:
            raise GirisError("runtime is not started", code="not_started")
        return self.client.open_session(avatar, **kw)

    def status(self) -> dict:
        assert self.client is not None
        return self.client.status()

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.supervisor is not None:
            self.supervisor.request_stop()
        if self._thread is not None:
            self._thread.join(self.config.timeouts.shutdown + 10)
            self._thread = None
        self.ctx.term()

    def __enter__(self) -> "Runtime":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
