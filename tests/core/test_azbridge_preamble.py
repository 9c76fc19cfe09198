"""The azbridge preamble, its reply, and the UDP datagram framing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybridrelay.exceptions import ProtocolError
from hybridrelay.protocol.azbridge import (
    DatagramDecoder,
    Mode,
    Preamble,
    PreambleDecoder,
    Reply,
    ReplyDecoder,
    encode_datagram,
    encode_preamble,
    encode_reply,
)


def test_encode_preamble_matches_azbridge_bytes() -> None:
    assert encode_preamble("ssh", Mode.STREAM) == b"\x01\x00\x00\x03ssh"
    assert encode_preamble("dns", Mode.DATAGRAM) == b"\x01\x00\x01\x03dns"
    assert encode_preamble("é", Mode.STREAM) == b"\x01\x00\x00\x02\xc3\xa9"
    assert encode_preamble("x" * 255, Mode.STREAM)[3] == 255
    with pytest.raises(ValueError):
        encode_preamble("", Mode.STREAM)
    with pytest.raises(ValueError):
        encode_preamble("x" * 256, Mode.STREAM)


def test_reply_bytes() -> None:
    assert encode_reply(Reply.ACCEPT_STREAM) == b"\x01\x00\x00"
    assert encode_reply(Reply.ACCEPT_DATAGRAM) == b"\x01\x00\x01"
    assert encode_reply(Reply.BAD_VERSION) == b"\x00\x00\x00"
    assert encode_reply(Reply.NOT_A_STREAM_PORT) == b"\x00\x00\x01"
    assert encode_reply(Reply.NOT_A_DATAGRAM_PORT) == b"\x00\x00\xff"
    assert Reply.accept(Mode.STREAM) is Reply.ACCEPT_STREAM
    assert Reply.accept(Mode.DATAGRAM) is Reply.ACCEPT_DATAGRAM
    assert [r.accepted for r in Reply] == [True, True, False, False, False]
    assert "datagram" in Reply.NOT_A_STREAM_PORT.describe()


@given(st.text(min_size=1, max_size=80).filter(lambda s: len(s.encode()) <= 255), st.data())
def test_preamble_decodes_in_any_split(name: str, data: st.DataObject) -> None:
    wire = encode_preamble(name, Mode.DATAGRAM) + b"payload"
    decoder = PreambleDecoder()
    result = None
    pos = 0
    while result is None:
        assert decoder.needed >= 1
        step = data.draw(st.integers(min_value=1, max_value=len(wire) - pos))
        result = decoder.feed(wire[pos : pos + step])
        pos += step
    assert result == Preamble(Mode.DATAGRAM, name)
    assert decoder.needed == 0
    assert decoder.rest + wire[pos:] == b"payload"


def test_preamble_bad_version_and_mode() -> None:
    assert PreambleDecoder().feed(b"\x02\x00\x00\x01a") is Reply.BAD_VERSION
    assert PreambleDecoder().feed(b"\x01\x01\x00") is Reply.BAD_VERSION
    assert PreambleDecoder().feed(b"\x01\x00\x02\x01a") is Reply.BAD_VERSION
    # Plain data that is not a preamble (an HTTP request) is a bad version, not a hang.
    assert PreambleDecoder().feed(b"GET / HTTP/1.1\r\n") is Reply.BAD_VERSION
    decoder = PreambleDecoder()
    assert decoder.feed(b"\x01\x00") is None
    assert decoder.feed(b"\x07") is Reply.BAD_VERSION
    with pytest.raises(ProtocolError):
        decoder.feed(b"x")


def test_preamble_empty_name_and_bad_utf8() -> None:
    assert PreambleDecoder().feed(b"\x01\x00\x00\x00") == Preamble(Mode.STREAM, "")
    with pytest.raises(ProtocolError, match="UTF-8"):
        PreambleDecoder().feed(b"\x01\x00\x00\x01\xff")


def test_reply_decoder() -> None:
    decoder = ReplyDecoder()
    assert decoder.feed(b"\x01") is None
    assert decoder.needed == 2
    assert decoder.feed(b"\x00\x00SSH-2.0") is Reply.ACCEPT_STREAM
    assert decoder.rest == b"SSH-2.0"
    with pytest.raises(ProtocolError):
        decoder.feed(b"x")
    for reply in Reply:
        assert ReplyDecoder().feed(reply.value) is reply
    with pytest.raises(ProtocolError, match="unknown preamble reply 000002"):
        ReplyDecoder().feed(b"\x00\x00\x02")


def test_datagram_framing() -> None:
    assert encode_datagram(b"") == b"\x00\x00"
    assert encode_datagram(b"abc") == b"\x00\x03abc"
    assert encode_datagram(b"x" * 0x1234)[:2] == b"\x12\x34"
    assert len(encode_datagram(b"x" * 65535)) == 65537
    with pytest.raises(ValueError, match="65536 bytes"):
        encode_datagram(b"x" * 65536)


@given(st.lists(st.binary(max_size=300), max_size=20), st.data())
def test_datagram_decoder_any_split(datagrams: list[bytes], data: st.DataObject) -> None:
    wire = b"".join(encode_datagram(d) for d in datagrams)
    decoder = DatagramDecoder()
    out: list[bytes] = []
    pos = 0
    while pos < len(wire):
        step = data.draw(st.integers(min_value=1, max_value=len(wire) - pos))
        out += decoder.feed(wire[pos : pos + step])
        pos += step
    assert out == datagrams
    assert decoder.pending == 0


def test_datagram_decoder_holds_partial_frame() -> None:
    decoder = DatagramDecoder()
    assert decoder.feed(b"\xff\xff" + b"x" * 100) == []
    assert decoder.pending == 102
    assert decoder.feed(b"x" * 65435) == [b"x" * 65535]
    assert decoder.pending == 0
