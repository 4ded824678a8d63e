"""The wire format: round trips, and every malformed message turned into ProtocolError."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest

from giris.runtime import protocol as P
from giris.runtime.errors import ProtocolError


def test_round_trip_with_inline_tensors():
    m = P.Message(P.SAY, session="tok", seq=7, pts=0.28, meta={"text": "hi", "utterance": 3})
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    m.add_inline(a)
    m.add_inline(np.zeros(0, np.int16))
    back = P.decode(P.encode(m))
    assert (back.type, back.session, back.seq, back.pts) == (P.SAY, "tok", 7, 0.28)
    assert back.meta == {"text": "hi", "utterance": 3}
    assert np.array_equal(back.inline_array(back.tensors[0]), a)
    assert back.inline_array(back.tensors[1]).shape == (0,)


def test_header_is_plain_msgpack_a_foreign_client_can_write():
    header = msgpack.packb({"v": 1, "type": "say", "session": "s", "seq": 1, "pts": 0.0,
                            "meta": {"text": "x"}, "tensors": []})
    assert P.decode([header]).meta["text"] == "x"


@pytest.mark.parametrize("frames, code", [
    ([], "bad_message"),
    ([b"\xc1\xc1\xc1"], "bad_message"),
    ([msgpack.packb("just a string")], "bad_message"),
    ([msgpack.packb({"type": "say"})], "unsupported_version"),
    ([msgpack.packb({"v": 2, "type": "say"})], "unsupported_version"),
    ([msgpack.packb({"v": 1, "type": "nope"})], "unknown_type"),
    ([msgpack.packb({"v": 1, "type": "say", "seq": "one"})], "bad_message"),
    ([msgpack.packb({"v": 1, "type": "say", "pts": float("nan")})], "bad_message"),
    ([msgpack.packb({"v": 1, "type": "say", "meta": [1]})], "bad_message"),
    ([msgpack.packb({"v": 1, "type": "say", "session": 5})], "bad_message"),
    ([msgpack.packb({"v": 1, "type": "say", "tensors": [{"dtype": "object", "shape": [1], "nbytes": 8, "frame": 1}]}), b"x" * 8], "bad_message"),
    ([msgpack.packb({"v": 1, "type": "say", "tensors": [{"dtype": "uint8", "shape": [-1], "nbytes": 0, "frame": 1}]}), b""], "bad_message"),
    ([msgpack.packb({"v": 1, "type": "say", "tensors": [{"dtype": "uint8", "shape": [2], "nbytes": 2, "frame": 2}]}), b"ab"], "bad_message"),
    ([msgpack.packb({"v": 1, "type": "say", "tensors": [{"shape": [2]}]})], "bad_message"),
    # fields of the wrong kind, unhashable ones included (a list where a str belongs
    # once raised TypeError out of decode)
    ([msgpack.packb({"v": 1, "type": ["say"]})], "unknown_type"),
    ([msgpack.packb({"v": True, "type": "say"})], "unsupported_version"),
    ([msgpack.packb({"v": 1, "type": "say", "seq": True})], "bad_message"),
    ([msgpack.packb({"v": 1, "type": "say", "tensors": [{"dtype": ["uint8"], "shape": [2], "nbytes": 2, "frame": 1}]}), b"ab"], "bad_message"),
    ([msgpack.packb({"v": 1, "type": "say", "tensors": [{"dtype": "uint8", "shape": [2.0], "nbytes": 2, "frame": 1}]}), b"ab"], "bad_message"),
    ([msgpack.packb({"v": 1, "type": "say", "tensors": [{"dtype": "uint8", "shape": [True], "nbytes": 1, "frame": 1}]}), b"a"], "bad_message"),
    ([msgpack.packb({"v": 1, "type": "say", "tensors": [{"dtype": "uint8", "shape": [2], "nbytes": "2", "frame": 1}]}), b"ab"], "bad_message"),
    ([msgpack.packb({"v": 1, "type": "say", "tensors": [{"dtype": "uint8", "shape": [2], "nbytes": 2, "frame": [1]}]}), b"ab"], "bad_message"),
    ([msgpack.packb({"v": 1, "type": "say", "tensors": [{"dtype": "uint8", "shape": [2], "nbytes": 2, "pool": 7, "slot": 0}]})], "bad_message"),
    ([msgpack.packb({"v": 1, "type": "say", "tensors": [{"dtype": "uint8", "shape": [2], "nbytes": 2, "frame": 1, "strides": "x"}]}), b"ab"], "bad_message"),
    ([msgpack.packb({"v": 1, "type": "say", "tensors": ["ref"]})], "bad_message"),
    ([msgpack.packb({"v": 1, "type": "say"})] + [b""] * 100, "too_large"),
    ([b"\x80" * (P.MAX_HEADER_BYTES + 1)], "too_large"),
])
def test_malformed_messages_raise_protocol_error(frames, code):
    with pytest.raises(ProtocolError) as e:
        P.decode(frames)
    assert e.value.code == code


def test_size_limit_counts_buffers():
    m = P.Message(P.OPEN_SESSION)
    m.add_inline(np.zeros(1000, np.uint8))
    with pytest.raises(ProtocolError) as e:
        P.decode(P.encode(m), max_bytes=500)
    assert e.value.code == "too_large"


def test_inline_buffer_must_match_its_reference():
    m = P.Message(P.SAY)
    m.add_inline(np.zeros(4, np.uint8))
    frames = P.encode(m)
    back = P.decode([frames[0], b"12345678"])  # header says 4 bytes, buffer has 8
    with pytest.raises(ProtocolError):
        back.inline_array(back.tensors[0])
