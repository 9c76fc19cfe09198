"""The azbridge preamble exchange over a relayed stream: the ingress (``-L``) sends the
logical port name and mode and waits for the edge's answer; the edge (``-R``) reads it.

The bytes on the wire are :mod:`hybridrelay.protocol.azbridge`'s (a pure codec); this module
only moves them over a :class:`~hybridrelay.bridge.pipe.RelayStream`. The caller bounds each
exchange with its handshake timeout; they read exactly as many bytes as the preamble still
needs, so no payload is consumed by accident.
"""

from __future__ import annotations

from hybridrelay.bridge.pipe import RelayStream
from hybridrelay.exceptions import RelayError
from hybridrelay.protocol.azbridge import (
    Mode,
    Preamble,
    PreambleDecoder,
    Reply,
    ReplyDecoder,
    encode_preamble,
)

__all__ = ["PreambleRejectedError", "read_preamble", "send_preamble"]


class PreambleRejectedError(RelayError):
    """The edge answered the preamble with a reject code, or closed without answering."""

    def __init__(self, reply: Reply | None) -> None:
        why = "the edge closed without answering (unknown port name?)"
        super().__init__(why if reply is None else reply.describe())
        self.reply = reply


async def send_preamble(stream: RelayStream, port_name: str, mode: Mode) -> bytes:
    """Send the preamble and wait for the reply (ingress side).

    Returns:
        Bytes that came after the reply (the destination may speak first).

    Raises:
        PreambleRejectedError: the edge refused (or closed without a reply).
        ProtocolError: the reply is not one azbridge defines.
        RelayError: the stream failed.
    """
    await stream.write(encode_preamble(port_name, mode))
    decoder = ReplyDecoder()
    while True:
        data = await stream.read(decoder.needed)
        if not data:
            raise PreambleRejectedError(None)
        reply = decoder.feed(data)
        if reply is None:
            continue
        if reply is not Reply.accept(mode):
            raise PreambleRejectedError(reply if not reply.accepted else Reply.BAD_VERSION)
        return decoder.rest


async def read_preamble(stream: RelayStream) -> tuple[Preamble | Reply | None, bytes]:
    """Read a preamble (edge side).

    Returns:
        ``(Preamble, rest)``; ``(Reply.BAD_VERSION, b"")`` when the version is not 1.0 (send
        that reply, then close); ``(None, b"")`` when the sender closed first.

    Raises:
        ProtocolError: the port name is not UTF-8.
        RelayError: the stream failed.
    """
    decoder = PreambleDecoder()
    while True:
        data = await stream.read(decoder.needed)
        if not data:
            return None, b""
        result = decoder.feed(data)
        if result is not None:
            return result, decoder.rest
