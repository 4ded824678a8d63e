"""The client-facing ROUTER socket: validate every request, answer every one.

Whatever a client sends, it gets an answer (a ``reply`` or an ``error`` event) and the
server goes on serving everyone else. Sessions are bound to the connection that opened
them (and, over CURVE, to the client's public key): another client's token reads as
unknown.
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from giris.runtime import protocol as P
from giris.runtime.errors import BadInput, GirisError, LimitExceeded, ProtocolError, StageFailed
from giris.runtime.spec import SPEC_KEYS, check_text, number, session_spec
from giris.runtime.transport import ipc_path, send
from giris.supervisor.outbox import CLIENT_HWM, Outbox
from giris.supervisor.sessions import SessionRecord, Utterance

if TYPE_CHECKING:
    from giris.supervisor.supervisor import Supervisor

log = logging.getLogger("giris.gateway")

#: messages one connection may send in a second: every session of a client at its own
#: ``audio_in`` limit fits (8 × 500). Past it the rest of that second's are dropped
#: unread, the first of them answered ``rate_limited``: a client sending heartbeats as
#: fast as it could kept the supervisor's core busy and a live client beside it missed
#: its 25 FPS (frame gaps p99 117 ms, 325 ms under a flood of ``status``)
CLIENT_MESSAGES_PER_S = 5000
#: what a ``status`` counts against that, in messages (building one walks every worker
#: and pool: ~50 times a heartbeat's work), so 100 a second at most
STATUS_COST = 50


class Gateway:
    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup
        self.sock: zmq.Socket = None  # type: ignore[assignment]
        self._socket_file: tuple[str, int] | None = None  # (path, inode) of the ipc socket bound
        self.authenticator: Any = None
        #: messages each connection sent in the second that began at ``_window_at``
        self._sent: dict[bytes, int] = {}
        self._told: set[bytes] = set()  # (those told they passed it, this second)
        self._window_at = 0.0

    # ------------------------------------------------------------------ socket
    def bind(self, endpoint: str) -> None:
        cfg = self.sup.config.server
        self.sock = self.sup.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # a client's full queue is an error we see (the outbox keeps what waits), not a drop
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, CLIENT_HWM)
        self.outbox = Outbox(self.sup, self.sock)
        if endpoint.startswith("tcp://"):
            if cfg.curve_secret_key:
                from giris.supervisor.security import enable_curve

                self.authenticator = enable_curve(self.sup.ctx, self.sock, cfg.curve_secret_key,
                                                  cfg.curve_client_keys)
            elif not cfg.insecure:
                raise GirisError("a tcp:// endpoint needs CURVE keys (server.curve_secret_key) "
                                 "or an explicit --insecure", code="insecure_endpoint")
            else:
                log.warning("serving tcp WITHOUT encryption or authentication",
                            extra={"endpoint": endpoint})
        path = ipc_path(endpoint)
        if path and cfg.ipc_mode & 0o007 and not cfg.insecure:
            raise GirisError(f"server.ipc_mode {cfg.ipc_mode:#o} lets every local user connect, with no "
                             "authentication: use 0o660 (the socket's group) or an explicit --insecure",
                             code="insecure_endpoint")
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            _claim(path, endpoint)
        old = os.umask(0o177)
        try:
            self.sock.bind(endpoint)
        except zmq.ZMQError as e:  # (it read "cannot connect", from the client's wording)
            raise GirisError(f"cannot listen on {endpoint}: {e}", code="endpoint_in_use"
                             if e.errno == zmq.EADDRINUSE else "bad_endpoint") from None
        finally:
            os.umask(old)
        if path:
            os.chmod(path, cfg.ipc_mode)  # owner only unless configured, whatever the dir allows
            if cfg.ipc_mode & 0o077:
                log.warning("the ipc socket admits more than its owner", extra={
                    "path": path, "mode": f"{cfg.ipc_mode:#o}",
                    "who": "every local user" if cfg.ipc_mode & 0o007 else "its group"})
            self._socket_file = (path, os.stat(path).st_ino)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        if self._socket_file is not None:  # ours only: never a file another made
            path, ino = self._socket_file
            self._socket_file = None
            try:
                if os.stat(path).st_ino == ino:
                    os.unlink(path)
            except OSError:
                pass
        if self.authenticator is not None:
            self.authenticator.stop()

    def drain(self, limit: int = 256) -> None:
        max_bytes = self.sup.config.server.max_message_bytes
        for _ in range(limit):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            client = frames[0].bytes
            if client in self.outbox.stalled or self._flooding(client):
                continue  # reads nothing (answering only fed our heap), or floods
            user = None
            if self.authenticator is not None:
                try:
                    user = frames[-1].get("User-Id") or None
                except (zmq.ZMQError, AttributeError):
                    user = None
            req = None
            try:
                try:
                    msg = P.decode(frames[1:], max_bytes=max_bytes)
                except ProtocolError:
                    req = P.request_id(frames[1:])  # so the client's waiter gets its answer now
                    raise
                req = msg.meta.get("req")
                if msg.type not in P.CLIENT_TYPES:
                    raise ProtocolError(f"clients cannot send {msg.type!r}", code="unknown_type")
                self.handle(client, user, msg)
            except GirisError as e:
                self.sup.delivery.count_error(e.code)
                self.to(client, P.error(e, req=req if _plain(req) else None))
            except Exception as e:  # noqa: BLE001 - no request may take the server down
                log.exception("request failed")
                self.to(client, P.error(GirisError(f"internal error: {type(e).__name__}"),
                                        req=req if _plain(req) else None))

    def _flooding(self, client: bytes) -> bool:
        """Whether ``client`` sent more than ``CLIENT_MESSAGES_PER_S`` this second (the
        first one past it is answered ``rate_limited``). Counted before a message is
        decoded: a flood costs a receive, not the work of an answer (a ``status``, known
        once decoded, counts ``STATUS_COST``)."""
        now = time.monotonic()
        if now - self._window_at >= 1.0:
            self._window_at, self._sent, self._told = now, {}, set()
        n = self._sent[client] = self._sent.get(client, 0) + 1
        if n <= CLIENT_MESSAGES_PER_S:
            return False
        if client not in self._told:
            self._told.add(client)
            err = LimitExceeded(f"more than {CLIENT_MESSAGES_PER_S} messages a second from one "
                                "connection: the rest of this second's are dropped unanswered",
                                code="rate_limited", limit=CLIENT_MESSAGES_PER_S)
            self.sup.delivery.count_error(err.code)
            self.to(client, P.error(err))
        return True

    def to(self, client: bytes, msg: P.Message, inline: bool = False, droppable: bool = False) -> None:
        """Send to ``client`` in order (see :mod:`giris.supervisor.outbox`)."""
        self.outbox.to(client, msg, inline, droppable)

    def reply(self, client: bytes, req: Any, session: str = "", **meta: Any) -> None:
        self.to(client, P.Message(P.REPLY, session=session, meta={"req": req, "ok": True, **meta}))

    # ------------------------------------------------------------------ requests
    def handle(self, client: bytes, user: str | None, msg: P.Message) -> None:
        now = time.monotonic()
        for rec in self.sup.registry.of_client(client):
            rec.last_seen = now
        req = msg.meta.get("req")
        if msg.type == P.HEARTBEAT:
            self.to(client, P.Message(P.HEARTBEAT, meta={"req": req}))
        elif msg.type == P.STATUS:
            self._sent[client] = self._sent.get(client, 0) + STATUS_COST - 1
            self.reply(client, req, status=self.sup.status())
        elif msg.type == P.OPEN_SESSION:
            self.open_session(client, user, msg)
        else:
            rec = self.sup.registry.owned(msg.session, client, user)
            if msg.type == P.CLOSE_SESSION:
                self.close_session(rec, reason="closed", notify=False)
                self.reply(client, req, session=rec.token)
            elif msg.type == P.RELEASE:
                self.release(rec, msg)
            elif msg.type == P.SAY:
                rec.rate_check(self.sup.config.limits.max_requests_per_second, now)
                self.say(rec, msg)
            elif msg.type == P.AUDIO_IN:  # a budget of its own, in seconds of audio
                self.audio_in(rec, msg, now)
            elif msg.type == P.CANCEL:
                self.cancel(rec, msg)

    def _check_stages(self) -> None:
        failed = [w for w in self.sup.workers if w.state == "failed"]
        if failed:
            raise StageFailed("stage(s) " + ", ".join(f"{w.stage} failed ({w.retry_note()})" for w in failed),
                              stages=[w.stage for w in failed])
        if self.sup.stopping:
            raise GirisError("server is shutting down", code="shutting_down")

    def open_session(self, client: bytes, user: str | None, msg: P.Message) -> None:
        sup, limits = self.sup, self.sup.config.limits
        req = msg.meta.get("req")
        self._check_stages()
        if not sup.announced_ready:  # (it said "a stage is restarting" while the models loaded)
            raise GirisError("the server is starting (its stages are loading); try again shortly",
                             code="stage_unavailable")
        if any(w.state != "ready" for w in sup.workers):
            raise GirisError("a stage is restarting; try again shortly", code="stage_unavailable")
        self.check_session_limits(client, user)  # and again below, when it is added
        spec = self.validate_spec(msg.meta.get("spec", {}))
        sup.registry.admit_live(spec, limits.live_capacity)  # and again below, when it is added
        avatar = None
        if msg.tensors:
            a = sup.pools.array(msg, msg.tensors[0]) if msg.tensors[0].pool is None else None
            if a is None or a.dtype != np.uint8 or a.ndim != 1:
                raise BadInput("the avatar travels inline as encoded image bytes (uint8, 1-D)")
            if a.nbytes > limits.max_image_bytes:
                raise LimitExceeded(f"avatar image of {a.nbytes} bytes exceeds {limits.max_image_bytes}",
                                    code="too_large", limit=limits.max_image_bytes)
            avatar = a.tobytes()
            spec.pop("avatar_name", None)  # the portrait is the one sent (the reply said otherwise)
        spec["max_image_pixels"] = limits.max_image_pixels

        def control(estimate_only: bool, **extra: Any) -> P.Message:
            m = P.Message(P.OPEN_SESSION, meta={"spec": spec, "estimate_only": estimate_only, **extra})
            if avatar is not None:
                m.buffers.append(avatar)
            return m

        def estimated(replies: dict[str, dict]) -> None:
            err = _first_error(replies)
            if err:
                sup.delivery.count_error(str(err.get("code")))
                return self.to(client, P.error(err, req=req))
            total: dict[str, int] = {}
            for r in replies.values():
                for dev, n in (r.get("estimate") or {}).items():
                    total[dev] = total.get(dev, 0) + int(n)
            try:
                # again: other sessions may have been added while the stages estimated
                self.check_session_limits(client, user)
                sup.registry.admit(total)
                sup.registry.admit_live(spec, sup.config.limits.live_capacity)
            except GirisError as e:
                sup.delivery.count_error(e.code)
                return self.to(client, P.error(e, req=req))
            rec = SessionRecord(token=sup.registry.new_token(), client=client, user=user,
                                spec=spec, avatar=avatar, estimate=total)
            # the stages cap what one client's sessions hold of their pools together; in the
            # spec, so a restarted stage gets it back with the session (clients cannot set it:
            # validate_spec refuses unknown keys). Embedded (inproc), the product is the only
            # client there is: its sessions share nothing with anyone, so no cap
            spec["client_tag"] = 0 if sup.endpoint.startswith("inproc://") else rec.client_tag
            sup.registry.add(rec)  # reserves the budget while stages open it

            def opened(replies: dict[str, dict]) -> None:
                err = _first_error(replies)
                if err or sup.registry.lookup(rec.token) is None:
                    self.close_session(rec, reason="failed", notify=False)
                    err = err or {"code": "unknown_session", "message": "session closed while opening"}
                    sup.delivery.count_error(str(err.get("code")))
                    return self.to(client, P.error(err, req=req))
                log.info("session opened", extra={"session": rec.token[:8], "spec": _brief(spec)})
                # the effective spec, as a client could send it again: less the server's own
                # keys (max_image_pixels was in it, and a spec sent back was refused for it)
                self.reply(client, req, session=rec.token, estimate=total,
                           spec={k: v for k, v in spec.items() if k in SPEC_KEYS})

            sup.fan_out(P.Message(P.OPEN_SESSION, session=rec.token,
                                  meta={"spec": spec, "tag": rec.tag},
                                  buffers=[avatar] if avatar is not None else []), opened)

        sup.fan_out(control(True), estimated)

    def check_session_limits(self, client: bytes, user: str | None) -> None:
        """Raise LimitExceeded if one more session would pass ``max_sessions`` or
        ``max_sessions_per_client``: a client is its CURVE key where it has one (each
        connection of one key counted alone, a key took 8 sessions per connection it
        opened), else its connection. Checked when the open comes and again when the
        session is added after the stages' estimates: checked only first, every open in
        flight together passed it (five back-to-back opens at ``max_sessions = 2``: five
        sessions)."""
        limits = self.sup.config.limits
        if len(self.sup.registry) >= limits.max_sessions:
            raise LimitExceeded(f"server holds its maximum of {limits.max_sessions} sessions",
                                limit=limits.max_sessions)
        if len(self.sup.registry.of_tenant(client, user)) >= limits.max_sessions_per_client:
            raise LimitExceeded(f"at most {limits.max_sessions_per_client} sessions per client"
                                + (" (its key, over all its connections)" if user else ""),
                                limit=limits.max_sessions_per_client)

    def validate_spec(self, raw: Any) -> dict[str, Any]:
        spec = session_spec(self.sup.config.defaults, raw, self.sup.config.limits)
        offers = self.sup.offers()
        want = spec.get("want", ["audio", "frames"] if offers is None or "frames" in offers else offers)
        missing = [w for w in want if offers is not None and w not in offers]
        if missing:
            raise BadInput(f"this server's pipeline ({' → '.join(self.sup.config.stage_names())}) makes "
                           f"no {', '.join(missing)}; it offers {', '.join(offers) or 'nothing'}",  # type: ignore[arg-type]
                           offers=offers)
        spec["want"] = list(want)
        if spec["zero_copy"] and self.sup.endpoint.startswith("tcp://"):
            spec["zero_copy"] = False  # a remote client cannot map our pool: inline bytes
        return spec

    def say(self, rec: SessionRecord, msg: P.Message) -> None:
        self._check_stages()
        text = check_text(msg.meta.get("text"), self.sup.config.limits)
        for key in ("batch", "trace"):
            if type(msg.meta.get(key, False)) is not bool and msg.meta.get(key) is not None:
                raise BadInput(f"{key} must be true or false")
        meta: dict[str, Any] = {"text": text}
        for key in ("emotion", "intensity", "rate", "batch"):
            if msg.meta.get(key) is not None:
                meta[key] = msg.meta[key]
        if "intensity" in meta:
            number(meta, "intensity", 0.0, 1.0)
        if "rate" in meta:
            number(meta, "rate", *P.RATE_RANGE)
        if "emotion" in meta and not isinstance(meta["emotion"], str):
            raise BadInput("emotion must be a string")
        if msg.meta.get("trace") is True:  # stamps of each process on the way (same-host clocks)
            meta["trace"] = [["gateway", time.monotonic()]]
        utt = self.new_utterance(rec)
        utt.closed_input = utt.from_text = True
        meta["utterance"] = utt.id
        send(self.sup.first_stage_socket(), P.Message(P.SAY, session=rec.token, seq=utt.id, meta=meta))
        self.reply(rec.client, msg.meta.get("req"), session=rec.token, utterance=utt.id)

    def audio_in(self, rec: SessionRecord, msg: P.Message, now: float) -> None:
        self._check_stages()
        if len(msg.tensors) != 1 or msg.tensors[0].pool is not None:
            raise BadInput("audio_in carries one inline int16 tensor")
        pcm = msg.inline_array(msg.tensors[0])
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise BadInput("audio_in must be mono int16 PCM")
        sr = msg.meta.get("sample_rate")
        if not isinstance(sr, int) or not 8000 <= sr <= 96000:
            raise BadInput("sample_rate must be an integer in 8000..96000")
        utt_id = _utterance(msg)
        utt: Utterance | None = None
        if utt_id is not None:
            utt = rec.utterances.get(utt_id)
            if utt is None or utt.cancelled:
                raise BadInput("unknown or finished utterance for audio_in")
            if utt.closed_input:  # its frames were already counted to its end
                raise BadInput(f"utterance {utt_id} has ended its audio (final, or it is a say)")
        final = msg.meta.get("final", False)
        if type(final) is not bool:
            raise BadInput("final must be true or false")
        idle = msg.meta.get("idle", False)
        if type(idle) is not bool:
            raise BadInput("idle must be true or false")
        if utt is None:
            self.room(rec)  # before its audio is charged: nothing is, for a refused message
        try:
            rec.audio_check(pcm.shape[0] / sr, now)
        except LimitExceeded as e:
            if utt is not None:  # the utterance has a gap now: end it, never leave it open
                self.end_utterance(rec, utt, e)
            raise
        if utt is None:
            utt = self.new_utterance(rec)
            utt.yields = idle
        utt.closed_input = final
        out = P.Message(P.AUDIO_IN, session=rec.token, seq=utt.id,
                        meta={"utterance": utt.id, "sample_rate": sr, "final": final})
        out.add_inline(pcm)
        send(self.sup.first_stage_socket(), out)
        self.reply(rec.client, msg.meta.get("req"), session=rec.token, utterance=utt.id)

    def cancel(self, rec: SessionRecord, msg: P.Message) -> None:
        utt = _utterance(msg)
        targets = [u for u in rec.utterances.values() if utt is None or u.id == utt]
        # a live utterance the stages are done with still plays from the pacing queue
        playing = self.sup.delivery.playing(rec, utt)
        self.stop_stages(rec, utt)
        self.reply(rec.client, msg.meta.get("req"), session=rec.token,
                   cancelled=sorted([u.id for u in targets] + list(playing)))
        self.sup.delivery.cut_playing(rec, playing)
        for u in targets:
            u.cancelled = True
            self.sup.delivery.utterance_done(rec, u, complete=False, cancelled=True)

    def end_utterance(self, rec: SessionRecord, utt: Utterance, err: GirisError) -> None:
        """End ``utt`` before its time for ``err``: the stages drop it, its stream gets the
        error (a reader raises it) and at once ``utterance_done`` (not complete), with
        nothing of it after them."""
        self.stop_stages(rec, utt.id)
        ev = P.error(err, session=rec.token)
        ev.meta["utterance"] = utt.id
        self.to(rec.client, ev)
        self.sup.delivery.utterance_done(rec, utt, complete=False, at_once=True, error=err.code)

    def yield_idle(self, rec: SessionRecord) -> None:
        """A new utterance comes: the stages stop making the session's idle streams now
        (a renderer drawing them ahead held the new one's frames back behind them, ~0.5 s);
        in a live session what they made plays on until the new utterance's first frame
        takes over (:meth:`Delivery.take_over`). An offline session has no takeover (that
        is the live pacing's): its idle streams end here, ``cancelled``. They were left
        stopped and never ended: no ``utterance_done``, a reader waiting on them for
        good, and the session's oldest utterance kept so that none behind it could be
        declared lost after a restart."""
        for u in rec.live_utterances():
            if u.yields and not u.stopped and not u.cancelled:
                u.stopped = True
                self.stop_stages(rec, u.id)
                if not rec.realtime:
                    self.sup.delivery.utterance_done(rec, u, complete=False, cancelled=True)

    def stop_stages(self, rec: SessionRecord, utterance: int | None) -> None:
        """Have every stage drop ``utterance`` of the session (all of them when None): the
        cancel goes down the pipeline from the first stage, behind what it already sent."""
        send(self.sup.first_stage_socket(), P.Message(P.CANCEL, session=rec.token,
                                                      meta={"utterance": utterance}))

    def release(self, rec: SessionRecord, msg: P.Message) -> None:
        refs = msg.meta.get("refs")
        if not isinstance(refs, list):
            raise BadInput("release needs refs")
        for r in refs:  # every one: the header's 256 KiB bounds the work (~8,000 refs)
            try:
                pool = self.sup.pools.pools.get(str(r["pool"]))
                slot, lease = int(r["slot"]), int(r["lease"])
            except (KeyError, TypeError, ValueError):
                raise BadInput("bad release reference") from None
            if pool is None or not 0 <= slot < pool.n_slots:
                continue
            if pool.owner_of(slot) == rec.tag:  # only your own slots
                pool.release(slot, lease)

    def room(self, rec: SessionRecord) -> None:
        """Refuse a new utterance of ``rec`` past ``max_utterances_per_session`` in flight.
        ``say``s within their rate, unbounded, queued up work and the books of it without
        end (20 a second a session: ~1 GB an hour of records in the supervisor and of
        texts in the tts, the session's speech hours deep)."""
        cap = self.sup.config.limits.max_utterances_per_session
        if len(rec.utterances) >= cap:
            raise LimitExceeded(f"at most {cap} utterances in flight per session: wait for one "
                                "to end (utterance_done) or cancel one", limit=cap,
                                in_flight=len(rec.utterances))

    def new_utterance(self, rec: SessionRecord) -> Utterance:
        """A new utterance of ``rec`` (if it has room), taking over from its idle streams."""
        self.room(rec)
        self.yield_idle(rec)
        now = time.monotonic()
        utt = Utterance(id=rec.next_utterance, said_at=now, last_progress=now)
        rec.next_utterance += 1
        rec.utterances[utt.id] = utt
        return utt

    # ------------------------------------------------------------------ endings
    def close_session(self, rec: SessionRecord, reason: str, notify: bool = True) -> None:
        sup = self.sup
        if sup.registry.remove(rec.token) is None:
            return
        sup.tell_workers(P.Message(P.CLOSE_SESSION, session=rec.token, meta={"req": None}))
        sup.delivery.forget(rec)
        self.outbox.forget(rec.token)
        for pool in sup.pools.pools.values():
            pool.reclaim(owner=rec.tag)
        if notify:
            self.to(rec.client, P.event("session_closed", session=rec.token, reason=reason))
        log.info("session closed", extra={"session": rec.token[:8], "reason": reason})

    def tick(self, now: float) -> None:
        idle = self.sup.config.timeouts.client_idle
        for rec in self.sup.registry:
            if now - rec.last_seen > idle:
                self.close_session(rec, reason="idle")


def _utterance(msg: P.Message) -> int | None:
    """The ``utterance`` a request names: an integer, or none (absent or null)."""
    utt = msg.meta.get("utterance")
    if utt is not None and type(utt) is not int:
        raise BadInput(f"utterance must be an integer, got {utt!r}")
    return utt


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (int, str))


def _first_error(replies: dict[str, dict]) -> dict | None:
    for stage, r in replies.items():
        if not r.get("ok"):
            err = dict(r.get("error") or {"code": "internal", "message": f"{stage} failed"})
            err.setdefault("details", {})
            err["details"] = dict(err["details"] or {}, stage=stage)
            return err
    return None


def _brief(spec: dict) -> str:
    return ",".join(f"{k}={spec[k]}" for k in ("size", "fps", "emotion") if k in spec)


def _claim(path: str, endpoint: str) -> None:
    """Make way for our ipc socket at ``path``: a stale one (a dead server's) goes, a live
    one is refused. Binding over it took a running server's socket silently (its clients
    then reached the new one) and whichever stopped first unlinked the other's."""
    import socket as pysocket
    import stat

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise GirisError(f"{path} exists and is not a socket: not replacing it with {endpoint}",
                         code="endpoint_in_use")
    probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            os.unlink(path)  # nothing listens: a stale socket of a dead server
        except FileNotFoundError:
            pass
        return
    except OSError:
        pass  # cannot tell (permissions, a busy listener): a live one, to be safe
    finally:
        probe.close()
    raise GirisError(f"another server is serving on {endpoint} (its socket {path} answers); "
                     "stop it first or choose another endpoint", code="endpoint_in_use")
