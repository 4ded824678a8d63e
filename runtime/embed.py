"""Embedding: run the whole runtime inside a product, no network socket involved.

``with Runtime() as rt: session = rt.open_session(...)`` starts the supervisor on a
background thread (its gateway on ``inproc://``) and the stage workers as child
processes, and hands out the very same :class:`Session` objects a remote client gets.
Leaving the block closes the sessions, stops the workers and unlinks every segment.
"""
from __future__ import annotations

import copy
import itertools
import logging
import os
import threading
from typing import Any

import zmq

from giris.runtime.client import Client, Session, _seconds, forwards_to
from giris.runtime.config import Config, default_config
from giris.runtime.errors import GirisError, StageFailed

log = logging.getLogger("giris.embed")

_RUNTIME_IDS = itertools.count(1)


class Runtime:
    """The runtime in this process. ``start()`` on a running runtime returns it as it is
    (so ``with Runtime().start() as rt:`` works); a stopped one may be started again.
    The config is copied: the caller's keeps its endpoint."""

    def __init__(self, config: Config | None = None, *, start_timeout: float | None = None,
                 log_level: str = "WARNING", log_json: bool = False) -> None:
        self.config = copy.deepcopy(config) if config is not None else default_config()
        # numbered, not by id(self): a collected runtime's id is the next one's
        self.config.server.endpoint = f"inproc://giris-{os.getpid()}-{next(_RUNTIME_IDS)}"
        # (0 was taken as the default, a negative one as given)
        self.start_timeout = (self.config.timeouts.worker_start if start_timeout is None
                              else _seconds(start_timeout, "start_timeout"))
        self.log_level, self.log_json = log_level, log_json
        self.ctx: zmq.Context | None = None
        self.supervisor: Any = None
        self.client: Client | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stopping = threading.Lock()
        self._error: BaseException | None = None

    def start(self) -> "Runtime":
        """Start the supervisor and its workers and wait until every stage is ready.
        Whatever ends the wait (a failure, the timeout, Ctrl-C) stops what was started:
        no worker, segment or socket folder outlives a failed start."""
        if self._thread is not None:
            return self
        from giris.supervisor.supervisor import Supervisor

        self.ctx = zmq.Context()
        self._error = None
        self._stop = stop = threading.Event()
        started = threading.Event()
        try:
            self.supervisor = sup = Supervisor(self.config, context=self.ctx, log_level=self.log_level,
                                               log_json=self.log_json)
            self._thread = threading.Thread(target=self._run, args=(sup, started),
                                            name="giris-supervisor", daemon=True)
            self._thread.start()
            if not started.wait(self.start_timeout + 5):  # the thread keeps its own deadline
                raise GirisError("runtime did not start in time", code="start_timeout")
            if self._error is not None:
                raise self._error
            if stop.is_set():  # stop() from another thread while this one waited
                raise GirisError("the runtime was stopped while it started", code="not_started")
            failed = sup.failed_stages()
            if failed:  # a product embedding the runtime wants to know now, not at its first say
                raise StageFailed(f"stage(s) {', '.join(failed)} could not start (see the log "
                                  "above for the engine's reason)", stages=failed)
            self.client = Client(self.config.server.endpoint, context=self.ctx)
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self, sup: Any, started: threading.Event) -> None:
        try:
            sup.start(wait=False)
            sup.wait_ready(self.start_timeout)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self._error = e
            started.set()
            sup.shutdown()
            return
        started.set()
        sup.serve_forever()  # returns at once (and shuts down) where stop() was called

    def _client(self) -> Client:
        if self.client is None:
            raise GirisError("the runtime is not started (or was stopped): call start()",
                             code="not_started")
        return self.client

    @forwards_to(Client.open_session)
    def open_session(self, avatar: Any = None, **kw: Any) -> Session:
        return self._client().open_session(avatar, **kw)

    @forwards_to(Client.status)
    def status(self, **kw: Any) -> dict:
        return self._client().status(**kw)

    def stop(self) -> None:
        """Close the sessions, stop the workers, unlink the segments. Safe to call again,
        also after a stop that was itself interrupted, and from another thread while
        ``start()`` waits (the two stops take turns)."""
        self._stop.set()
        if self.supervisor is not None:
            self.supervisor.request_stop()
        with self._stopping:
            if self.client is not None:
                self.client.close()
                self.client = None
            if self._thread is not None:
                self._thread.join(self.config.timeouts.shutdown + 10)
                if self._thread.is_alive():  # its sockets are open: term() would hang
                    log.warning("the supervisor thread did not stop in time")
                    return
                self._thread = None
            self.supervisor = None
            if self.ctx is not None:
                self.ctx.term()
                self.ctx = None

    def __enter__(self) -> "Runtime":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
