"""Careless or hostile clients of a real server: what they may cost it is bounded."""
from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from giris.runtime import protocol as P
from giris.runtime.errors import LimitExceeded
from giris.supervisor.gateway import CLIENT_MESSAGES_PER_S
from giris.supervisor.outbox import CLIENT_BACKLOG_BYTES, MESSAGE_COST, OUTBOX_BYTES
from tests.conftest import small_stages


def _dealer(endpoint: str, rcvhwm: int = 1000) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, rcvhwm)
    s.connect(endpoint)
    return s


def _ask(sock: zmq.Socket, type_: str, session: str = "", **meta) -> P.Message:
    sock.send_multipart(P.encode(P.Message(type_, session=session, meta={"req": 1, **meta})))
    assert sock.poll(10_000), "no answer"
    return P.decode(sock.recv_multipart())


def _read_all(sock: zmq.Socket, quiet_ms: int = 500) -> list[P.Message]:
    out = []
    while sock.poll(quiet_ms):
        out.append(P.decode(sock.recv_multipart()))
    return out


def test_client_that_reads_nothing_is_given_up(make_server):
    """A client saying long texts and reading none of it had everything kept for it: the
    supervisor grew by 60 MB a second (1.9 GB in 30 s), and so did one sending heartbeats
    without reading (40 MB a second). Past what may wait for one client its session
    closes, one error says why, and its requests are dropped until it reads; then it is
    served again."""
    srv = make_server({"stages": small_stages(tts={"options": {"word_s": 1.0}})})
    observer = srv.client()
    sock = _dealer(srv.endpoint)
    token = _ask(sock, P.OPEN_SESSION, spec={"size": 64}).session
    text = " ".join(["word"] * 400)  # 400 s of 16 kHz audio: 12.8 MB a say
    for i in range(8):
        sock.send_multipart(P.encode(P.Message(P.SAY, session=token, meta={"req": i, "text": text})))
    deadline, st = time.monotonic() + 12, {}
    while time.monotonic() < deadline:
        st = observer.status()
        if st["sessions"] == 0:
            break
        time.sleep(0.2)
    assert st["sessions"] == 0, st["outbox"]
    assert st["outbox"]["messages_waiting"] <= CLIENT_BACKLOG_BYTES // MESSAGE_COST
    got = _read_all(sock)
    errors = [m for m in got if m.meta.get("kind") == "error"]
    closed = [m for m in got if m.meta.get("kind") == "session_closed"]
    assert [e.meta["code"] for e in errors] == ["limit_exceeded"]
    assert [(m.session, m.meta["reason"]) for m in closed] == [(token, "not_reading")]
    assert _ask(sock, P.HEARTBEAT).type == P.HEARTBEAT  # read up: served again
    sock.close()


def test_a_session_holds_a_bounded_number_of_utterances_in_flight(make_server):
    """``say``s within their rate were queued without end (650 of 66 s each in 25 s on
    two sessions: 12 hours of speech, the books and texts of it growing in the
    supervisor and the stages): past ``max_utterances_per_session`` in flight one more
    is ``limit_exceeded``, saying so, and one that ends makes room again."""
    srv = make_server({"limits": {"max_utterances_per_session": 3},
                       "stages": small_stages(tts={"options": {"slow_s": 0.5}})})
    session = srv.client().open_session()
    said = [session.start_say("SLOW SLOW SLOW SLOW") for _ in range(3)]
    with pytest.raises(LimitExceeded) as e:
        session.start_say("one too many")
    assert e.value.details["limit"] == 3 and e.value.details["in_flight"] == 3
    assert "utterances in flight" in e.value.message
    with pytest.raises(LimitExceeded):  # a new live-audio utterance too
        session.send_audio(np.zeros(1600, np.int16), 16000)
    assert session.cancel(said[0]) == [said[0]]
    assert session.start_say("room again") > said[-1]
    session.close()


def test_a_connection_flooding_the_gateway_is_cut_to_its_rate(make_server):
    """A client sending heartbeats as fast as it can had every one answered: the
    supervisor's core went to it and a live client beside it missed its 25 FPS. Past
    ``CLIENT_MESSAGES_PER_S`` in a second the rest are dropped unread, the first of them
    answered ``rate_limited``; the next second it is served again."""
    srv = make_server()
    sock = _dealer(srv.endpoint)
    beat = P.encode(P.Message(P.HEARTBEAT))
    n = 4 * CLIENT_MESSAGES_PER_S
    start = time.monotonic()
    for _ in range(n):
        sock.send_multipart(beat)
    assert time.monotonic() - start < 1.0, "too slow a host to flood within a second"
    got = _read_all(sock, quiet_ms=1500)
    beats = sum(m.type == P.HEARTBEAT for m in got)
    limited = [m for m in got if m.meta.get("code") == "rate_limited"]
    assert 1 <= len(limited) <= 2 and limited[0].meta["details"]["limit"] == CLIENT_MESSAGES_PER_S
    assert beats <= 2 * CLIENT_MESSAGES_PER_S < n
    assert _ask(sock, P.HEARTBEAT).type == P.HEARTBEAT  # a second on: served again
    sock.close()


def test_many_connections_reading_nothing_are_bounded_together(make_server):
    """The bound per client held per connection: six connections each under it held
    ~300 MB of unread speech in the supervisor together. Past ``OUTBOX_BYTES`` for
    everyone, the client with the most waiting is given up on."""
    srv = make_server({"stages": small_stages(tts={"options": {"word_s": 1.0}})})
    observer = srv.client()
    text = " ".join(["word"] * 400)  # 12.8 MB of audio a say
    per = CLIENT_BACKLOG_BYTES // 12_800_000  # says one connection may leave unread
    # (what ZeroMQ and the kernel take in for each, ~2 MB at RCVHWM 1, does not wait)
    n = OUTBOX_BYTES // (per * 12_800_000 - 4_000_000) + 1
    socks = [_dealer(srv.endpoint, rcvhwm=1) for _ in range(n)]
    for sock in socks:
        token = _ask(sock, P.OPEN_SESSION, spec={"size": 64}).session
        for i in range(per):
            sock.send_multipart(P.encode(P.Message(P.SAY, session=token, meta={"req": i, "text": text})))
    deadline, st = time.monotonic() + 15, {}
    while time.monotonic() < deadline:
        st = observer.status()
        if st["sessions"] < n:
            break
        time.sleep(0.2)
    assert st["sessions"] < n, st["outbox"]
    for sock in socks:
        sock.close()
