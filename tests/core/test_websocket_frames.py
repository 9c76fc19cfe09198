"""The relay's frame forwarder and handshake (protocol/websocket.py) against RFC 6455's own
examples, a reference encoder written here from the RFC, aiohttp's unmasking, and fuzzing."""

from __future__ import annotations

import os
import random

import pytest
from aiohttp._websocket.helpers import websocket_mask
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridrelay.protocol.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    ControlFrame,
    FrameError,
    FrameForwarder,
    HandshakeError,
    close_payload,
    frame_header,
    handshake_headers,
    masked_frame,
    server_frame,
    server_frame_header,
    unmask_python,
    whole_client_frames,
    whole_server_frames,
)
from tests.wsframes import client_frame


def forwarder(max_message_size: int = 1 << 30) -> FrameForwarder:
    return FrameForwarder(websocket_mask, max_message_size=max_message_size)


def feed_all(
    fwd: FrameForwarder, data: bytes, cuts: list[int] | None = None
) -> tuple[bytes, list[ControlFrame]]:
    points = sorted({c for c in (cuts or []) if 0 < c < len(data)})
    out = bytearray()
    controls: list[ControlFrame] = []
    start = 0
    for end in [*points, len(data)]:
        pieces, ctl = fwd.feed(data[start:end])
        for piece in pieces:
            out += piece
        controls += ctl
        start = end
    return bytes(out), controls


# -- RFC 6455 section 5.7 examples ------------------------------------------------------------


def test_rfc_examples() -> None:
    masked_hello = bytes.fromhex("818537fa213d7f9f4d5158")
    out, controls = feed_all(forwarder(), masked_hello)
    assert out == bytes.fromhex("810548656c6c6f") and controls == []
    assert server_frame(OP_TEXT, b"Hello") == bytes.fromhex("810548656c6c6f")
    # A fragmented unmasked text message: "Hel" then "lo".
    assert server_frame(OP_TEXT, b"Hel", fin=False) == bytes.fromhex("010348656c")
    assert server_frame(OP_CONTINUATION, b"lo") == bytes.fromhex("80026c6f")
    assert frame_header(True, OP_TEXT, 5, masked=True) == bytes.fromhex("8185")  # masked "Hello"
    assert server_frame_header(True, OP_BINARY, 256) == bytes.fromhex("827e0100")
    assert server_frame_header(True, OP_BINARY, 65536) == bytes.fromhex("827f0000000000010000")
    ping = client_frame(OP_PING, b"Hello")
    assert feed_all(forwarder(), ping)[1] == [ControlFrame(OP_PING, b"Hello")]


def test_handshake_rfc_example_and_subprotocols() -> None:
    request = {
        "Upgrade": "websocket",
        "Connection": "keep-alive, Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Protocol": "chat, superchat",
        "Sec-WebSocket-Extensions": "permessage-deflate",
    }
    answer = handshake_headers(request, "superchat")
    assert answer["Sec-WebSocket-Accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert answer["Sec-WebSocket-Protocol"] == "superchat"
    assert "Sec-WebSocket-Extensions" not in answer  # never negotiated (PROTOCOL.md 5.6)
    assert "Sec-WebSocket-Protocol" not in handshake_headers(request, "other")
    assert "Sec-WebSocket-Protocol" not in handshake_headers(request, None)


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"Upgrade": "h2c"}, 400),
        ({"Connection": "keep-alive"}, 400),
        ({"Sec-WebSocket-Version": "8"}, 426),
        ({"Sec-WebSocket-Key": "too-short"}, 400),
        ({"Sec-WebSocket-Key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAA"}, 400),  # 21 bytes
    ],
)
def test_handshake_refusals(change: dict[str, str], status: int) -> None:
    request = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    } | change
    with pytest.raises(HandshakeError) as info:
        handshake_headers(request, None)
    assert info.value.status == status


# -- forwarding --------------------------------------------------------------------------------

frames = st.lists(
    st.tuples(
        st.sampled_from(["text", "binary", "ping", "pong"]),
        st.binary(max_size=300),
        st.integers(1, 4),  # fragments for data messages
    ),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(messages=frames, cuts=st.lists(st.integers(0, 4000), max_size=12), seed=st.integers())
def test_forwarded_bytes_are_the_same_frames_unmasked(
    messages: list[tuple[str, bytes, int]], cuts: list[int], seed: int
) -> None:
    """Whatever the read boundaries, the output is exactly the unmasked server frames of the
    input (same FIN, opcode, length and payload), and control frames come out in order."""
    rng = random.Random(seed)
    wire = bytearray()
    expected = bytearray()
    expected_payload = bytearray()
    expected_controls: list[ControlFrame] = []
    for kind, payload, fragments in messages:
        if kind in ("ping", "pong"):
            opcode = OP_PING if kind == "ping" else OP_PONG
            body = payload[:125]
            wire += client_frame(opcode, body, mask=rng.randbytes(4))
            expected_controls.append(ControlFrame(opcode, body))
            continue
        if kind == "text":
            payload = payload.decode("latin-1").encode("utf-8")
        opcode = OP_TEXT if kind == "text" else OP_BINARY
        # Split on byte boundaries (a UTF-8 sequence may straddle two frames).
        bounds = sorted(rng.sample(range(len(payload) + 1), min(fragments - 1, len(payload) + 1)))
        parts = [payload[a:b] for a, b in zip([0, *bounds], [*bounds, len(payload)], strict=True)]
        for i, part in enumerate(parts):
            op = opcode if i == 0 else OP_CONTINUATION
            last = i == len(parts) - 1
            wire += client_frame(op, part, fin=last, mask=rng.randbytes(4))
            expected += server_frame(op, part, fin=last)
            expected_payload += part
    out, controls = feed_all(forwarder(), bytes(wire), cuts)
    assert out == bytes(expected)
    assert controls == expected_controls
    # The same wire for a byte-stream partner (the relay's TCP ingress): the payloads only.
    payload_only = forwarder()
    payload_only.payload_only = True
    out, controls = feed_all(payload_only, bytes(wire), cuts)
    assert out == bytes(expected_payload)
    assert controls == expected_controls


def test_large_frame_is_streamed_across_reads() -> None:
    payload = os.urandom(300_000)
    wire = client_frame(OP_BINARY, payload)
    fwd = forwarder()
    first_pieces, _ = fwd.feed(wire[:1000])
    # The header and the first part of the payload are passed on before the rest arrives.
    assert bytes(first_pieces[0][:10]) == server_frame_header(True, OP_BINARY, len(payload))
    assert bytes(first_pieces[0][10:]) == payload[: 1000 - 14]
    rest, _ = feed_all(fwd, wire[1000:], cuts=[1, 2, 3, 70_001, 200_000])
    assert bytes(first_pieces[0]) + rest == server_frame(OP_BINARY, payload)


def test_close_frame_is_parsed_and_ends_reading() -> None:
    fwd = forwarder()
    wire = client_frame(OP_CLOSE, close_payload(4001, "bye ✓")) + client_frame(OP_BINARY, b"x")
    out, controls = feed_all(fwd, wire)
    assert out == b""
    assert controls == [ControlFrame(OP_CLOSE, close_payload(4001, "bye ✓"), 4001, "bye ✓")]
    assert fwd.closed
    assert fwd.feed(client_frame(OP_BINARY, b"more")) == ([], [])
    empty = feed_all(forwarder(), client_frame(OP_CLOSE, b""))[1]
    assert empty == [ControlFrame(OP_CLOSE, b"", 1005, "")]


def test_close_reason_is_cut_on_a_character_boundary() -> None:
    payload = close_payload(1000, "é" * 100)  # 200 bytes of reason, cut to 123 -> 122
    assert len(payload) == 124
    assert payload[2:].decode("utf-8") == "é" * 61


# Named cases: the frames carry random mask keys, and ids made of them would differ between
# the processes of a parallel run (pytest-xdist).
@pytest.mark.parametrize(
    ("wire", "code"),
    [
        pytest.param(client_frame(OP_BINARY, b"x")[:1] + bytes([0x01]) + b"x", 1002, id="unmasked"),
        pytest.param(client_frame(OP_BINARY, b"x", rsv=0x40), 1002, id="rsv1-no-extension"),
        pytest.param(client_frame(0x3, b"x"), 1002, id="reserved-data-opcode"),
        pytest.param(client_frame(0xB, b"x"), 1002, id="reserved-control-opcode"),
        pytest.param(client_frame(OP_PING, b"x" * 126), 1002, id="control-payload-over-125"),
        pytest.param(client_frame(OP_PING, b"x", fin=False), 1002, id="fragmented-control"),
        pytest.param(client_frame(OP_CONTINUATION, b"x"), 1002, id="nothing-to-continue"),
        pytest.param(
            client_frame(OP_BINARY, b"a", fin=False) + client_frame(OP_TEXT, b"b"),
            1002,
            id="new-message-inside-a-fragmented-one",
        ),
        pytest.param(client_frame(OP_TEXT, b"\xff"), 1007, id="invalid-utf8"),
        pytest.param(
            client_frame(OP_TEXT, b"\xe2\x82", fin=False) + client_frame(OP_CONTINUATION, b""),
            1007,
            id="utf8-cut-at-the-end",
        ),
        pytest.param(client_frame(OP_CLOSE, b"\x03"), 1002, id="one-byte-close-payload"),
        pytest.param(client_frame(OP_CLOSE, (1005).to_bytes(2, "big")), 1002, id="close-1005"),
        pytest.param(client_frame(OP_CLOSE, (2999).to_bytes(2, "big")), 1002, id="close-2999"),
        pytest.param(
            client_frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"\xff"),
            1007,
            id="close-reason-utf8",
        ),
        pytest.param(
            bytes([0x82, 0xFF]) + (1 << 63).to_bytes(8, "big") + b"mask", 1002, id="length-2-63"
        ),
    ],
)
def test_violations(wire: bytes, code: int) -> None:
    with pytest.raises(FrameError) as info:
        feed_all(forwarder(), wire)
    assert info.value.code == code


def test_message_size_limit_counts_all_fragments() -> None:
    ok = client_frame(OP_BINARY, b"a" * 600, fin=False) + client_frame(OP_CONTINUATION, b"b" * 424)
    assert len(feed_all(forwarder(1024), ok)[0]) == 1024 + 8
    too_big = client_frame(OP_BINARY, b"a" * 600, fin=False) + client_frame(
        OP_CONTINUATION, b"b" * 425
    )
    with pytest.raises(FrameError) as info:
        feed_all(forwarder(1024), too_big)
    assert info.value.code == 1009


def test_valid_utf8_split_anywhere_is_accepted() -> None:
    text = "añ€😀".encode()
    wire = b"".join(
        client_frame(
            OP_TEXT if i == 0 else OP_CONTINUATION, text[i : i + 1], fin=i == len(text) - 1
        )
        for i in range(len(text))
    )
    for cut in range(len(wire)):
        assert feed_all(forwarder(), wire, [cut])[0]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=5))
def test_arbitrary_bytes_only_raise_frame_errors(data: bytes, cuts: list[int]) -> None:
    try:
        feed_all(forwarder(4096), data, cuts)
    except FrameError as exc:
        assert exc.code in (1002, 1007, 1009)


@given(mask=st.binary(min_size=4, max_size=4), data=st.binary(max_size=200))
def test_reference_unmask_matches_aiohttp(mask: bytes, data: bytes) -> None:
    ours, theirs = bytearray(data), bytearray(data)
    unmask_python(mask, ours)
    websocket_mask(mask, theirs)
    assert ours == theirs


@settings(max_examples=200, deadline=None)
@given(
    payload=st.binary(max_size=70_000),
    mask=st.binary(min_size=4, max_size=4),
    opcode=st.sampled_from([OP_TEXT, OP_BINARY, OP_CONTINUATION, OP_PING, OP_CLOSE]),
    fin=st.booleans(),
)
def test_masked_frame_matches_the_reference_encoder(
    payload: bytes, mask: bytes, opcode: int, fin: bool
) -> None:
    """Our one-copy client frame (the key rotated past the header) is byte for byte the frame
    the encoder written from the RFC makes, for every header length, and reads back."""
    frame = masked_frame(opcode, payload, mask, websocket_mask, fin=fin)
    assert bytes(frame) == client_frame(opcode, payload, fin=fin, mask=mask)
    assert masked_frame(opcode, memoryview(payload), mask, unmask_python, fin=fin) == frame


# -- the fast path for whole small server frames (whole_server_frames) ------------------------


def read_messages(
    wire: bytes, max_size: int, fast: bool, *, client_frames: bool = False
) -> list[tuple[int, bytes]] | str:
    """Messages read from ``wire``: server frames as a client reads them, or (``client_frames``)
    masked client frames as the relay's control channel reads them; with the fast path first
    (as both do between messages) or with the general reader alone; an error's code (the fast
    path's caller checks UTF-8 and fails with 1007, as both do)."""
    if client_frames:
        reader = forwarder(max_size)
    else:
        reader = FrameForwarder(websocket_mask, max_message_size=max_size, masked=False)
    reader.payload_only = True
    reader.track_messages = True
    data = memoryview(wire)
    messages: list[tuple[int, bytes]] = []
    if fast and reader.between_messages:
        frames: list[tuple[int, bytes]] | list[tuple[int, bytearray]]
        if client_frames:
            frames, used = whole_client_frames(data, max_size, websocket_mask)
        else:
            frames, used = whole_server_frames(data, max_size)
        for opcode, payload in frames:
            if opcode == OP_TEXT:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    return "error 1007"
            messages.append((opcode, bytes(payload)))
        data = data[used:]
    try:
        pieces, _ = reader.feed(data)
    except FrameError as exc:
        return f"error {exc.code}"
    start = 0
    for count, opcode in reader.message_ends:
        messages.append((opcode, b"".join(pieces[start:count])))
        start = count
    return messages


FRAMES = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([OP_TEXT, OP_BINARY]), st.binary(max_size=300), st.just(True)),
        st.tuples(st.sampled_from([OP_TEXT, OP_BINARY]), st.binary(max_size=70_000), st.just(True)),
        st.tuples(st.just(OP_PING), st.binary(max_size=10), st.just(True)),
        st.tuples(st.just(OP_BINARY), st.binary(max_size=20), st.just(False)),
    ),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(frames=FRAMES, max_size=st.sampled_from([100, 1 << 20]), cut=st.integers(0, 20))
def test_the_fast_path_reads_what_the_general_reader_reads(
    frames: list[tuple[int, bytes, bool]], max_size: int, cut: int
) -> None:
    wire = b"".join(server_frame(op, payload, fin=fin) for op, payload, fin in frames)
    wire = wire[: max(0, len(wire) - cut)]  # a read may end inside a frame
    assert read_messages(wire, max_size, fast=True) == read_messages(wire, max_size, fast=False)


def test_the_fast_path_leaves_anything_unusual_to_the_general_reader() -> None:
    small = server_frame(OP_TEXT, b"hi")
    assert whole_server_frames(small + small, 100) == ([(OP_TEXT, b"hi")] * 2, 2 * len(small))
    for other in (
        server_frame(OP_PING, b""),  # a control frame
        server_frame(OP_TEXT, b"hi", fin=False),  # a fragment
        bytes([0x81 | 0x40, 2]) + b"hi",  # a reserved bit
        bytes([0x81, 0x80 | 2]) + b"\0\0\0\0hi",  # masked
        bytes([0x82, 126, 0, 5]) + b"hello",  # a 16-bit length for 5 bytes
        server_frame(OP_BINARY, b"x" * 200),  # over max_size
        small[:-1],  # not all here
    ):
        assert whole_server_frames(small + other, 100) == ([(OP_TEXT, b"hi")], len(small))


# -- the fast path for whole small client frames (whole_client_frames) ------------------------


TEXTS = st.one_of(st.text(max_size=50).map(str.encode), st.binary(max_size=50))
CLIENT_FRAMES = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([OP_TEXT, OP_BINARY]), TEXTS, st.just(True), st.just(True)),
        st.tuples(
            st.sampled_from([OP_TEXT, OP_BINARY]),
            st.integers(0, 300).map(lambda n: b"x" * n),  # around the limit and 126
            st.just(True),
            st.booleans(),
        ),
        st.tuples(st.just(OP_BINARY), st.binary(max_size=70_000), st.just(True), st.just(True)),
        st.tuples(st.just(OP_PING), st.binary(max_size=10), st.just(True), st.just(True)),
        st.tuples(st.just(OP_TEXT), TEXTS, st.just(False), st.just(True)),
        st.tuples(st.just(OP_CONTINUATION), TEXTS, st.booleans(), st.just(True)),
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(
    frames=CLIENT_FRAMES,
    max_size=st.sampled_from([100, 1 << 20]),
    cut=st.integers(0, 20),
    mask=st.binary(min_size=4, max_size=4),
)
def test_the_client_fast_path_reads_what_the_general_reader_reads(
    frames: list[tuple[int, bytes, bool, bool]], max_size: int, cut: int, mask: bytes
) -> None:
    # Text that is and is not UTF-8, fragments, pings, unmasked frames, lengths over the
    # limit; a read that may end inside a frame.
    wire = b"".join(
        client_frame(op, payload, fin=fin, mask=mask, masked=masked)
        for op, payload, fin, masked in frames
    )
    wire = wire[: max(0, len(wire) - cut)]
    fast = read_messages(wire, max_size, fast=True, client_frames=True)
    assert fast == read_messages(wire, max_size, fast=False, client_frames=True)


def test_the_client_fast_path_leaves_anything_unusual_to_the_general_reader() -> None:
    small = client_frame(OP_TEXT, b"hi")
    assert whole_client_frames(small + small, 100, websocket_mask) == (
        [(OP_TEXT, bytearray(b"hi"))] * 2,
        2 * len(small),
    )
    big = client_frame(OP_BINARY, b"y" * 300)
    assert whole_client_frames(big, 300, websocket_mask) == (
        [(OP_BINARY, bytearray(b"y" * 300))],
        len(big),
    )
    empty = whole_client_frames(client_frame(OP_BINARY), 0, websocket_mask)[0]
    assert empty == [(OP_BINARY, bytearray())]
    for other in (
        client_frame(OP_PING, b""),  # a control frame
        client_frame(OP_CLOSE, close_payload(1000)),
        client_frame(OP_TEXT, b"hi", fin=False),  # a fragment
        client_frame(OP_CONTINUATION, b"hi"),
        client_frame(OP_TEXT, b"hi", rsv=0x40),  # a reserved bit
        client_frame(OP_TEXT, b"hi", masked=False),  # not masked
        bytes([0x82, 0x80 | 126, 0, 5]) + b"\0\0\0\0hello",  # a 16-bit length for 5 bytes
        client_frame(OP_BINARY, b"x" * 70_000),  # a 64-bit length
        client_frame(OP_BINARY, b"x" * 200),  # over max_size
        small[:-1],  # not all here
        small[:5],  # its key not all here
    ):
        assert whole_client_frames(small + other, 100, websocket_mask) == (
            [(OP_TEXT, bytearray(b"hi"))],
            len(small),
        )
