"""The azbridge connection preamble and the UDP datagram framing, as pure codecs.

Wire format (azure-relay-bridge ``TcpLocalForwardBridge.cs`` / ``RemoteForwardBridge.cs``):

* The sender (ingress) writes ``[major=1, minor=0, mode, len]`` followed by ``len`` bytes of
  the UTF-8 logical port name. ``mode`` is 0 for a byte stream, 1 for datagrams.
* The listener (edge) answers ``[1, 0, mode]`` to accept, then the connection carries data.
  It answers ``[0, 0, 0]`` for a version it does not speak, ``[0, 0, 1]`` when the port is a
  datagram port but the sender asked for a stream, and ``[0, 0, 255]`` when the port is a
  stream port but the sender asked for datagrams; then it closes. azbridge closes without
  any answer when the port name is unknown, and so do we.
* Datagram mode frames every datagram as a 2-byte big-endian length and the payload.

The decoders are fed bytes as they arrive (in any split) and hand back what follows the
preamble untouched, so no byte of the payload is lost or reordered. They never read a clock
or a socket and hold at most one frame.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from hybridrelay.exceptions import ProtocolError

__all__ = [
    "MAX_DATAGRAM",
    "DatagramDecoder",
    "Mode",
    "Preamble",
    "PreambleDecoder",
    "Reply",
    "ReplyDecoder",
    "encode_datagram",
    "encode_preamble",
    "encode_reply",
]

VERSION_MAJOR = 1
VERSION_MINOR = 0
#: Largest payload the 2-byte length of a datagram frame can carry.
MAX_DATAGRAM = 0xFFFF


class Mode(enum.IntEnum):
    """The third preamble byte."""

    STREAM = 0
    DATAGRAM = 1


class Reply(enum.Enum):
    """The listener's three-byte answer to a preamble."""

    ACCEPT_STREAM = b"\x01\x00\x00"
    ACCEPT_DATAGRAM = b"\x01\x00\x01"
    BAD_VERSION = b"\x00\x00\x00"
    #: The port is a datagram port; the sender asked for a stream.
    NOT_A_STREAM_PORT = b"\x00\x00\x01"
    #: The port is a stream port; the sender asked for datagrams.
    NOT_A_DATAGRAM_PORT = b"\x00\x00\xff"

    @classmethod
    def accept(cls, mode: Mode) -> Reply:
        return cls.ACCEPT_STREAM if mode is Mode.STREAM else cls.ACCEPT_DATAGRAM

    @property
    def accepted(self) -> bool:
        return self in (Reply.ACCEPT_STREAM, Reply.ACCEPT_DATAGRAM)

    def describe(self) -> str:
        return {
            Reply.ACCEPT_STREAM: "accepted (stream)",
            Reply.ACCEPT_DATAGRAM: "accepted (datagram)",
            Reply.BAD_VERSION: "the edge does not speak preamble version 1.0",
            Reply.NOT_A_STREAM_PORT: "the port is a datagram (UDP) port at the edge",
            Reply.NOT_A_DATAGRAM_PORT: "the port is a stream port at the edge",
        }[self]


@dataclass(frozen=True)
class Preamble:
    """A decoded preamble."""

    mode: Mode
    port_name: str


def encode_preamble(port_name: str, mode: Mode) -> bytes:
    """``[1, 0, mode, len] + name``.

    Raises:
        ValueError: the name is empty or longer than 255 bytes of UTF-8.
    """
    name = port_name.encode("utf-8")
    if not 1 <= len(name) <= 255:
        raise ValueError("a port name is 1-255 bytes of UTF-8")
    return bytes((VERSION_MAJOR, VERSION_MINOR, int(mode), len(name))) + name


def encode_reply(reply: Reply) -> bytes:
    return reply.value


class PreambleDecoder:
    """Incremental decoder of a preamble, for the edge.

    Feed bytes with :meth:`feed` until it returns a result. The result is either a
    :class:`Preamble` or a :class:`Reply` the edge must send before closing (a version it does
    not speak). :attr:`rest` then holds the bytes after the preamble.

    Raises:
        ProtocolError: the port name is not valid UTF-8, or bytes are fed after the end.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._done = False
        self.rest = b""

    @property
    def needed(self) -> int:
        """How many more bytes complete the preamble (at least 1 until it is complete)."""
        if self._done:
            return 0
        if len(self._buf) < 4:
            return 4 - len(self._buf)
        return 4 + self._buf[3] - len(self._buf)

    def feed(self, data: bytes) -> Preamble | Reply | None:
        if self._done:
            raise ProtocolError("preamble already decoded")
        self._buf += data
        if len(self._buf) >= 3 and not (
            self._buf[0] == VERSION_MAJOR
            and self._buf[1] == VERSION_MINOR
            and self._buf[2] in (Mode.STREAM, Mode.DATAGRAM)
        ):
            self._done = True
            return Reply.BAD_VERSION
        if len(self._buf) < 4 or len(self._buf) < 4 + self._buf[3]:
            return None
        end = 4 + self._buf[3]
        mode = Mode(self._buf[2])
        raw_name, self.rest = bytes(self._buf[4:end]), bytes(self._buf[end:])
        self._done = True
        self._buf.clear()
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("the preamble's port name is not valid UTF-8") from None
        return Preamble(mode, name)


class ReplyDecoder:
    """Incremental decoder of the three-byte reply, for the ingress.

    Raises:
        ProtocolError: the three bytes are not a reply azbridge defines.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.rest = b""

    @property
    def needed(self) -> int:
        return max(0, 3 - len(self._buf))

    def feed(self, data: bytes) -> Reply | None:
        if self.needed == 0:
            raise ProtocolError("reply already decoded")
        self._buf += data
        if len(self._buf) < 3:
            return None
        raw, self.rest = bytes(self._buf[:3]), bytes(self._buf[3:])
        try:
            return Reply(raw)
        except ValueError:
            raise ProtocolError(f"unknown preamble reply {raw.hex()}") from None


def encode_datagram(payload: bytes) -> bytes:
    """Frame one datagram: 2-byte big-endian length, then the payload.

    Raises:
        ValueError: the payload is larger than 65535 bytes.
    """
    if len(payload) > MAX_DATAGRAM:
        raise ValueError(f"a datagram of {len(payload)} bytes does not fit a 2-byte length")
    return len(payload).to_bytes(2, "big") + payload


class DatagramDecoder:
    """Incremental decoder of length-prefixed datagrams.

    It keeps at most one incomplete frame (65537 bytes) plus the bytes of the last feed.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held of an incomplete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= 2:
            size = (buf[pos] << 8) | buf[pos + 1]
            if len(buf) - pos - 2 < size:
                break
            out.append(bytes(buf[pos + 2 : pos + 2 + size]))
            pos += 2 + size
        if pos:
            del buf[:pos]
        return out
