"""CURVE key files, and a real CURVE handshake that admits only allow-listed keys."""
from __future__ import annotations

import stat
from pathlib import Path
from typing import Iterator

import pytest
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from giris.runtime.errors import GirisError
from giris.runtime.keys import generate_keypair, load_keypair, load_public_keys


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_generate_and_load(tmp_path: Path) -> None:
    public, secret = generate_keypair(tmp_path / "keys", "server")
    assert public == tmp_path / "keys" / "server.key"
    assert secret == tmp_path / "keys" / "server.key_secret"
    assert mode(public) == 0o644 and mode(secret) == 0o600
    assert mode(tmp_path / "keys") == 0o700
    assert [p.name for p in sorted((tmp_path / "keys").iterdir())] == ["server.key", "server.key_secret"]
    pub, sec = load_keypair(secret)
    assert len(pub) == 40 and sec is not None and len(sec) == 40
    # the same as pyzmq's own reader, and the public file leads to the secret beside it
    assert zmq.auth.load_certificate(secret) == (pub, sec)
    assert load_keypair(public) == (pub, sec)
    assert "secret-key" not in public.read_text()


def test_public_file_alone(tmp_path: Path) -> None:
    public, secret = generate_keypair(tmp_path, "c")
    secret.unlink()
    pub, sec = load_keypair(public)
    assert sec is None and len(pub) == 40


def test_refuses_overwrite(tmp_path: Path) -> None:
    generate_keypair(tmp_path, "a")
    first = load_keypair(tmp_path / "a.key_secret")
    with pytest.raises(GirisError):
        generate_keypair(tmp_path, "a")
    generate_keypair(tmp_path, "a", overwrite=True)
    assert load_keypair(tmp_path / "a.key_secret") != first


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(GirisError) as e:
        load_keypair(tmp_path / "missing.key")
    assert e.value.code == "bad_key"
    (tmp_path / "junk.key").write_text("not a key\n")
    with pytest.raises(GirisError):
        load_keypair(tmp_path / "junk.key")
    with pytest.raises(GirisError):
        load_public_keys(tmp_path / "nowhere")


def test_public_keys_allow_list(tmp_path: Path) -> None:
    d = tmp_path / "clients"
    keys = {load_keypair(generate_keypair(d, n)[0])[0] for n in ("alice", "bob")}
    assert load_public_keys(d) == keys
    assert load_public_keys(d / "alice.key") == {load_keypair(d / "alice.key")[0]}
    assert load_public_keys(d / "alice.key_secret") == load_public_keys(d / "alice.key")


# --------------------------------------------------------------------- CURVE handshake
@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def curve_server(ctx: zmq.Context, tmp_path: Path) -> tuple[zmq.Socket, str, bytes, ThreadAuthenticator]:
    generate_keypair(tmp_path / "server", "server")
    generate_keypair(tmp_path / "allowed", "alice")
    spub, ssec = load_keypair(tmp_path / "server" / "server.key_secret")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.allow("127.0.0.1")
    auth.configure_curve(domain="*", location=str(tmp_path / "allowed"))
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.curve_server = True
    sock.curve_publickey = spub
    sock.curve_secretkey = ssec  # type: ignore[assignment]
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}", spub, auth


def curve_client(ctx: zmq.Context, endpoint: str, server_public: bytes, keyfile: Path) -> zmq.Socket:
    pub, sec = load_keypair(keyfile)
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.curve_serverkey = server_public
    s.curve_publickey = pub
    s.curve_secretkey = sec  # type: ignore[assignment]
    s.connect(endpoint)
    return s


def test_curve_allows_listed_rejects_unknown(ctx: zmq.Context, tmp_path: Path) -> None:
    server, endpoint, spub, auth = curve_server(ctx, tmp_path)
    try:
        good = curve_client(ctx, endpoint, spub, tmp_path / "allowed" / "alice.key_secret")
        good.send(b"hello")
        assert server.poll(5000), "an allow-listed client did not get through"
        ident, body = server.recv_multipart()
        assert body == b"hello"

        generate_keypair(tmp_path / "strangers", "mallory")
        bad = curve_client(ctx, endpoint, spub, tmp_path / "strangers" / "mallory.key_secret")
        bad.send(b"let me in")
        assert not server.poll(1000), "an unknown key got a message through"

        # and one that does not know the server's real key cannot even finish the handshake
        wrong_server = load_keypair(generate_keypair(tmp_path / "fake", "srv")[0])[0]
        lost = curve_client(ctx, endpoint, wrong_server, tmp_path / "allowed" / "alice.key_secret")
        lost.send(b"hi?")
        assert not server.poll(500)

        good.send(b"still here")  # the rejections did not disturb the good client
        assert server.poll(5000)
        assert server.recv_multipart()[1] == b"still here"
    finally:
        auth.stop()
