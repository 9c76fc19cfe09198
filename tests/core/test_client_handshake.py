"""The client side of the WebSocket handshake and the server-to-client frame reader, without
I/O (protocol/websocket.py: ``upgrade_request``, ``parse_response_head``,
``check_upgrade_response``, ``accept_key``, ``FrameForwarder(masked=False)``), as our own client
socket (transport/frames_ws.py) uses them."""

from __future__ import annotations

import base64
import os
import string

import pytest
from aiohttp._websocket.helpers import websocket_mask
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hybridrelay.exceptions import ProtocolError
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
    ResponseHead,
    accept_key,
    check_upgrade_response,
    close_payload,
    frame_header,
    parse_response_head,
    server_frame,
    upgrade_request,
)
from tests.wsframes import client_frame

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
TOKEN_CHARS = "!#$%&'*+-.^_`|~" + string.digits + string.ascii_letters

# -- accept_key ---------------------------------------------------------------------------------


def test_accept_key_rfc_6455_example() -> None:
    assert accept_key(KEY) == ACCEPT  # RFC 6455 1.3


def test_accept_key_of_a_random_key_is_base64_of_20_bytes() -> None:
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    assert len(base64.b64decode(accept_key(key), validate=True)) == 20
    assert accept_key(key) != accept_key(KEY)


# -- upgrade_request ----------------------------------------------------------------------------


def request_lines(request: bytes) -> list[str]:
    assert request.endswith(b"\r\n\r\n")
    assert request.count(b"\r\n\r\n") == 1
    return request[:-4].decode("utf-8").split("\r\n")


def test_upgrade_request_has_everything_rfc_6455_asks_for() -> None:
    target = "/$hc/hc?sb-hc-action=connect&sb-hc-id=a%20b&x=%2F%3D%25&sb-hc-token=SharedAccess"
    request = upgrade_request(
        target,
        "relay.example:8443",
        KEY,
        {"ServiceBusAuthorization": "SharedAccessSignature sr=x&sig=y%3D", "X-Custom": "1"},
        ("a.v1", "b.v1"),
    )
    lines = request_lines(request)
    # The target verbatim: percent-encodings are not decoded, nothing is re-encoded.
    assert lines[0] == f"GET {target} HTTP/1.1"
    headers = lines[1:]
    assert "Host: relay.example:8443" in headers
    assert "Upgrade: websocket" in headers
    assert "Connection: Upgrade" in headers
    assert f"Sec-WebSocket-Key: {KEY}" in headers
    assert "Sec-WebSocket-Version: 13" in headers
    assert "Sec-WebSocket-Protocol: a.v1, b.v1" in headers
    assert "ServiceBusAuthorization: SharedAccessSignature sr=x&sig=y%3D" in headers
    assert "X-Custom: 1" in headers
    # Extra headers keep their order, after the handshake's own.
    assert headers.index("ServiceBusAuthorization: SharedAccessSignature sr=x&sig=y%3D") < (
        headers.index("X-Custom: 1")
    )
    assert headers.index("Sec-WebSocket-Version: 13") < headers.index("X-Custom: 1")
    assert not any(line.lower().startswith("sec-websocket-extensions") for line in headers)
    assert len(headers) == 8


def test_upgrade_request_without_protocols_has_no_protocol_header() -> None:
    lines = request_lines(upgrade_request("/", "127.0.0.1:80", KEY, {}))
    assert lines[0] == "GET / HTTP/1.1"
    assert not any(line.lower().startswith("sec-websocket-protocol") for line in lines)
    assert len(lines) == 6


def test_upgrade_request_single_protocol_and_utf8_value() -> None:
    request = upgrade_request("/", "h", KEY, {"X-Name": "héllo ✓"}, ["only"])
    lines = request_lines(request)
    assert "Sec-WebSocket-Protocol: only" in lines
    assert "X-Name: héllo ✓" in lines


def _injected(place: str, bad: str) -> tuple[str, str, dict[str, str]]:
    """(target, host, headers) with ``bad`` in ``place``."""
    target, host, headers = "/x", "h", {"X-Ok": "fine"}
    if place == "value":
        headers = {"X-Evil": f"a{bad}Injected:yes"}
    elif place == "name":
        headers = {f"X-Evil{bad}Injected": "yes"}
    elif place == "target":
        target = f"/x{bad}Injected:yes"
    else:
        host = f"h{bad}Injected:yes"
    return target, host, headers


@pytest.mark.parametrize(
    ("place", "bad"),
    [
        (place, bad)
        for place in ("value", "name", "target", "host")
        for bad in ("\r", "\n", "\r\n", "\n\r", "\r\n\r\n")
    ],
)
def test_upgrade_request_refuses_cr_lf_injection(place: str, bad: str) -> None:
    """CR, LF, a CRLF pair or a blank line (request smuggling) in a header value, a header
    name, the target or the host."""
    target, host, headers = _injected(place, bad)
    with pytest.raises(ValueError):
        upgrade_request(target, host, KEY, headers)


@pytest.mark.parametrize("name", ["", "X Evil", "X:Evil", "X-é", "X\tY", "(X)", "X/Y"])
def test_upgrade_request_refuses_a_header_name_that_is_not_a_token(name: str) -> None:
    with pytest.raises(ValueError):
        upgrade_request("/", "h", KEY, {name: "v"})


def test_upgrade_request_refuses_a_space_in_the_target() -> None:
    with pytest.raises(ValueError):
        upgrade_request("/a b", "h", KEY, {})


# -- parse_response_head ------------------------------------------------------------------------


def test_parse_response_head_101() -> None:
    head = (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"CONNECTION:Upgrade\r\n"
        b"Sec-WebSocket-Accept:  " + ACCEPT.encode() + b" \t\r\n"
        b"X-Empty:"
    )
    parsed = parse_response_head(head)
    assert parsed == ResponseHead(
        101,
        "Switching Protocols",
        {
            "upgrade": "websocket",
            "connection": "Upgrade",
            "sec-websocket-accept": ACCEPT,
            "x-empty": "",
        },
    )


def test_parse_response_head_joins_repeated_headers() -> None:
    head = b"HTTP/1.1 200 OK\r\nVia: a\r\nX: 1\r\nvia: b\r\nVIA: c"
    assert parse_response_head(head).headers == {"via": "a, b, c", "x": "1"}


@pytest.mark.parametrize(
    ("raw", "status", "reason"),
    [
        (b"HTTP/1.1 404 Not Found", 404, "Not Found"),
        (b"HTTP/1.0 503 Busy", 503, "Busy"),
        (b"HTTP/1.1 101", 101, ""),
        (b"HTTP/1.1 409 ", 409, ""),
        (b"HTTP/1.1 409 Busy: try again & later (100%)", 409, "Busy: try again & later (100%)"),
        ("HTTP/1.1 409 Déjà pris ✓".encode(), 409, "Déjà pris ✓"),
        (b"HTTP/1.1 400 \xe9t\xe9", 400, "été"),  # not UTF-8: read as Latin-1
        (b"HTTP/1.1 500  two  spaces ", 500, " two  spaces "),
    ],
)
def test_parse_response_head_status_and_reason(raw: bytes, status: int, reason: str) -> None:
    parsed = parse_response_head(raw)
    assert (parsed.status, parsed.reason, parsed.headers) == (status, reason, {})


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"HELLO",
        b"HTTP/1.1",
        b"HTTP/1.1 ",
        b"HTTP/1.1 10 Short",
        b"HTTP/1.1 1010 Long",
        b"HTTP/1.1 1O1 Letter",
        b"HTTP/1.1 -01 Sign",
        b"HTTP/1.1  101 Two spaces",
        b"HTTP/2 101 Switching",
        b"http/1.1 101 lower",
        b"HTTP/1.1\t101 tab",
        b"ICY 200 OK",
        b" HTTP/1.1 101 leading space",
        b"HTTP/1.1 \xb2\xb2\xb2 superscripts",
        b"HTTP/1.1 1\xb9\xb3 superscripts",
    ],
)
def test_parse_response_head_refuses_a_malformed_status_line(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_response_head(raw)


@pytest.mark.parametrize(
    "line",
    [
        b"no colon here",
        b": no name",
        b"Bad Name: space in the name",
        b"Name : space before the colon",
        b"\tfolded: obsolete line folding",
        b" folded continuation",
        b"",
        b"N\xe9me: not a token",
        b"(x): not a token",
    ],
)
def test_parse_response_head_refuses_a_malformed_header_line(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_response_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n" + line)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.tuples(
            st.sampled_from([b"HTTP/1.1 ", b"HTTP/1.0 ", b"HTTP/1.1 101 ", b"HTTP/1.1 101 x\r\n"]),
            st.binary(max_size=200),
        ).map(b"".join),
        st.lists(
            st.sampled_from([b"HTTP/1.1", b" ", b"101", b"\r\n", b":", b"a", b"\xb2", b"\xe9"])
        ).map(b"".join),
    )
)
@example(b"HTTP/1.1 \xb2\xb2\xb2 OK")
def test_parse_response_head_only_raises_protocol_error(raw: bytes) -> None:
    try:
        parsed = parse_response_head(raw)
    except ProtocolError:
        return
    assert isinstance(parsed, ResponseHead)
    assert 0 <= parsed.status <= 999


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300).map(lambda raw: bytes(b & 0x7F for b in raw)),
        st.tuples(
            st.sampled_from([b"HTTP/1.1 ", b"HTTP/1.0 ", b"HTTP/1.1 101 ", b"HTTP/1.1 101 x\r\n"]),
            st.text(string.printable, max_size=200).map(str.encode),
        ).map(b"".join),
        st.lists(
            st.sampled_from([b"HTTP/1.1", b" ", b"101", b"\r\n", b":", b"a", b"\t", b"9"])
        ).map(b"".join),
    )
)
def test_parse_response_head_only_raises_protocol_error_ascii(raw: bytes) -> None:
    """As above, for ASCII input (where the superscript digits cannot occur)."""
    try:
        parsed = parse_response_head(raw)
    except ProtocolError:
        return
    assert isinstance(parsed, ResponseHead)
    assert 0 <= parsed.status <= 999


_reasons = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=40)
_names = st.text(TOKEN_CHARS, min_size=1, max_size=20)
_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.just("\t"), max_size=40
).map(lambda value: value.strip(" \t"))


@settings(max_examples=300, deadline=None)
@given(
    status=st.integers(100, 999),
    reason=_reasons,
    headers=st.lists(st.tuples(_names, _values), max_size=12),
    http10=st.booleans(),
)
def test_parse_response_head_round_trip(
    status: int, reason: str, headers: list[tuple[str, str]], http10: bool
) -> None:
    lines = [f"HTTP/1.{0 if http10 else 1} {status} {reason}".encode()]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
    expected: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        expected[key] = f"{expected[key]}, {value}" if key in expected else value
    assert parse_response_head(b"\r\n".join(lines)) == ResponseHead(status, reason, expected)


# -- check_upgrade_response ---------------------------------------------------------------------


def good_headers(**changes: str | None) -> dict[str, str]:
    headers = {
        "upgrade": "websocket",
        "connection": "Upgrade",
        "sec-websocket-accept": ACCEPT,
    }
    for name, value in changes.items():
        name = name.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return headers


def test_check_upgrade_response_accepts_a_good_101() -> None:
    assert (
        check_upgrade_response(ResponseHead(101, "Switching Protocols", good_headers()), KEY)
        is None
    )
    # Tokens are case-insensitive; Connection is a list.
    head = ResponseHead(
        101, "", good_headers(upgrade="WebSocket", connection="keep-alive, UPGRADE")
    )
    assert check_upgrade_response(head, KEY) is None
    # No sub-protocol chosen although we offered some: allowed (the server picks none).
    assert check_upgrade_response(ResponseHead(101, "", good_headers()), KEY, ("a", "b")) is None


def test_check_upgrade_response_returns_the_chosen_subprotocol() -> None:
    head = ResponseHead(101, "", good_headers(sec_websocket_protocol="b.v1"))
    assert check_upgrade_response(head, KEY, ("a.v1", "b.v1")) == "b.v1"
    assert check_upgrade_response(head, KEY, ["b.v1"]) == "b.v1"


@pytest.mark.parametrize(
    ("status", "changes", "protocols"),
    [
        (200, {}, ()),
        (100, {}, ()),
        (301, {}, ()),
        (101, {"upgrade": None}, ()),
        (101, {"upgrade": "h2c"}, ()),
        (101, {"upgrade": "websocket2"}, ()),
        (101, {"connection": None}, ()),
        (101, {"connection": "keep-alive"}, ()),
        (101, {"connection": "upgraded"}, ()),
        (101, {"sec_websocket_accept": None}, ()),
        (101, {"sec_websocket_accept": ""}, ()),
        (101, {"sec_websocket_accept": accept_key("AAAAAAAAAAAAAAAAAAAAAA==")}, ()),
        (101, {"sec_websocket_accept": ACCEPT.lower()}, ()),
        (101, {"sec_websocket_accept": ACCEPT + " "}, ()),
        (101, {"sec_websocket_extensions": "permessage-deflate"}, ()),
        (101, {"sec_websocket_protocol": "chat"}, ()),
        (101, {"sec_websocket_protocol": "chat"}, ("a.v1", "b.v1")),
        (101, {"sec_websocket_protocol": "a.v1, b.v1"}, ("a.v1", "b.v1")),
    ],
)
def test_check_upgrade_response_refuses(
    status: int, changes: dict[str, str | None], protocols: tuple[str, ...]
) -> None:
    head = ResponseHead(status, "", good_headers(**changes))
    with pytest.raises(ProtocolError):
        check_upgrade_response(head, KEY, protocols)


def test_handshake_round_trip_through_the_parser() -> None:
    """A server's answer, as bytes, parsed and checked like frames_ws does."""
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    raw = (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\nSec-WebSocket-Protocol: b.v1"
    ).encode()
    assert check_upgrade_response(parse_response_head(raw), key, ("a.v1", "b.v1")) == "b.v1"


# -- FrameForwarder reading a server's frames ---------------------------------------------------


def reader(max_message_size: int = 1 << 30) -> FrameForwarder:
    fwd = FrameForwarder(websocket_mask, max_message_size=max_message_size, masked=False)
    fwd.payload_only = True
    fwd.track_messages = True
    return fwd


def test_rfc_6455_unmasked_examples() -> None:
    fwd = reader()
    pieces, controls = fwd.feed(bytes.fromhex("810548656c6c6f"))  # "Hello", one frame
    assert (pieces, controls, fwd.message_ends) == ([bytearray(b"Hello")], [], [(1, OP_TEXT)])
    pieces, controls = fwd.feed(bytes.fromhex("010348656c"))  # "Hel", not final
    assert (pieces, fwd.message_ends) == ([bytearray(b"Hel")], [])
    pieces, controls = fwd.feed(bytes.fromhex("80026c6f"))  # "lo", final continuation
    assert (pieces, fwd.message_ends) == ([bytearray(b"lo")], [(1, OP_TEXT)])
    pieces, controls = fwd.feed(bytes.fromhex("890548656c6c6f"))  # ping "Hello"
    assert (pieces, controls, fwd.message_ends) == ([], [ControlFrame(OP_PING, b"Hello")], [])
    big = os.urandom(256)
    pieces, controls = fwd.feed(bytes.fromhex("827e0100") + big)  # 256 bytes, 16-bit length
    assert (b"".join(pieces), fwd.message_ends) == (big, [(len(pieces), OP_BINARY)])
    big = os.urandom(65536)
    pieces, controls = fwd.feed(bytes.fromhex("827f0000000000010000") + big)  # 64-bit length
    assert (b"".join(pieces), fwd.message_ends) == (big, [(len(pieces), OP_BINARY)])


def test_a_masked_server_frame_is_refused() -> None:
    with pytest.raises(FrameError) as info:
        reader().feed(client_frame(OP_BINARY, b"masked"))
    assert info.value.code == 1002


@st.composite
def server_stream(
    draw: st.DrawFn,
) -> tuple[bytes, list[tuple[int, bytes]], list[ControlFrame]]:
    """Unmasked server frames: (wire bytes, [(opcode, payload)] per message, control frames).
    Messages are cut into frames at random, with pings and pongs between some frames."""
    wire = bytearray()
    messages: list[tuple[int, bytes]] = []
    controls: list[ControlFrame] = []

    def maybe_control() -> None:
        if draw(st.integers(0, 4)) == 0:
            opcode = draw(st.sampled_from([OP_PING, OP_PONG]))
            payload = draw(st.binary(max_size=125))
            wire.extend(server_frame(opcode, payload))
            controls.append(ControlFrame(opcode, payload))

    for _ in range(draw(st.integers(0, 8))):
        if draw(st.booleans()):
            opcode = OP_TEXT
            text = draw(st.text(st.characters(codec="utf-8"), max_size=300))
            payload = text.encode("utf-8")
        else:
            opcode = OP_BINARY
            payload = draw(
                st.one_of(
                    st.binary(max_size=300),
                    st.integers(125, 70_000).map(
                        lambda n: (bytes(range(256)) * (n // 256 + 1))[:n]
                    ),
                )
            )
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=4)))
        bounds = [0, *cuts, len(payload)]
        frames = [payload[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        for index, part in enumerate(frames):
            first, last = index == 0, index == len(frames) - 1
            wire.extend(frame_header(last, opcode if first else OP_CONTINUATION, len(part)))
            wire.extend(part)
            if not last:
                maybe_control()
        messages.append((opcode, payload))
        maybe_control()
    if draw(st.booleans()):
        wire.extend(server_frame(OP_CLOSE, close_payload(1000, "done")))
        controls.append(ControlFrame(OP_CLOSE, close_payload(1000, "done"), 1000, "done"))
    return bytes(wire), messages, controls


@settings(max_examples=200, deadline=None)
@given(stream=server_stream(), data=st.data())
def test_reader_rebuilds_messages_from_random_splits(
    stream: tuple[bytes, list[tuple[int, bytes]], list[ControlFrame]], data: st.DataObject
) -> None:
    wire, messages, controls = stream
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(wire) - 1)), max_size=12))))
    bounds = [0, *[c for c in cuts if c < len(wire)], len(wire)]
    fwd = reader()
    pieces: list[bytearray] = []
    ends: list[tuple[int, int]] = []
    got_controls: list[ControlFrame] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        out, ctl = fwd.feed(wire[a:b])
        # message_ends is per feed: its counts are of this feed's pieces.
        ends += [(len(pieces) + count, opcode) for count, opcode in fwd.message_ends]
        pieces += out
        got_controls += ctl
    assert all(pieces), "no empty piece"
    assert b"".join(pieces) == b"".join(payload for _, payload in messages)
    assert got_controls == controls
    rebuilt: list[tuple[int, bytes]] = []
    start = 0
    for count, opcode in ends:
        assert start <= count <= len(pieces)
        rebuilt.append((opcode, b"".join(pieces[start:count])))
        start = count
    assert start == len(pieces)
    assert rebuilt == messages
