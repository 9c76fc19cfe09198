"""The bridge's callback pump (bridge/pipe.py ``CallbackPump``) on a real socket, with a recording
stand-in for the stream's attached socket: the ways a connection can end half-way."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from hybridrelay.bridge.pipe import CallbackPump, PipeStats, SocketLeg
from hybridrelay.client import StreamSink
from tests.bridge.helpers import reset, wait_until_reset

pytestmark = [pytest.mark.timeout(20), pytest.mark.both_loops]


class RecordingSocket:
    """Stands in for the stream's :class:`SpliceSocket`: records what the pump asks of it."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.closes: list[int] = []
        self.calls: list[str] = []

    def attach(self, sink: StreamSink) -> None:
        self.calls.append("attach")

    def write_nowait(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data

    def close_nowait(self, code: int = 1000, reason: str = "") -> None:
        self.closes.append(code)

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def abort(self) -> None:
        self.calls.append("abort")


class RecordingStream:
    """What ``CallbackPump.run`` closes at the end."""

    id = "test-stream"
    close_code: int | None = None

    def __init__(self) -> None:
        self.closed_with: list[int] = []

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with.append(code)


@asynccontextmanager
async def leg_and_peer() -> AsyncIterator[tuple[SocketLeg, socket.socket]]:
    """A :class:`SocketLeg` connected to a plain socket (the "client") on loopback."""
    accepted: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    loop = asyncio.get_running_loop()

    async def accept() -> None:
        peer, _ = await loop.sock_accept(listener)
        accepted.set_result(peer)

    accepting = asyncio.create_task(accept())
    leg = SocketLeg()
    await loop.create_connection(lambda: leg, *listener.getsockname())
    await accepting
    peer = accepted.result()
    try:
        yield leg, peer
    finally:
        peer.close()
        listener.close()
        leg.abort()


async def test_peer_close_after_an_unseen_reset_ends_the_splice() -> None:
    """The stream's clean close arrives when the socket was reset but asyncio has not read the
    RST yet: the half-close (shutdown) fails, and the splice must end, not wait forever."""
    async with leg_and_peer() as (leg, peer):
        splice = CallbackPump(leg, PipeStats())
        socket_ = RecordingSocket()
        stream = RecordingStream()
        assert leg.transport is not None
        leg.transport.pause_reading()  # the reset stays unread, as under load
        reset(peer)
        assert leg.transport is not None
        await wait_until_reset(leg.transport.get_extra_info("socket"))
        running = asyncio.create_task(splice.run(stream, socket_, close_timeout=1.0))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        splice.on_close(1000, "")
        stats = await asyncio.wait_for(running, 5)
        assert stats.error is not None and "Error" in stats.error
        assert stream.closed_with == [1011]


async def test_socket_lost_after_its_eof_ends_the_splice() -> None:
    """The client half-closed (EOF went out as our close frame) and then vanished while the
    other direction still flowed: nothing more can reach it, so the connection is over."""
    async with leg_and_peer() as (leg, peer):
        splice = CallbackPump(leg, PipeStats())
        socket_ = RecordingSocket()
        stream = RecordingStream()
        running = asyncio.create_task(splice.run(stream, socket_, close_timeout=1.0))  # type: ignore[arg-type]
        peer.shutdown(socket.SHUT_WR)  # EOF
        for _ in range(200):
            if socket_.closes:
                break
            await asyncio.sleep(0.01)
        assert socket_.closes == [1000]
        splice.on_data(b"still flowing")
        reset(peer)
        # The next write hits the reset; asyncio reports the loss.
        for _ in range(50):
            splice.on_data(b"x" * 1024)
            await asyncio.sleep(0.01)
            if running.done():
                break
        stats = await asyncio.wait_for(running, 5)
        assert stats.error is not None and "lost" in stats.error
        assert stream.closed_with == [1011]


async def test_the_stream_is_read_again_when_the_splice_ends() -> None:
    """The socket could not take more (the stream was paused for it) and then failed: the
    stream's close handshake must still be read, so reading resumes before it is closed."""
    async with leg_and_peer() as (leg, peer):
        splice = CallbackPump(leg, PipeStats())
        socket_ = RecordingSocket()
        stream = RecordingStream()
        running = asyncio.create_task(splice.run(stream, socket_, close_timeout=1.0))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        splice.socket_full()
        assert socket_.calls[-1] == "pause_reading"
        reset(peer)
        stats = await asyncio.wait_for(running, 5)
        assert stats.error is not None
        assert socket_.calls.index("resume_reading") > socket_.calls.index("pause_reading")


def test_enotconn_is_what_linux_gives_for_shutdown_after_a_reset() -> None:
    """The premise of the first test, checked on this kernel with plain sockets."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    reset(peer)
    try:
        for _ in range(500):
            try:
                client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                break
        with pytest.raises(OSError) as info:
            client.shutdown(socket.SHUT_WR)
        assert info.value.errno == errno.ENOTCONN
    finally:
        client.close()
        server.close()
