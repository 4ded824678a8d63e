"""ZeroMQ CURVE key files: generate a pair, load a pair, load an allow-list.

The files are the ones ``zmq.auth.create_certificates`` writes (ZPL text, readable by
czmq and every pyzmq tool): ``NAME.key`` holds the public key only and may be handed out;
``NAME.key_secret`` holds both keys and must stay private. We generate into a private
(0700) scratch directory and move the files into place, so the secret file is never
readable by others, not even for the moment between ``open`` and ``chmod``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import zmq.auth

from giris.runtime.errors import GirisError

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"


def generate_keypair(directory: str | os.PathLike, name: str = "giris",
                     overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``NAME.key`` (0644) and ``NAME.key_secret`` (0600) in ``directory``
    (created 0700 if missing) and return their paths (public, secret).

    Refuses to replace existing files unless ``overwrite``: a silently replaced server key
    locks every client out."""
    if not name or os.sep in name or name.startswith("."):
        raise GirisError(f"bad key name {name!r}", code="bad_input")
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = d / (name + PUBLIC_SUFFIX), d / (name + SECRET_SUFFIX)
    if not overwrite and (public.exists() or secret.exists()):
        raise GirisError(f"{public} or {secret} already exists (remove it first, or replace it: giris keys --force)", code="bad_input")
    scratch = tempfile.mkdtemp(prefix=".giris-keys-", dir=d)  # mode 0700
    try:
        pub_tmp, sec_tmp = zmq.auth.create_certificates(scratch, name)
        os.chmod(sec_tmp, 0o600)
        os.chmod(pub_tmp, 0o644)
        os.replace(sec_tmp, secret)
        os.replace(pub_tmp, public)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return public, secret


def load_keypair(path: str | os.PathLike, what: str = "key") -> tuple[bytes, bytes | None]:
    """``(public, secret)`` from ``NAME.key_secret`` or ``NAME.key``. Given the public
    file, the secret comes from the ``.key_secret`` beside it when there is one, else None
    (enough for a client to name the server it trusts). ``what``: the key's role, for
    the error (``bad_key``, naming the file)."""
    p = Path(path)
    try:
        public, secret = zmq.auth.load_certificate(p)
        if secret is None and p.name.endswith(PUBLIC_SUFFIX):
            sibling = p.with_name(p.name + "_secret")
            if sibling.exists():
                pub2, secret = zmq.auth.load_certificate(sibling)
                if pub2 != public:
                    raise GirisError(f"{p} and {sibling} hold different public keys", code="bad_key")
    except (OSError, ValueError) as e:
        why = "does not exist" if not p.exists() else f"cannot be read as a key: {e}"
        raise GirisError(f"{what} file {str(p)!r} {why}", code="bad_key") from None
    return public, secret


def load_public_keys(source: str | os.PathLike) -> set[bytes]:
    """The allow-list: public keys of every ``*.key`` file in a directory, or of one file
    (either kind). Secret files in a directory are skipped; they are not an allow-list."""
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.name.endswith(PUBLIC_SUFFIX) and f.is_file())
    elif p.is_file():
        files = [p]
    else:
        raise GirisError(f"no key file or directory at {str(p)!r}", code="bad_key")
    keys: set[bytes] = set()
    for f in files:
        try:
            keys.add(zmq.auth.load_certificate(f)[0])
        except (OSError, ValueError) as e:
            raise GirisError(f"cannot load the key {str(f)!r}: {e}", code="bad_key") from None
    return keys
