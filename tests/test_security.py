"""Remote clients over TCP: CURVE-encrypted, allow-listed, and unable to touch each
other's sessions. Loopback only."""
from __future__ import annotations

import os
import socket as pysocket
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

from giris.runtime.client import Client, Frame, Session
from giris.runtime.errors import GirisError, LimitExceeded, SessionNotFound
from tests.conftest import Server, collect


def _free_port() -> int:
    with pysocket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "keys"
    (d / "allowed").mkdir(parents=True)
    (d / "other").mkdir()
    zmq.auth.create_certificates(d, "server")
    zmq.auth.create_certificates(d / "allowed", "alice")
    zmq.auth.create_certificates(d / "allowed", "bob")
    zmq.auth.create_certificates(d / "other", "mallory")
    # the allow-list directory holds public keys only
    allow = d / "allow"
    allow.mkdir()
    for name in ("alice", "bob"):
        (allow / f"{name}.key").write_bytes((d / "allowed" / f"{name}.key").read_bytes())
    return {"server_secret": d / "server.key_secret", "server_public": d / "server.key",
            "allow": allow, "alice": d / "allowed" / "alice.key_secret",
            "bob": d / "allowed" / "bob.key_secret", "mallory": d / "other" / "mallory.key_secret"}


def test_curve_server_admits_only_allowed_keys(make_server, keys):
    port = _free_port()
    srv = make_server({"server": {"endpoint": f"tcp://127.0.0.1:{port}",
                                  "curve_secret_key": str(keys["server_secret"]),
                                  "curve_client_keys": str(keys["allow"])}}, wait=False)
    srv.endpoint = f"tcp://127.0.0.1:{port}"
    alice = Client(srv.endpoint, server_key=str(keys["server_public"]), client_keys=str(keys["alice"]),
                   timeout=20)
    srv.clients.append(alice)
    deadline = time.monotonic() + 60
    while True:
        try:
            if alice.status(timeout=2)["state"] == "serving":
                break
        except GirisError:
            if time.monotonic() > deadline:
                raise
    s = alice.open_session()
    assert len(collect(s, "secret words")["frames"]) == 10

    # an unknown key and no key at all: nothing comes back, not even an error
    for client_keys in (str(keys["mallory"]), None):
        intruder = Client(srv.endpoint, server_key=str(keys["server_public"]), client_keys=client_keys,
                          timeout=2)
        with pytest.raises(GirisError) as e:
            intruder.status(timeout=2)
        assert e.value.code in ("server_gone", "timeout")
        intruder.close()
    plain = Client(srv.endpoint, timeout=2)  # no CURVE at all
    with pytest.raises(GirisError):
        plain.status(timeout=2)
    plain.close()

    # bob is allowed in, but alice's token is worthless to him
    bob = Client(srv.endpoint, server_key=str(keys["server_public"]), client_keys=str(keys["bob"]),
                 timeout=20)
    srv.clients.append(bob)
    stolen = Session(bob, s.token, {})
    bob._sessions[s.token] = __import__("queue").Queue()
    for attempt in (lambda: stolen.start_say("hijack"), stolen.cancel, stolen.close):
        with pytest.raises(SessionNotFound):
            attempt()
    # and alice keeps streaming
    frames = [i for i in s.say("still mine") if isinstance(i, Frame)]
    assert len(frames) == 10


def test_tcp_without_curve_needs_insecure(make_server, tmp_path):
    port = _free_port()
    srv = make_server({"server": {"endpoint": f"tcp://127.0.0.1:{port}"}}, wait=False)
    assert srv.proc.wait(60) != 0
    assert "insecure" in srv.logs()
    srv2 = make_server({"server": {"endpoint": f"tcp://127.0.0.1:{port}", "insecure": True}}, wait=False)
    srv2.endpoint = f"tcp://127.0.0.1:{port}"
    srv2.wait_serving()
    assert "WITHOUT encryption" in srv2.logs()
    # a client over tcp may be on another host: frames come as bytes, never pool references
    from tests.conftest import collect

    s = srv2.client().open_session(zero_copy=True)
    assert s.spec["zero_copy"] is False
    frames = collect(s, "one two")["frames"]
    assert frames and srv2.status()["pools"] and all(
        p["in_use"] == 0 for p in srv2.status()["pools"].values())


def test_an_ipc_socket_open_to_every_user_needs_insecure(make_server):
    """``ipc_mode`` with bits for others (anyone on the host may connect, unauthenticated)
    is refused without --insecure, as tcp without CURVE is; a group mode is taken, and
    logged (the mode was chmod'ed as given, -1 as 7777)."""
    srv = make_server({"server": {"ipc_mode": 0o666}}, wait=False)
    assert srv.proc.wait(60) == 2
    assert "server.ipc_mode 0o666 lets every local user connect" in srv.logs()
    srv = make_server({"server": {"ipc_mode": 0o660}})
    path = srv.endpoint[len("ipc://"):]
    assert os.stat(path).st_mode & 0o777 == 0o660
    assert "the ipc socket admits more than its owner" in srv.logs() and "its group" in srv.logs()


def test_key_files_that_are_not_there_are_named(make_server, keys, tmp_path):
    """A missing --server-key file was taken as a key ("cannot connect: Invalid argument"),
    a client key without a server key was ignored (the connection went out in the clear),
    and a curve_client_keys path that is not there read as if none was set."""
    missing = tmp_path / "nowhere" / "server.key"
    with pytest.raises(GirisError, match=f"server key file '{missing}' does not exist") as e:
        Client("tcp://127.0.0.1:1", server_key=str(missing))
    assert e.value.code == "bad_key"
    with pytest.raises(GirisError, match="client key file '.*mallory.key_secretT' does not exist"):
        Client("tcp://127.0.0.1:1", server_key=str(keys["server_public"]),
               client_keys=str(keys["mallory"]) + "T")
    with pytest.raises(GirisError, match="a client key needs the server's public key") as e:
        Client("tcp://127.0.0.1:1", client_keys=str(keys["alice"]))
    assert e.value.code == "bad_key"
    with pytest.raises(GirisError, match="40-character Z85 key"):
        Client("tcp://127.0.0.1:1", server_key=b"short")
    z85 = zmq.auth.load_certificate(keys["server_public"])[0]
    Client("tcp://127.0.0.1:1", server_key=z85.decode(), timeout=1).close()  # the key itself
    # keys for an ipc server, which never uses CURVE: refused (the request met no answer)
    with pytest.raises(GirisError, match="CURVE keys are for a tcp:// server, not ipc://") as e:
        Client(f"ipc://{tmp_path}/gw.sock", server_key=str(keys["server_public"]),
               client_keys=str(keys["alice"]))
    assert e.value.code == "bad_key"
    gone = tmp_path / "no-clients"
    srv = make_server({"server": {"endpoint": f"tcp://127.0.0.1:{_free_port()}",
                                  "curve_secret_key": str(keys["server_secret"]),
                                  "curve_client_keys": str(gone)}}, wait=False)
    assert srv.proc.wait(60) == 2
    assert f"server.curve_client_keys '{gone}' does not exist" in srv.logs()


def test_sessions_per_client_count_every_connection_of_a_key(make_server, keys):
    """``max_sessions_per_client`` was counted per connection: one key took that many
    sessions on each connection it opened, up to the whole server. Over CURVE a client
    is its key: its second connection gets no more, another key still gets its own."""
    port = _free_port()
    srv = make_server({"server": {"endpoint": f"tcp://127.0.0.1:{port}",
                                  "curve_secret_key": str(keys["server_secret"]),
                                  "curve_client_keys": str(keys["allow"])},
                       "limits": {"max_sessions_per_client": 2}}, wait=False)
    srv.endpoint = f"tcp://127.0.0.1:{port}"

    def connect(who: str) -> Client:
        c = Client(srv.endpoint, server_key=str(keys["server_public"]), client_keys=str(keys[who]),
                   timeout=20)
        srv.clients.append(c)
        return c

    alice = connect("alice")
    deadline = time.monotonic() + 60
    while alice.status(timeout=5)["state"] != "serving":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    opened = [alice.open_session() for _ in range(2)]
    with pytest.raises(LimitExceeded) as e:
        connect("alice").open_session()  # another connection, the same key
    assert e.value.details["limit"] == 2 and "its key" in e.value.message
    connect("bob").open_session()
    opened[0].close()
    connect("alice").open_session()  # room again
