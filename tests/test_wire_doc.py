"""README's "Wire format", checked by a client written from it alone.

The client below uses only pyzmq, msgpack and numpy and knows only what the README says:
nothing of ``giris`` is imported but the fixtures that start the server. If this file
needs a detail the README does not give, the README is short of it.
"""
from __future__ import annotations

import mmap
import os
import re
import socket as pysocket
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
import zmq.auth

ASSET = Path(__file__).resolve().parent.parent / "workers" / "assets" / "astronaut.png"
POOL_NAME = re.compile(r"^giris-[A-Za-z0-9_.-]+$")  # a client maps no other /dev/shm file
HEADER = struct.Struct("<8sIIQQQ24x")                # 64 bytes
SLOT = struct.Struct("<IIiIQd")                      # 32 bytes, at 64 + 32 k
BUSY = 1


class RawClient:
    """One DEALER socket, for all of a client's sessions (they are bound to it)."""

    def __init__(self, endpoint: str, curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        if curve:  # (server public, client public, client secret), Z85
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = curve
        self.sock.connect(endpoint)
        self.req = 0
        self.early: list[tuple[dict, list[bytes]]] = []  # stream messages read while waiting
        self.pools: dict[str, mmap.mmap] = {}

    def send(self, type_: str, session: str = "", tensors: list[np.ndarray] = (), **meta: Any) -> int:
        self.req += 1
        refs = [{"pool": None, "frame": i + 1, "dtype": str(t.dtype), "shape": list(t.shape),
                 "nbytes": t.nbytes} for i, t in enumerate(tensors)]
        header = {"v": 1, "type": type_, "session": session, "meta": {**meta, "req": self.req},
                  "tensors": refs}
        self.sock.send_multipart([msgpack.packb(header), *(t.tobytes() for t in tensors)])
        return self.req

    def recv(self, timeout: float = 10.0) -> tuple[dict, list[bytes]]:
        if self.early:
            return self.early.pop(0)
        assert self.sock.poll(int(timeout * 1000)), "no answer"
        header, *buffers = self.sock.recv_multipart()
        return msgpack.unpackb(header), buffers

    def ask(self, type_: str, session: str = "", tensors: list[np.ndarray] = (), **meta: Any) -> dict:
        """Send a request, return its answer (a reply, or an error event) by ``meta.req``."""
        req = self.send(type_, session, tensors, **meta)
        while True:
            assert self.sock.poll(10_000), f"no answer to {type_}"
            header, *buffers = self.sock.recv_multipart()
            h = msgpack.unpackb(header)
            if h["meta"].get("req") == req:
                return h
            self.early.append((h, buffers))

    def tensor(self, ref: dict, buffers: list[bytes]) -> np.ndarray:
        if ref["pool"] is None:
            return np.frombuffer(buffers[ref["frame"] - 1], ref["dtype"]).reshape(ref["shape"])
        assert POOL_NAME.match(ref["pool"]) and ref["device"] == "cpu", ref
        if ref["pool"] not in self.pools:
            with open(f"/dev/shm/{ref['pool']}", "rb") as f:
                self.pools[ref["pool"]] = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        m = self.pools[ref["pool"]]
        magic, _n_slots, _pad, _slot_bytes, generation, _data = HEADER.unpack_from(m, 0)
        state, lease, *_ = SLOT.unpack_from(m, 64 + 32 * ref["slot"])
        assert magic == b"GIRISPL1"
        assert (generation, state, lease) == (ref["generation"], BUSY, ref["lease"]), "stale"
        return np.ndarray(ref["shape"], ref["dtype"], m, ref["offset"], ref["strides"])

    def stream(self, session: str, utterance: int, zero_copy: bool = False) -> dict[str, list]:
        """Everything of ``utterance`` up to its ``utterance_done`` (released as read)."""
        out: dict[str, list] = {"audio": [], "coeffs": [], "frame": [], "done": []}
        while not out["done"]:
            h, buffers = self.recv()
            m = h["meta"]
            if h["type"] == "event" and m["kind"] == "utterance_done":
                out["done"].append(m)
            elif h["type"] in ("audio", "coeffs", "frame"):
                ref = h["tensors"][0]
                assert (ref["pool"] is not None) == (zero_copy and h["type"] == "frame"), h
                out[h["type"]].append((h, self.tensor(ref, buffers).copy()))
                if ref["pool"] is not None:
                    self.send("release", session, refs=[{k: ref[k] for k in ("pool", "slot", "lease")}])
            else:
                assert h["type"] == "reply", h  # (a cancel's answer, read here)
                continue
            assert h["session"] == session and m["utterance"] == utterance, h
        return out

    def close(self) -> None:
        for m in self.pools.values():
            m.close()
        self.sock.close(0)


def _error(h: dict, code: str) -> dict:
    assert h["type"] == "event" and h["meta"]["kind"] == "error", h
    assert h["meta"]["code"] == code and h["meta"]["message"], h["meta"]
    return h["meta"]


def _in_use(c: RawClient) -> int:
    return sum(p["in_use"] for p in c.ask("status")["meta"]["status"]["pools"].values())


def test_a_client_written_from_the_readme_says_cancels_and_closes(make_server):
    srv = make_server()
    c = RawClient(srv.endpoint)
    beat = c.send("heartbeat")
    h, _ = c.recv()
    assert h["type"] == "heartbeat" and h["meta"]["req"] == beat
    assert c.ask("status")["meta"]["status"]["state"] == "serving"

    h = c.ask("open_session", spec={"want": ["audio", "frames", "coeffs"], "size": 64})
    assert h["type"] == "reply" and h["meta"]["ok"] and h["session"], h
    token, spec = h["session"], h["meta"]["spec"]
    assert spec["avatar_name"] == "astronaut" and spec["size"] == 64 and spec["zero_copy"] is False
    assert isinstance(h["meta"]["estimate"], dict)  # bytes per device
    utt = c.ask("say", token, text="one two")["meta"]["utterance"]
    out = c.stream(token, utt)
    pcm = np.concatenate([a for _, a in out["audio"]])
    assert pcm.dtype == np.int16 and pcm.size == 2 * 3200
    for h, a in out["audio"]:
        m = h["meta"]
        assert h["pts"] == pytest.approx(m["start_sample"] / m["sample_rate"])
        assert all(0 <= start < a.size and n > 0 for _, start, n in m["phonemes"])  # samples
    assert out["audio"][-1][0]["meta"]["final"]
    rows = np.concatenate([v for _, v in out["coeffs"]])
    assert rows.dtype == np.float32 and rows.shape == (10, 73)
    assert [h["meta"]["first_frame"] for h, _ in out["coeffs"]] == [h["seq"] for h, _ in out["coeffs"]]
    frames = out["frame"]
    assert [h["seq"] for h, _ in frames] == list(range(10)) and frames[-1][0]["meta"]["final"]
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for _, f in frames)
    assert frames[3][0]["pts"] == pytest.approx(3 / 25)
    done = out["done"][0]
    assert done["complete"] and done["frames"] == 10 and not {"cancelled", "lost", "error"} & set(done)

    # one clock per session: the next utterance goes on where this one ended; cut it
    utt2 = c.ask("say", token, text="three four five six seven eight nine ten")["meta"]["utterance"]
    h, _ = c.recv()
    while h["type"] != "frame":
        h, _ = c.recv()
    assert h["seq"] == 10
    cut = c.ask("cancel", token, utterance=utt2)
    assert cut["type"] == "reply" and cut["meta"]["cancelled"] == [utt2]
    done = c.stream(token, utt2)["done"][0]
    assert done["cancelled"] is True and not done["complete"]
    c.sock.send_multipart([msgpack.packb({"v": 1, "type": "heartbeat"})])
    h, _ = c.recv()  # nothing of the cancelled utterance after its utterance_done
    assert h["type"] == "heartbeat", h

    assert c.ask("close_session", token)["type"] == "reply"
    _error(c.ask("say", token, text="hi"), "unknown_session")
    c.close()


def test_zero_copy_frames_are_read_from_dev_shm_and_released(make_server):
    """An inline portrait, then frames read from the pool by the documented layout and
    given back: the session holds at most ``session_slots`` (4 here) at a time, so 10
    frames come only to a client that releases."""
    srv = make_server()
    c = RawClient(srv.endpoint)
    portrait = np.frombuffer(ASSET.read_bytes(), np.uint8)
    copy = c.ask("open_session", tensors=[portrait], spec={"size": 64})
    zc = c.ask("open_session", tensors=[portrait], spec={"size": 64, "zero_copy": True})
    assert zc["type"] == "reply" and zc["meta"]["spec"]["zero_copy"] is True, zc
    assert "avatar_name" not in zc["meta"]["spec"]
    got = {}
    for h in (copy, zc):
        token = h["session"]
        utt = c.ask("say", token, text="alpha beta")["meta"]["utterance"]
        got[token] = c.stream(token, utt, zero_copy=h is zc)
        assert got[token]["done"][0]["complete"] and len(got[token]["frame"]) == 10
    for (_, inline), (_, shared) in zip(got[copy["session"]]["frame"], got[zc["session"]]["frame"]):
        assert np.array_equal(inline, shared)
    deadline = time.monotonic() + 5
    while _in_use(c) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _in_use(c) == 0
    _error(c.ask("open_session", tensors=[np.frombuffer(b"not an image", np.uint8)],
                 spec={"size": 64}), "bad_image")
    c.close()


def test_malformed_requests_get_the_documented_errors(make_server):
    srv = make_server()
    c = RawClient(srv.endpoint)

    def raw(header: Any, *buffers: bytes) -> dict:
        c.sock.send_multipart([msgpack.packb(header), *buffers])
        return c.recv()[0]

    assert _error(raw({"v": 2, "type": "heartbeat", "meta": {"req": 5}}),
                  "unsupported_version")["req"] == 5
    _error(raw({"v": 1, "type": "dance"}), "unknown_type")
    _error(raw({"v": 1, "type": "frame"}), "unknown_type")  # a server → client type
    _error(raw({"v": 1, "type": "heartbeat", "seq": 1.0}), "bad_message")  # an int, not a float
    c.sock.send_multipart([b"", msgpack.packb({"v": 1, "type": "heartbeat"})])  # REQ envelope
    _error(c.recv()[0], "bad_message")
    # a reference sent needs dtype, shape, nbytes and (inline) frame
    _error(raw({"v": 1, "type": "open_session", "tensors": [{"frame": 1, "dtype": "uint8",
                                                             "shape": [3]}]}, b"abc"), "bad_message")
    h = c.ask("say", "made-up", text="hi")
    assert h["session"] == "" and _error(h, "unknown_session")
    _error(c.ask("open_session", spec={"colour": "red"}), "bad_input")  # unknown option
    _error(c.ask("open_session", spec={"size": 63}), "bad_input")       # an odd size
    h = c.ask("open_session", spec={"size": None, "want": ["audio"]})   # nil: the default
    assert h["type"] == "reply" and h["meta"]["spec"]["size"] == 64
    c.close()


def test_release_takes_every_reference_it_lists(make_server):
    """More than 256 references in one ``release``: the ones past the 256th were ignored,
    so the slot listed last stayed held for as long as the session lived."""
    srv = make_server()
    c = RawClient(srv.endpoint)
    token = c.ask("open_session", spec={"size": 64, "zero_copy": True})["session"]
    utt = c.ask("say", token, text="alpha")["meta"]["utterance"]
    h, _ = c.recv()
    while h["type"] != "frame":
        h, _ = c.recv()
    ref = h["tensors"][0]
    bogus = [{"pool": ref["pool"], "slot": ref["slot"], "lease": ref["lease"] + 1}] * 300
    c.send("release", token, refs=bogus + [{k: ref[k] for k in ("pool", "slot", "lease")}])
    c.ask("cancel", token, utterance=utt)
    while True:
        h, _ = c.recv()
        if h["type"] == "event" and h["meta"]["kind"] == "utterance_done":
            break
        if h["type"] == "frame":
            r = h["tensors"][0]
            c.send("release", token, refs=[{k: r[k] for k in ("pool", "slot", "lease")}])
    deadline = time.monotonic() + 3
    while _in_use(c) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _in_use(c) == 0
    c.close()


def test_a_session_kept_alive_by_any_message_and_closed_idle_without(make_server):
    """Any message from its connection keeps a session alive (a heartbeat is the least);
    after ``client_idle`` of silence it is closed with ``session_closed`` (``idle``)."""
    srv = make_server({"timeouts": {"client_idle": 1.0}})
    c = RawClient(srv.endpoint)
    token = c.ask("open_session", spec={"want": ["audio"]})["session"]
    for _ in range(4):  # 2 s, past client_idle, on status requests alone
        time.sleep(0.5)
        c.ask("status")
    h = c.ask("say", token, text="hi")
    assert h["type"] == "reply"
    c.stream(token, h["meta"]["utterance"])
    h, _ = c.recv(timeout=5)
    assert h["type"] == "event" and h["meta"] == {"kind": "session_closed", "reason": "idle"}
    assert h["session"] == token
    c.close()


def test_a_raw_client_speaks_curve_with_the_key_files(make_server, tmp_path):
    """The key files are ZPL certificates: a client reads its Z85 keys out of them."""
    from giris.runtime.keys import generate_keypair  # the server's side: `giris keys`

    server_pub, server_sec = generate_keypair(tmp_path / "keys", "server")
    client_pub, client_sec = generate_keypair(tmp_path / "clients", "alice")
    with pysocket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = make_server({"server": {"endpoint": f"tcp://127.0.0.1:{port}",
                                  "curve_secret_key": str(server_sec),
                                  "curve_client_keys": str(client_pub.parent)}}, wait=False)

    def key(path: Path, which: str) -> bytes:
        return re.search(rf'^\s*{which}-key = "(.{{40}})"', path.read_text(), re.M).group(1).encode()

    c = RawClient(f"tcp://127.0.0.1:{port}",
                  curve=(key(server_pub, "public"), key(client_sec, "public"), key(client_sec, "secret")))
    deadline = time.monotonic() + 60
    while True:
        c.send("status")
        if c.sock.poll(1000):
            h, _ = c.recv()
            if h["meta"]["status"]["state"] == "serving":
                break
            time.sleep(0.1)  # (a status costs 50 of a connection's 5,000 messages a second)
        assert time.monotonic() < deadline, srv.logs()
    h = c.ask("open_session", spec={"size": 64, "zero_copy": True})
    assert h["meta"]["spec"]["zero_copy"] is False  # remote: inline bytes
    utt = c.ask("say", h["session"], text="alpha")["meta"]["utterance"]
    assert len(c.stream(h["session"], utt)["frame"]) == 5
    c.close()
