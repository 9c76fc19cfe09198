"""transport/http_leg.py: the relay's HTTP rendezvous read frame by frame (issue 14): text
whole, binary bodies in parts as they arrive, reading paused while too much waits, pings,
close; and FrameSocket.stream_binary, the SDK's side of the same."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from aiohttp._websocket.helpers import websocket_mask

from hybridrelay.protocol.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    close_payload,
    masked_frame,
    server_frame,
)
from hybridrelay.transport.base import MessageKind
from hybridrelay.transport.frames_ws import FrameSocket
from hybridrelay.transport.http_leg import RECEIVE_HIGH, MessageLeg
from hybridrelay.transport.receive_buffer import receive_buffer


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.paused = True
        self.closed = False

    def write(self, data: Any) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return bytes(masked_frame(opcode, payload, os.urandom(4), websocket_mask, fin=fin))


def feed(leg: asyncio.BufferedProtocol, data: bytes) -> None:
    """``data`` as reads of 7,000 bytes (splitting frames anywhere) into the shared buffer."""
    for start in range(0, len(data), 7000):
        piece = data[start : start + 7000]
        receive_buffer()[: len(piece)] = piece
        leg.buffer_updated(len(piece))


@pytest.mark.timeout(10)
async def test_text_whole_binary_in_parts_and_close() -> None:
    transport = FakeTransport()
    leg = MessageLeg(transport, max_text_size=1024)
    leg.start()
    assert not transport.paused
    body = os.urandom(50_000)
    wire = (
        frame(OP_TEXT, b'{"resp', fin=False)
        + frame(OP_CONTINUATION, b'onse":1}')
        + frame(OP_BINARY, body[:20_000], fin=False)
        + frame(OP_PING, b"hi")
        + frame(OP_CONTINUATION, body[20_000:], fin=True)
        + frame(OP_BINARY, b"")
        + frame(OP_CLOSE, close_payload(1000, "done"))
    )
    feed(leg, wire)
    text = await leg.receive()
    assert (text.kind, text.data) == (MessageKind.TEXT, '{"response":1}')
    parts = []
    while True:
        message = await leg.receive()
        assert message.kind is MessageKind.BINARY
        parts.append(message)
        if not message.more:
            break
    assert len(parts) > 1  # it came in parts, as it arrived
    assert b"".join(p.data for p in parts if isinstance(p.data, bytes)) == body
    empty = await leg.receive()
    assert (empty.kind, empty.data, empty.more) == (MessageKind.BINARY, b"", False)
    closed = await leg.receive()
    assert (closed.kind, closed.code, closed.reason) == (MessageKind.CLOSE, 1000, "done")
    assert bytes(transport.written).startswith(server_frame(OP_PONG, b"hi"))  # ping answered
    leg.close_nowait(1000)
    assert transport.closed  # both close frames went by


@pytest.mark.timeout(10)
async def test_reading_pauses_while_too_much_waits() -> None:
    transport = FakeTransport()
    leg = MessageLeg(transport, max_text_size=1024)
    leg.start()
    chunk = os.urandom(64 * 1024)
    wire = frame(OP_BINARY, chunk, fin=False)
    for _ in range(2 * RECEIVE_HIGH // len(chunk)):
        wire += frame(OP_CONTINUATION, chunk, fin=False)
    feed(leg, wire)
    assert transport.paused  # nobody took the parts: the socket is not read further
    taken = 0
    while transport.paused:
        message = await leg.receive()
        taken += len(message.data)
    assert taken > RECEIVE_HIGH  # resumed once the queue went down


@pytest.mark.timeout(10)
async def test_a_text_message_over_its_limit_fails_the_leg() -> None:
    transport = FakeTransport()
    leg = MessageLeg(transport, max_text_size=10)
    leg.start()
    feed(leg, frame(OP_TEXT, b"x" * 11))
    message = await leg.receive()
    assert (message.kind, message.code) == (MessageKind.CLOSE, 1009)
    assert transport.closed


@pytest.mark.timeout(10)
async def test_frame_socket_stream_binary_delivers_parts() -> None:
    socket = FrameSocket(2**62)
    transport = FakeTransport()
    socket.connection_made(transport)
    socket.open(None)
    socket.stream_binary(100)
    body = os.urandom(40_000)
    wire = (
        server_frame(OP_TEXT, b'{"request":{}}')
        + server_frame(OP_BINARY, body[:30_000], fin=False)
        + server_frame(OP_CONTINUATION, body[30_000:])
    )
    feed(socket, wire)
    first = await socket.receive()
    assert (first.kind, first.data) == (MessageKind.TEXT, '{"request":{}}')
    parts = []
    while True:
        message = await socket.receive()
        parts.append(message)
        if not message.more:
            break
    assert len(parts) > 1
    assert b"".join(p.data for p in parts if isinstance(p.data, bytes)) == body
