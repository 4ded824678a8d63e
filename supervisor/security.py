"""CURVE on the client-facing socket: encryption plus an allow-list of client keys.

ZeroMQ's ZAP handler (pyzmq's ``ThreadAuthenticator``) checks each connecting client's
public key against the allow-list; an unknown key never gets a connection, let alone a
message through. The key a client proved becomes the message's ``User-Id``, and the
gateway binds sessions to it.
"""
from __future__ import annotations

import logging
import os

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from giris.runtime.errors import GirisError

log = logging.getLogger("giris.security")


def enable_curve(ctx: zmq.Context, sock: zmq.Socket, secret_key_file: str,
                 client_keys: str) -> ThreadAuthenticator:
    """Make ``sock`` a CURVE server that admits only the public keys in ``client_keys``
    (a directory of ``*.key`` files, or one file)."""
    try:
        public, secret = zmq.auth.load_certificate(secret_key_file)
    except (OSError, ValueError) as e:
        raise GirisError(f"cannot load the server key {secret_key_file!r}: {e}", code="bad_key") from None
    if not secret:
        raise GirisError(f"{secret_key_file!r} holds no secret key (use the .key_secret file)",
                         code="bad_key")
    if not client_keys:
        raise GirisError("CURVE needs an allow-list of client public keys "
                         "(server.curve_client_keys: a directory of .key files)", code="bad_key")
    if not os.path.exists(client_keys):  # (it read as if none was set)
        raise GirisError(f"server.curve_client_keys {client_keys!r} does not exist (a directory "
                         "of .key files, or one file)", code="bad_key")
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("giris.zap"))
    auth.start()
    if os.path.isdir(client_keys):
        auth.configure_curve(domain="*", location=client_keys)
        n = len(auth.certs.get("*", {}))
    else:  # one file: allow exactly that key
        key, _ = zmq.auth.load_certificate(client_keys)
        auth.certs["*"] = {key: True}
        auth.allow_any = False
        n = 1
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    log.info("CURVE enabled", extra={"allowed_clients": n})
    return auth
