"""WebSocket frames and handshake as the relay forwards them (RFC 6455), without I/O.

After the rendezvous both legs of a relayed connection are WebSockets on which the relay is the
*server*: frames arrive masked (client to server) and leave unmasked (server to client). The
relay does not need messages, only frames: :class:`FrameForwarder` turns the masked byte
stream of one leg into the unmasked byte stream for the other, frame by frame and with the
payload streamed as it arrives (a 100 MiB message costs no more memory than a 1 KiB one), while
checking everything RFC 6455 asks of a server: masking, reserved bits and opcodes, fragmentation
order, control-frame limits, UTF-8 in text messages and close reasons, close codes.

Message boundaries, types and fragmentation are kept exactly (PROTOCOL.md 5.5: "all data frames
are relayed unmodified"); pings and pongs are hop by hop and reported to the caller, as is the
close frame. Unmasking is the one hot loop, so it is injected (the relay passes aiohttp's C
implementation; :func:`unmask_python` is the reference).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from hybridrelay.exceptions import ProtocolError

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameForwarder",
    "MAX_RESPONSE_HEAD",
    "ControlFrame",
    "FrameError",
    "HandshakeError",
    "ResponseHead",
    "WIRE_CLOSE_CODES",
    "Unmask",
    "accept_key",
    "check_header_fields",
    "check_upgrade_response",
    "close_payload",
    "frame_header",
    "handshake_headers",
    "masked_frame",
    "parse_response_head",
    "upgrade_request",
    "server_frame",
    "whole_client_frames",
    "whole_server_frames",
    "server_frame_header",
    "unmask_python",
]

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_CONTROL_PAYLOAD = 125
#: Close codes that may appear in a close frame (RFC 6455 7.4.1/7.4.2; 1004-1006 and 1015 are
#: never on the wire), besides the application range 3000-4999.
WIRE_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)

#: XOR ``data`` in place with ``mask`` (4 bytes) repeated, starting at ``data[0]``.
Unmask = Callable[[bytes, bytearray], None]


def unmask_python(mask: bytes, data: bytearray) -> None:
    """The reference :data:`Unmask` (slow; tests and a fallback only)."""
    if not data:
        return
    length = len(data)
    key = (mask * (length // 4 + 1))[:length]
    data[:] = (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
        length, "little"
    )


class FrameError(Exception):
    """The peer broke the framing rules; close its leg with :attr:`code`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        #: What :meth:`FrameForwarder.feed` had produced from the valid frames before
        #: the violation, in the same call (to be forwarded before the close).
        self.pieces: list[bytearray] = []


class HandshakeError(Exception):
    """An upgrade request that cannot be answered with 101."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class ControlFrame:
    """A ping, pong or close frame (``code``/``reason`` set for close; 1005 when it had none)."""

    opcode: int
    payload: bytes
    code: int = 1005
    reason: str = ""


def handshake_headers(headers: Mapping[str, str], subprotocol: str | None) -> dict[str, str]:
    """The headers of the 101 answer to a client's upgrade request (RFC 6455 4.2.2).

    ``subprotocol`` is echoed only if the client offered it. No extension is ever accepted
    (PROTOCOL.md 5.6). Raises :class:`HandshakeError` for a request that is not a valid
    version-13 upgrade.
    """
    if headers.get("Upgrade", "").lower() != "websocket":
        raise HandshakeError(400, "A WebSocket upgrade is required.")
    if "upgrade" not in [t.strip().lower() for t in headers.get("Connection", "").split(",")]:
        raise HandshakeError(400, "The Connection header must include 'Upgrade'.")
    if headers.get("Sec-WebSocket-Version", "").strip() != "13":
        raise HandshakeError(426, "Only WebSocket version 13 is supported.")
    key = headers.get("Sec-WebSocket-Key", "").strip()
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        valid_key = False
    if not valid_key:
        raise HandshakeError(400, "Sec-WebSocket-Key is not a base64-encoded 16-byte value.")
    answer = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Accept": accept_key(key),
    }
    if subprotocol:
        offered = [p.strip() for p in headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if subprotocol in offered:
            answer["Sec-WebSocket-Protocol"] = subprotocol
    return answer


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


# -- the client side of the handshake ----------------------------------------------------------

#: Longest response head (status line and headers) a client accepts.
MAX_RESPONSE_HEAD = 64 * 1024
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """The status line and headers of an HTTP/1.1 response; header names lower-cased,
    repeated headers joined with ``", "``."""

    status: int
    reason: str
    headers: dict[str, str]


def upgrade_request(
    target: str,
    host: str,
    key: str,
    headers: Mapping[str, str],
    protocols: Sequence[str] = (),
) -> bytes:
    """A client's upgrade request (RFC 6455 4.1) for ``target`` (path and query, sent as
    given: a rendezvous address must reach the relay byte for byte).

    Raises:
        ValueError: a header name or value, the target or the host that would break the
            request (CR, LF, or a name that is not an HTTP token).
    """
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocols:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(protocols)}")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    check_header_fields(headers)
    if " " in target or any("\r" in v or "\n" in v for v in (target, host, *protocols)):
        raise ValueError("CR, LF or a space where they cannot be")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def check_header_fields(headers: Mapping[str, str]) -> None:
    """Refuse header fields that would break a request: a name that is not an HTTP token, a
    value with CR or LF (header injection; a blank line would end the request early).

    Raises:
        ValueError: naming the header, never its value (it may be a token).
    """
    for name, value in headers.items():
        if not name or not set(name) <= _TOKEN:
            raise ValueError(f"invalid header name {name!r}")
        if "\r" in value or "\n" in value:
            raise ValueError(f"CR or LF in the value of header {name!r}")


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse a response head (everything before the blank line that ends it).

    Raises:
        ProtocolError: not an HTTP/1.x status line followed by ``name: value`` lines.
    """
    text = head.decode("latin-1")
    status_line, *header_lines = text.split("\r\n")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isascii():
        raise ProtocolError(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
    if not code.isdigit():
        raise ProtocolError(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
    try:  # a reason phrase in UTF-8 (the relay's descriptions may be) is read as such
        reason = reason.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        pass
    headers: dict[str, str] = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon or not name or not set(name) <= _TOKEN:
            raise ProtocolError(f"malformed header line {line[:80]!r}")
        key = name.lower()
        value = value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return ResponseHead(int(code), reason, headers)


def check_upgrade_response(
    head: ResponseHead, key: str, protocols: Sequence[str] = ()
) -> str | None:
    """Check a 101 answer to our upgrade request (RFC 6455 4.1); the sub-protocol chosen.

    Raises:
        ProtocolError: the server did not complete the handshake we asked for.
    """
    headers = head.headers
    if head.status != 101:
        raise ProtocolError(f"expected 101, got {head.status}")
    if headers.get("upgrade", "").lower() != "websocket":
        raise ProtocolError("the 101 has no 'Upgrade: websocket'")
    if "upgrade" not in [t.strip().lower() for t in headers.get("connection", "").split(",")]:
        raise ProtocolError("the 101 has no 'Connection: Upgrade'")
    if headers.get("sec-websocket-accept", "") != accept_key(key):
        raise ProtocolError("wrong Sec-WebSocket-Accept")
    if headers.get("sec-websocket-extensions"):
        raise ProtocolError("the server chose an extension we did not offer")
    chosen = headers.get("sec-websocket-protocol") or None
    if chosen is not None and chosen not in protocols:
        raise ProtocolError(f"the server chose a sub-protocol we did not offer: {chosen!r}")
    return chosen


def frame_header(fin: bool, opcode: int, length: int, *, masked: bool = False) -> bytes:
    """A frame header up to (not including) the masking key; ``masked`` sets the MASK bit
    (client frames: the 4-byte key follows)."""
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if masked else 0
    if length < 126:
        return bytes((first, bit | length))
    if length < 65536:
        return bytes((first, bit | 126)) + length.to_bytes(2, "big")
    return bytes((first, bit | 127)) + length.to_bytes(8, "big")


def masked_frame(
    opcode: int,
    payload: bytes | bytearray | memoryview,
    mask: bytes,
    xor: Unmask,
    *,
    fin: bool = True,
) -> bytearray:
    """One client (masked) frame with key ``mask``, built with a single copy of the payload:
    the whole frame is XORed with the key rotated to line up after the header, then the header
    and the key are written back over the start."""
    length = len(payload)
    header = frame_header(fin, opcode, length, masked=True)
    prefix = len(header) + 4
    frame = bytearray(prefix)
    frame += payload
    if length:
        xor(_rotate(mask, -prefix), frame)
    frame[:prefix] = header + mask
    return frame


def whole_server_frames(
    data: bytes | bytearray | memoryview, max_size: int
) -> tuple[list[tuple[int, bytes]], int]:
    """The whole, unfragmented, unmasked text and binary frames at the start of ``data``, as
    (opcode, payload), and how many bytes they took.

    The fast path of a client reading small messages (control channels): most reads hold
    whole frames of a few hundred bytes, and reading them here costs a fraction of a general
    :class:`FrameForwarder` pass. It stops at the first frame that is anything else (a control
    frame, a fragment, a masked frame, reserved bits, a 64-bit or non-minimal length, a payload
    over ``max_size``, a frame not all here), which the general reader then takes, with every
    check it makes. Text payloads are not checked for UTF-8 here: the caller decodes them.
    """
    return cast("tuple[list[tuple[int, bytes]], int]", _whole_frames(data, max_size, None))


def whole_client_frames(
    data: bytes | bytearray | memoryview, max_size: int, unmask: Unmask
) -> tuple[list[tuple[int, bytearray]], int]:
    """The whole, unfragmented, masked text and binary frames at the start of ``data``, as
    (opcode, unmasked payload), and how many bytes they took.

    The server side's twin of :func:`whole_server_frames`: the fast path of the relay reading
    a listener's control channel (its ``response`` messages, a few hundred bytes each, arrive
    several to a read), where a general :class:`FrameForwarder` pass per message costs a
    frame header built and dropped, an incremental UTF-8 decoder and a state machine's steps.
    It stops where :func:`whole_server_frames` does, at an unmasked frame instead of a masked
    one. Text payloads are not checked for UTF-8 here: the caller decodes them (and fails the
    connection with 1007 where that fails, as the general reader would).
    """
    return cast("tuple[list[tuple[int, bytearray]], int]", _whole_frames(data, max_size, unmask))


def _whole_frames(
    data: bytes | bytearray | memoryview, max_size: int, unmask: Unmask | None
) -> tuple[list[tuple[int, bytes | bytearray]], int]:
    """Both sides' fast path: masked frames (unmasked with ``unmask``) when it is given, else
    unmasked ones; any other frame ends the run."""
    view = memoryview(data)
    frames: list[tuple[int, bytes | bytearray]] = []
    key = 4 if unmask is not None else 0
    mask_bit = 0x80 if unmask is not None else 0
    pos = 0
    end = len(view)
    while end - pos >= 2 + key:
        first, second = view[pos], view[pos + 1]
        if (first != 0x80 | OP_TEXT and first != 0x80 | OP_BINARY) or second & 0x80 != mask_bit:
            break
        length = second & 0x7F
        start = pos + 2 + key
        if length == 126:
            if end - pos < 4 + key:
                break
            length = (view[pos + 2] << 8) | view[pos + 3]
            if length < 126:
                break
            start = pos + 4 + key
        elif length == 127:
            break
        if length > max_size or end - start < length:
            break
        if unmask is None:
            frames.append((first & 0x0F, bytes(view[start : start + length])))
        else:
            payload = bytearray(view[start : start + length])
            if length:
                unmask(bytes(view[start - 4 : start]), payload)
            frames.append((first & 0x0F, payload))
        pos = start + length
    return frames, pos


def server_frame_header(fin: bool, opcode: int, length: int) -> bytes:
    """The header of an unmasked (server to client) frame."""
    return frame_header(fin, opcode, length)


def server_frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """One whole unmasked frame."""
    return server_frame_header(fin, opcode, len(payload)) + payload


def close_payload(code: int, reason: str = "") -> bytes:
    """The payload of a close frame; the reason is cut to fit 125 bytes on a character boundary."""
    encoded = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return code.to_bytes(2, "big") + encoded


def _parse_close(payload: bytes) -> ControlFrame:
    if not payload:
        return ControlFrame(OP_CLOSE, payload)
    if len(payload) == 1:
        raise FrameError(1002, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if code not in WIRE_CLOSE_CODES and not 3000 <= code <= 4999:
        raise FrameError(1002, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(1007, "close reason is not valid UTF-8") from None
    return ControlFrame(OP_CLOSE, payload, code, reason)


def _rotate(mask: bytes, shift: int) -> bytes:
    shift %= 4
    return mask[shift:] + mask[:shift] if shift else mask


class FrameForwarder:
    """Rewrites the masked frames of one client leg into unmasked frames, streaming payloads.

    With ``masked=False`` it reads the other direction, a server's frames as a client gets them
    (which must *not* be masked; nothing to unmask): our own client sockets use it with
    :attr:`payload_only` and :attr:`track_messages`.

    :meth:`feed` takes whatever bytes arrived and returns the bytes to write to the other leg
    (whole frames, or the header and first part of a frame whose payload is still arriving,
    or further parts of it) and the control frames that arrived. After a close frame the
    forwarder ignores anything more. A violation raises :class:`FrameError`, after which the
    forwarder must not be fed again.

    Memory: at most one partial frame header (< 14 bytes) and one control frame's payload
    (<= 125 bytes) are kept between calls; data payloads are passed on as they come.
    """

    __slots__ = (
        "_closed",
        "_control",
        "_fin",
        "_in_message",
        "_mask",
        "_max_message_size",
        "_message_size",
        "_masked",
        "_message_opcode",
        "_opcode",
        "_partial_header",
        "_phase",
        "_remaining",
        "_unmask",
        "_utf8",
        "_utf8_decoder",
        "message_ends",
        "payload_only",
        "track_messages",
    )

    def __init__(self, unmask: Unmask, *, max_message_size: int, masked: bool = True) -> None:
        self._unmask = unmask
        self._masked = masked
        self._max_message_size = max_message_size
        self._message_opcode = OP_BINARY
        self._partial_header = b""
        self._remaining = -1  # payload bytes left in the current frame; -1 = expecting a header
        self._opcode = 0
        self._fin = False
        self._mask = b""
        self._phase = 0  # payload bytes of the current frame already consumed (mod 4 matters)
        self._control: bytearray | None = None
        self._in_message = False
        self._message_size = 0
        #: The decoder of the text message being read (None between text messages), and the
        #: one decoder the reader reuses for every text message.
        self._utf8: codecs.IncrementalDecoder | None = None
        self._utf8_decoder: codecs.IncrementalDecoder | None = None
        self._closed = False
        #: Produce the data frames' payload bytes only, without frame headers: for a leg whose
        #: partner is a plain byte stream (the relay's own TCP ingress) rather than a WebSocket.
        self.payload_only = False
        #: Record where messages end: after each :meth:`feed`, :attr:`message_ends` lists
        #: ``(n, opcode)`` for every message completed in it, ``n`` being how many of the
        #: returned pieces belong to it and to the messages before it (an empty message adds
        #: no piece), ``opcode`` its first frame's (text or binary).
        self.track_messages = False
        self.message_ends: list[tuple[int, int]] = []

    @property
    def closed(self) -> bool:
        """True once a close frame was read."""
        return self._closed

    @property
    def message_opcode(self) -> int:
        """The first frame's opcode (text or binary) of the message read last or in progress:
        what the pieces after the last of :attr:`message_ends` belong to."""
        return self._message_opcode

    @property
    def between_messages(self) -> bool:
        """True when nothing of a frame or a fragmented message is pending: the next byte fed
        starts a new message (so :func:`whole_server_frames` may read it instead)."""
        return (
            self._remaining < 0
            and not self._partial_header
            and not self._in_message
            and not self._closed
        )

    def feed(
        self, data: bytes | bytearray | memoryview
    ) -> tuple[list[bytearray], list[ControlFrame]]:
        out: list[bytearray] = []
        controls: list[ControlFrame] = []
        if self.track_messages:
            self.message_ends = []
        if self._closed:
            return out, controls
        if self._partial_header:
            data = self._partial_header + bytes(data)
            self._partial_header = b""
        try:
            self._feed(memoryview(data), out, controls)
        except FrameError as exc:
            exc.pieces = out
            raise
        return out, controls

    def _feed(self, view: memoryview, out: list[bytearray], controls: list[ControlFrame]) -> None:
        end = len(view)
        pos = 0
        while pos < end:
            header = b""
            if self._remaining < 0:
                consumed, header = self._read_header(view, pos, end)
                if consumed == 0:
                    self._partial_header = bytes(view[pos:])
                    break
                pos += consumed
            take = min(self._remaining, end - pos)
            if self._opcode >= OP_CLOSE:
                control = self._control
                assert control is not None
                control += view[pos : pos + take]
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._remaining = -1
                    if self._masked:
                        self._unmask(self._mask, control)
                    frame = self._finish_control(bytes(control))
                    self._control = None
                    controls.append(frame)
                    if frame.opcode == OP_CLOSE:
                        self._closed = True
                        break
                continue
            # A data frame: its header (if it starts here) and the payload that is here, as one
            # piece unmasked in one pass. The mask is rotated so that it lines up after the header.
            prefix = 0 if self.payload_only else len(header)
            piece = bytearray(prefix)
            piece += view[pos : pos + take]
            if take and self._masked:
                self._unmask(_rotate(self._mask, self._phase - prefix), piece)
            if prefix:
                piece[:prefix] = header
            pos += take
            self._phase += take
            self._remaining -= take
            frame_done = self._remaining == 0
            if self._utf8 is not None:
                try:
                    self._utf8.decode(memoryview(piece)[prefix:], final=frame_done and self._fin)
                except UnicodeDecodeError:
                    raise FrameError(1007, "text message is not valid UTF-8") from None
            if piece:
                out.append(piece)
            if frame_done:
                self._remaining = -1
                if self._fin:
                    self._in_message = False
                    self._utf8 = None
                    if self.track_messages:
                        self.message_ends.append((len(out), self._message_opcode))

    def _read_header(self, view: memoryview, pos: int, end: int) -> tuple[int, bytes]:
        """Parse a frame header at ``pos``: (bytes consumed, server header for a data frame).

        (0, b"") when the header is not complete yet.
        """
        if end - pos < 2:
            return 0, b""
        first, second = view[pos], view[pos + 1]
        if first & 0x70:
            raise FrameError(1002, "reserved bits set (no extension was negotiated)")
        if bool(second & 0x80) != self._masked:
            raise FrameError(
                1002, "client frames must be masked" if self._masked else "server frame masked"
            )
        length = second & 0x7F
        size = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if self._masked else 0)
        if end - pos < size:
            return 0, b""
        fin = bool(first & 0x80)
        opcode = first & 0x0F
        if length == 126:
            length = int.from_bytes(view[pos + 2 : pos + 4], "big")
        elif length == 127:
            length = int.from_bytes(view[pos + 2 : pos + 10], "big")
            if length >> 63:
                raise FrameError(1002, "frame length has its most significant bit set")
        if self._masked:
            self._mask = bytes(view[pos + size - 4 : pos + size])
        self._phase = 0
        self._remaining = length
        self._opcode = opcode
        self._fin = fin
        if opcode >= OP_CLOSE:
            if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                raise FrameError(1002, f"reserved control opcode {opcode:#x}")
            if not fin:
                raise FrameError(1002, "fragmented control frame")
            if length > _MAX_CONTROL_PAYLOAD:
                raise FrameError(1002, "control frame payload longer than 125 bytes")
            self._control = bytearray()
            return size, b""
        if opcode == OP_CONTINUATION:
            if not self._in_message:
                raise FrameError(1002, "continuation frame without a message to continue")
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._in_message:
                raise FrameError(1002, "new message before the previous one ended")
            self._in_message = True
            self._message_size = 0
            self._message_opcode = opcode
            if opcode == OP_TEXT:
                # One decoder per reader, reset for each text message (the previous one ended
                # with a final decode or failed the reader): not one made per message.
                decoder = self._utf8_decoder
                if decoder is None:
                    decoder = self._utf8_decoder = codecs.getincrementaldecoder("utf-8")()
                else:
                    decoder.reset()
                self._utf8 = decoder
        else:
            raise FrameError(1002, f"reserved data opcode {opcode:#x}")
        self._message_size += length
        if self._message_size > self._max_message_size:
            raise FrameError(1009, "message too big")
        if self.payload_only:
            return size, b""  # no header goes out: none is built
        return size, server_frame_header(fin, opcode, length)

    def _finish_control(self, payload: bytes) -> ControlFrame:
        if self._opcode == OP_CLOSE:
            return _parse_close(payload)
        return ControlFrame(self._opcode, payload)
