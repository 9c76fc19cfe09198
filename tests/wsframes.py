"""A WebSocket client frame encoder written from RFC 6455 5.2 for the tests, independently of
the relay's own framing code (``hybridrelay.protocol.websocket``)."""

from __future__ import annotations

import os


def client_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bytes | None = None,
    masked: bool = True,
    rsv: int = 0,
) -> bytes:
    """One client frame: masked with ``mask`` (random if None) unless ``masked=False``."""
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = bytes((first, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, bit | 127)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4) if mask is None else mask
    stream = (key * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return head + key + body
