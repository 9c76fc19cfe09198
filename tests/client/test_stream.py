"""HybridConnectionStream over an in-memory MessageSocket (no network)."""

from __future__ import annotations

import asyncio

import pytest

from hybridrelay.client import HybridConnectionStream
from hybridrelay.client.stream import MAX_WRITE_MESSAGE
from hybridrelay.exceptions import RelayConnectionError, StreamClosedError
from hybridrelay.transport.base import MessageKind, StreamSink, WsMessage


class FakeSocket:
    """Messages to receive are queued by the test; sent messages are recorded."""

    def __init__(self, incoming: list[WsMessage] | None = None) -> None:
        self.incoming: asyncio.Queue[WsMessage] = asyncio.Queue()
        for message in incoming or []:
            self.incoming.put_nowait(message)
        self.sent: list[bytes | str] = []
        self.close_frames: list[tuple[int, str]] = []
        self._close_sent = False
        self._close_received = False
        self.aborted = False

    @property
    def subprotocol(self) -> str | None:
        return "proto"

    @property
    def close_sent(self) -> bool:
        return self._close_sent

    @property
    def close_received(self) -> bool:
        return self._close_received

    async def receive(self) -> WsMessage:
        if self._close_received:
            return WsMessage(MessageKind.CLOSE, code=1006)
        message = await self.incoming.get()
        if message.kind is MessageKind.CLOSE:
            self._close_received = True
        return message

    async def send(self, data: bytes | str) -> None:
        if self._close_sent:
            raise RelayConnectionError("closed")
        self.sent.append(data)

    async def send_close(self, code: int = 1000, reason: str = "") -> None:
        if not self._close_sent:
            self._close_sent = True
            self.close_frames.append((code, reason))

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        await self.send_close(code, reason)
        self._close_received = True

    def abort(self) -> None:
        self.aborted = True
        self._close_sent = self._close_received = True

    # The rest of a stream's socket: attaching is tested on real sockets
    # (tests/client/test_transport_frames.py); these tests never get here.

    async def send_fragment(self, data: bytes, *, first: bool, last: bool) -> None:
        raise AssertionError("not used by these tests")

    def attach(self, sink: StreamSink) -> None:
        raise AssertionError("not used by these tests")

    def write_nowait(self, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("not used by these tests")

    def close_nowait(self, code: int = 1000, reason: str = "") -> None:
        raise AssertionError("not used by these tests")

    def pause_reading(self) -> None:
        raise AssertionError("not used by these tests")

    def resume_reading(self) -> None:
        raise AssertionError("not used by these tests")


def binary(data: bytes) -> WsMessage:
    return WsMessage(MessageKind.BINARY, data)


def close(code: int = 1000, reason: str = "") -> WsMessage:
    return WsMessage(MessageKind.CLOSE, code=code, reason=reason)


async def test_read_spans_messages_and_keeps_leftover() -> None:
    socket = FakeSocket(
        [binary(b"hello "), WsMessage(MessageKind.TEXT, "wörld"), binary(b""), close(1001, "bye")]
    )
    stream = HybridConnectionStream(socket, id="c1")
    assert stream.subprotocol == "proto"
    assert await stream.read(3) == b"hel"
    assert await stream.read(100) == b"lo "
    assert await stream.read(2) == b"w" + "ö".encode()[:1]
    assert await stream.read() == "ö".encode()[1:] + b"rld"
    assert not stream.at_eof
    assert await stream.read() == b""  # the empty message was skipped, not taken for EOF
    assert (stream.close_code, stream.close_reason) == (1001, "bye")
    assert await stream.read() == b""
    assert stream.at_eof


async def test_receive_message_returns_leftover_first() -> None:
    socket = FakeSocket([binary(b"abcdef"), WsMessage(MessageKind.TEXT, "t"), close()])
    stream = HybridConnectionStream(socket, id="c1")
    assert await stream.read(2) == b"ab"
    assert await stream.receive_message() == b"cdef"
    assert await stream.receive_message() == "t"
    assert await stream.receive_message() is None


async def test_write_splits_into_64k_messages() -> None:
    socket = FakeSocket()
    stream = HybridConnectionStream(socket, id="c1")
    data = bytes(range(256)) * 1000  # 256 000 bytes
    await stream.write(data)
    await stream.write(b"")
    assert all(isinstance(m, bytes) and len(m) <= MAX_WRITE_MESSAGE for m in socket.sent)
    assert len(socket.sent) == 4
    assert b"".join(m for m in socket.sent if isinstance(m, bytes)) == data
    await stream.send_message("text")
    assert socket.sent[-1] == "text"


async def test_write_eof_then_write_is_refused_but_read_goes_on() -> None:
    socket = FakeSocket([binary(b"late data"), close()])
    stream = HybridConnectionStream(socket, id="c1")
    await stream.write_eof()
    await stream.write_eof()
    assert socket.close_frames == [(1000, "")]
    assert stream.eof_sent
    with pytest.raises(StreamClosedError):
        await stream.write(b"x")
    assert await stream.read() == b"late data"
    assert await stream.read() == b""


async def test_lost_connection_is_an_error() -> None:
    stream = HybridConnectionStream(FakeSocket([close(1006)]), id="c1")
    with pytest.raises(RelayConnectionError):
        await stream.read()


async def test_aclose_waits_for_peer_close_and_then_refuses_use() -> None:
    socket = FakeSocket([binary(b"discarded"), close(1000)])
    stream = HybridConnectionStream(socket, id="c1")
    await stream.aclose(4000, "done")
    assert socket.close_frames == [(4000, "done")]
    assert socket.close_received and not socket.aborted
    for call in (stream.read(), stream.write(b"x"), stream.receive_message()):
        with pytest.raises(StreamClosedError):
            await call
    await stream.aclose()  # idempotent


async def test_aclose_aborts_when_peer_never_closes() -> None:
    socket = FakeSocket()
    stream = HybridConnectionStream(socket, id="c1")
    await stream._close(1000, "", 0.05)
    assert socket.aborted


async def test_aclose_while_another_task_reads() -> None:
    socket = FakeSocket()
    stream = HybridConnectionStream(socket, id="c1")
    reader = asyncio.create_task(stream.read())
    await asyncio.sleep(0)
    closer = asyncio.create_task(stream.aclose())
    await asyncio.sleep(0)
    socket.incoming.put_nowait(close())
    async with asyncio.timeout(5):
        await closer
        with pytest.raises(StreamClosedError):
            await reader
