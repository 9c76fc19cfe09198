"""Our own client WebSocket (transport/frames_ws.py, D11), the SDK's only one: what the
contract tests (tests/client/test_client_sockets.py: the SDK's end-to-end scenarios, and the
socket against a small aiohttp server) do not reach.

Here: the SDK's splice (``HybridConnectionStream.attach``) and that the connector gives every
connection to frames; splice mode (``attach``/``write_nowait``/``close_nowait``/flow control);
keep-alive pings; a proxy's refusal; and the handshake it does by hand and the frames it reads
and writes itself, against a raw asyncio server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket as socket_module
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest
from aiohttp import web

from hybridrelay.client._connect import WebSocketConnector
from hybridrelay.exceptions import (
    RelayConnectionError,
    RelayHttpError,
    RelayTimeoutError,
)
from hybridrelay.protocol.websocket import (
    MAX_RESPONSE_HEAD,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    accept_key,
    close_payload,
    server_frame,
)
from hybridrelay.transport import frames_ws
from hybridrelay.transport.aiohttp_ws import AiohttpMessageSocket
from hybridrelay.transport.base import (
    FragmentSocket,
    MessageKind,
    SpliceSocket,
    WsMessage,
)
from hybridrelay.transport.entropy import BATCH, EntropyPool
from tests.client.helpers import accept_one, make_client, open_listener
from tests.client.ws_peers import (
    KIB,
    MIB,
    SECRET,
    SECRET_QUERY,
    echo,
    exception_text,
    lost_event,
    record_connects,
    refused_port,
    ws_server,
)
from tests.client.ws_peers import connect_frames as connect
from tests.conftest import Relay, eventually
from tests.wsframes import client_frame

pytestmark = [pytest.mark.timeout(60), pytest.mark.both_loops]

# -- the SDK with frames selected -------------------------------------------------------------


@pytest.fixture
def frames_opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Select frames for this test; the list collects every URL frames connected to."""
    return record_connects(monkeypatch, "frames", frames_ws)


async def test_sdk_stream_attach_splices_the_frames_socket(
    relay: Relay, frames_opened: list[str]
) -> None:
    """``HybridConnectionStream.attach`` hands over the frames socket: bytes left by a partial
    read first, then the peer's data and close by callback; writes go out by write_nowait."""
    async with asyncio.timeout(20):
        async with open_listener(relay) as listener, make_client(relay) as client:
            sender_task = asyncio.create_task(client.create_connection())
            stream = await accept_one(listener)
            sender = await sender_task
            await sender.write(b"hello")
            assert await stream.read(2) == b"he"
            sink = RecordingSink()
            socket = stream.attach(sink)
            assert isinstance(socket, frames_ws.FrameSocket)
            assert sink.events == [("data", b"llo")]
            await sender.write(b"world")
            await sender.write_eof()
            await sink.closed.wait()
            assert sink.data() == b"lloworld"
            assert sink.close_events() == [(1000, "")]
            socket.write_nowait(b"reply")
            socket.close_nowait()
            assert await sender.read() == b"reply"
            assert await sender.read() == b""
            assert sender.close_code == 1000
            await asyncio.gather(sender.aclose(), stream.aclose())
    assert len(frames_opened) == 3  # control channel, sender, rendezvous


async def test_connector_gives_every_connection_to_frames(
    frames_opened: list[str],
) -> None:
    """Control channels (keep-alive) and proxied connections are frames sockets too."""
    async with asyncio.timeout(10), ws_server(echo) as url:
        connector = WebSocketConnector(ssl_context=ssl.create_default_context(), proxy=None)
        try:
            own = await connector.connect(url, connect_timeout=5)
            assert isinstance(own, frames_ws.FrameSocket)
            await own.aclose()
            control = await connector.connect(url, connect_timeout=5, keepalive=30)
            assert isinstance(control, frames_ws.FrameSocket)
            assert control._keepalive == 30
            await control.aclose()
        finally:
            await connector.aclose()
        with refused_port() as closed_port:
            proxied = WebSocketConnector(
                ssl_context=ssl.create_default_context(), proxy=f"http://127.0.0.1:{closed_port}"
            )
            try:
                with pytest.raises(RelayConnectionError):
                    await proxied.connect(url, connect_timeout=5)
            finally:
                await proxied.aclose()
    assert frames_opened == [url, url, url]


def test_frame_socket_implements_the_interfaces() -> None:
    socket = frames_ws.FrameSocket(1024)
    assert isinstance(socket, SpliceSocket)
    assert isinstance(socket, FragmentSocket)


# -- splice mode ------------------------------------------------------------------------------


class RecordingSink:
    """A :class:`StreamSink` that records every call in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.closed = asyncio.Event()
        self.paused = asyncio.Event()
        self.resumed = asyncio.Event()
        self.received = 0
        self.data_event = asyncio.Event()
        #: False between on_pause and on_resume.
        self.writable = True

    def on_data(self, data: bytes | bytearray) -> None:
        assert isinstance(data, bytes | bytearray)
        assert not self.closed.is_set(), "on_data after on_close"
        self.events.append(("data", bytes(data)))
        self.received += len(data)
        self.data_event.set()

    def on_close(self, code: int, reason: str) -> None:
        self.events.append(("close", (code, reason)))
        self.closed.set()

    def on_pause(self) -> None:
        self.events.append(("pause", None))
        self.writable = False
        self.resumed.clear()
        self.paused.set()

    def on_resume(self) -> None:
        self.events.append(("resume", None))
        self.writable = True
        self.resumed.set()

    def data(self) -> bytes:
        return b"".join(value for kind, value in self.events if kind == "data")

    def close_events(self) -> list[tuple[int, str]]:
        return [value for kind, value in self.events if kind == "close"]

    async def wait_for_bytes(self, size: int) -> None:
        while self.received < size:
            self.data_event.clear()
            await self.data_event.wait()


async def test_attach_delivers_queued_messages_then_live_data_then_close() -> None:
    go = asyncio.Event()
    got: list[WsMessage] = []
    peer_close: list[WsMessage] = []
    big = os.urandom(300 * KIB)
    upload = os.urandom(2 * frames_ws.MAX_SPLICE_MESSAGE + 200 * KIB)  # three messages

    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        await socket.send(b"zero")
        await socket.send(b"one")
        await socket.send("two")
        await socket.send_fragment(b"par", first=True, last=False)
        await go.wait()
        await socket.send_fragment(b"tial", first=False, last=True)
        await socket.send(big)
        while (message := await socket.receive()).kind is not MessageKind.CLOSE:
            got.append(message)
        peer_close.append(message)
        await socket.send_close(4001, "bye")

    async with asyncio.timeout(20), ws_server(handler) as url:
        socket = await connect(url)
        lost = lost_event(socket)
        assert (await socket.receive()).data == b"zero"  # message mode first
        # Two whole messages queued and the first part of a third received.
        await eventually(lambda: len(socket._messages) == 2 and bool(socket._parts))
        sink = RecordingSink()
        socket.attach(sink)
        assert sink.events == [("data", b"one"), ("data", b"two"), ("data", b"par")]
        assert socket._queued == 0 and not socket._messages and not socket._parts
        socket.write_nowait(upload)
        go.set()
        await sink.wait_for_bytes(len(b"onetwopartial") + len(big))
        socket.close_nowait(4002, "done writing")
        assert socket.close_sent and not socket.close_received
        await sink.closed.wait()
        await lost.wait()  # both close frames seen: the connection was dropped
        assert sink.data() == b"onetwopartial" + big
        assert sink.close_events() == [(4001, "bye")]
        assert sink.events[-1] == ("close", (4001, "bye"))
        assert socket.close_received
        # receive() (not used in splice mode, but harmless) reports the close.
        message = await socket.receive()
        assert (message.kind, message.code, message.reason) == (MessageKind.CLOSE, 4001, "bye")
        write_nowait_after_close(socket)
    # write_nowait sent binary messages of at most MAX_SPLICE_MESSAGE that add up to the data.
    assert all(m.kind is MessageKind.BINARY for m in got)
    assert all(0 < len(m.data) <= frames_ws.MAX_SPLICE_MESSAGE for m in got)
    assert len(got) == -(-len(upload) // frames_ws.MAX_SPLICE_MESSAGE)
    assert b"".join(bytes(m.data) for m in got) == upload
    assert [(m.code, m.reason) for m in peer_close] == [(4002, "done writing")]
    assert sink.close_events() == [(4001, "bye")]  # not again at connection_lost


def write_nowait_after_close(socket: frames_ws.FrameSocket) -> None:
    """After our close frame write_nowait/close_nowait are quiet no-ops."""
    socket.write_nowait(b"late")
    socket.close_nowait(1000)


async def test_attach_after_the_peer_closed_reports_the_close_once() -> None:
    done = asyncio.Event()
    peer_got: list[WsMessage] = []

    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        await socket.send(b"data")
        await socket.send_close(1000, "server half-closed")
        while (message := await socket.receive()).kind is not MessageKind.CLOSE:
            peer_got.append(message)
        peer_got.append(message)
        done.set()

    async with asyncio.timeout(10), ws_server(handler) as url:
        socket = await connect(url)
        lost = lost_event(socket)
        await eventually(lambda: socket.close_received)
        sink = RecordingSink()
        socket.attach(sink)
        assert sink.events == [("data", b"data"), ("close", (1000, "server half-closed"))]
        # Half-closed: we may still send.
        socket.write_nowait(b"reply")
        socket.close_nowait()
        await lost.wait()
        await done.wait()
        assert sink.close_events() == [(1000, "server half-closed")]
    assert peer_got == [
        WsMessage(MessageKind.BINARY, b"reply"),
        WsMessage(MessageKind.CLOSE, code=1000),
    ]


async def test_attach_with_a_partial_message_and_the_peer_close_keeps_close_last() -> None:
    release = asyncio.Event()

    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        await socket.send_fragment(b"par", first=True, last=False)
        await socket.send_close(1000)  # control frames may come between fragments
        await socket.receive()
        await release.wait()

    async with asyncio.timeout(10), ws_server(handler) as url:
        socket = await connect(url)
        await eventually(lambda: socket.close_received)
        sink = RecordingSink()
        try:
            socket.attach(sink)
        finally:
            socket.close_nowait()
            release.set()
        # The close comes last (the part before it, or nothing).
        assert sink.events[-1] == ("close", (1000, ""))


async def test_splice_flow_control_pauses_and_resumes_the_sink() -> None:
    """A pump that writes with write_nowait while the sink is not paused: it stalls while the
    server does not read (on_pause, a bounded write buffer), and goes on after on_resume."""
    release = asyncio.Event()
    received = bytearray()
    sizes: list[int] = []

    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        await release.wait()
        while (message := await socket.receive()).kind is not MessageKind.CLOSE:
            assert isinstance(message.data, bytes)
            received.extend(message.data)
            sizes.append(len(message.data))
        await socket.send_close(1000)

    chunk = os.urandom(100 * KIB)
    target = 320 * len(chunk)  # 31.25 MiB
    written = 0
    async with asyncio.timeout(30), ws_server(handler) as url:
        socket = await connect(url)
        lost = lost_event(socket)
        sink = RecordingSink()
        socket.attach(sink)

        async def pump() -> None:
            nonlocal written
            while written < target:
                while not sink.writable:
                    await sink.resumed.wait()
                socket.write_nowait(chunk)  # does not wait: the sink says when to stop
                written += len(chunk)

        task = asyncio.create_task(pump())
        await eventually(lambda: not sink.writable)
        await asyncio.sleep(0.5)  # nothing to wait for: the point is that nothing happens
        assert not sink.writable and socket._write_paused
        assert not task.done(), "the sink was never paused"
        assert written < 16 * MIB
        assert socket._transport is not None
        assert socket._transport.get_write_buffer_size() < 16 * MIB
        release.set()
        await task
        socket.close_nowait()
        await sink.closed.wait()
        await lost.wait()
    flow = [kind for kind, _ in sink.events if kind in ("pause", "resume")]
    assert flow[:2] == ["pause", "resume"]
    assert all(a != b for a, b in zip(flow, flow[1:], strict=False)), "pause/resume alternate"
    assert len(received) == written == target
    assert all(size <= frames_ws.MAX_SPLICE_MESSAGE for size in sizes)
    assert bytes(received) == chunk * (written // len(chunk))
    assert sink.close_events() == [(1000, "")]


async def test_splice_connection_lost_is_on_close_1006() -> None:
    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        await socket.send(b"before")
        await socket.receive()  # the client's b"go"
        socket.abort()

    async with asyncio.timeout(10), ws_server(handler) as url:
        socket = await connect(url)
        sink = RecordingSink()
        await eventually(lambda: bool(socket._messages))
        socket.attach(sink)
        socket.write_nowait(b"go")
        await sink.closed.wait()
        assert sink.events == [("data", b"before"), ("close", (1006, ""))]
        socket.write_nowait(b"after the loss")  # a quiet no-op: the pump stops on its own
        socket.close_nowait()


async def test_splice_pause_and_resume_reading() -> None:
    proceed = asyncio.Event()

    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        await socket.send(b"a")
        await proceed.wait()
        await socket.send(b"b")
        await socket.receive()

    async with asyncio.timeout(10), ws_server(handler) as url:
        socket = await connect(url)
        sink = RecordingSink()
        socket.attach(sink)
        await sink.wait_for_bytes(1)
        socket.pause_reading()
        proceed.set()
        await asyncio.sleep(0.3)  # nothing to wait for: the point is that nothing happens
        assert sink.data() == b"a"
        socket.resume_reading()
        await sink.wait_for_bytes(2)
        assert sink.data() == b"ab"
        await socket.aclose()


# -- against a raw server: the handshake and the frames we read and write ---------------------

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: RawHandler) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A plain TCP server on 127.0.0.1 running ``handler`` for each connection; yields its
    ``ws://`` URL and an event set when a handler has finished (its assertions are re-raised
    at the exit)."""
    finished = asyncio.Event()
    errors: list[BaseException] = []
    tasks: set[asyncio.Task[Any]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except Exception as exc:
            errors.append(exc)
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
            finished.set()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}", finished
    finally:
        server.close()
        pending = [task for task in tasks if not task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await server.wait_closed()
    if errors:
        raise errors[0]


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return request_line, headers


def response_101(key: str, *extra: str) -> bytes:
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(key)}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def accept_upgrade(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, after: bytes = b""
) -> dict[str, str]:
    """Read the upgrade request, answer 101 (and ``after`` in the same write)."""
    _, headers = await read_request(reader)
    writer.write(response_101(headers["sec-websocket-key"]) + after)
    await writer.drain()
    return headers


async def read_client_frame(reader: asyncio.StreamReader) -> tuple[bool, int, bytes, bytes]:
    """One frame from the client, decoded from RFC 6455 5.2 here: (fin, opcode, payload, key).
    Asserts what a client frame must be: masked, no reserved bits, minimal length encoding."""
    first, second = await reader.readexactly(2)
    assert second & 0x80, "a client frame must be masked"
    assert not first & 0x70, "reserved bits set"
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
        assert length >= 126, "length not minimally encoded"
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
        assert length >= 65536, "length not minimally encoded"
    key = await reader.readexactly(4)
    body = await reader.readexactly(length)
    stream = (key * (length // 4 + 1))[:length]
    payload = (int.from_bytes(body, "big") ^ int.from_bytes(stream, "big")).to_bytes(length, "big")
    return bool(first & 0x80), first & 0x0F, payload, key


async def until_eof(reader: asyncio.StreamReader) -> None:
    """Read until the client closed the connection (a reset counts as closed)."""
    with suppress(ConnectionError):
        while await reader.read(65536):
            pass


def close_code_of(payload: bytes) -> tuple[int, str]:
    return int.from_bytes(payload[:2], "big"), payload[2:].decode("utf-8")


async def test_client_frames_are_masked_and_well_formed() -> None:
    sizes = [0, 1, 3, 4, 5, 125, 126, 127, 65535, 65536, 70001]
    frames: list[tuple[bool, int, bytes, bytes]] = []
    payloads = [os.urandom(size) for size in sizes]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_upgrade(reader, writer)
        for _ in range(len(sizes) + 4):
            frames.append(await read_client_frame(reader))
        writer.write(server_frame(OP_CLOSE, close_payload(1000)))
        await until_eof(reader)

    async with asyncio.timeout(10), raw_server(handler) as (url, finished):
        socket = await connect(url)
        for payload in payloads:
            await socket.send(payload)
        await socket.send("tëxt")
        await socket.send_fragment(b"f1", first=True, last=False)
        await socket.send_fragment(b"f2", first=False, last=True)
        await socket.send_close(4321, "bye ✓")
        assert (await socket.receive()).code == 1000
        await finished.wait()
    binary = frames[: len(sizes)]
    assert [(fin, op) for fin, op, _, _ in binary] == [(True, OP_BINARY)] * len(sizes)
    assert [payload for _, _, payload, _ in binary] == payloads
    assert len({key for _, _, _, key in frames}) == len(frames), "a fresh key per frame"
    rest = [(fin, op, payload) for fin, op, payload, _ in frames[len(sizes) :]]
    assert rest == [
        (True, OP_TEXT, "tëxt".encode()),
        (False, OP_BINARY, b"f1"),
        (True, OP_CONTINUATION, b"f2"),
        (True, OP_CLOSE, close_payload(4321, "bye ✓")),
    ]


@pytest.mark.parametrize("payload", [b"", b"are you there?", bytes(range(125))])
async def test_ping_is_answered_with_a_pong_of_the_same_payload(payload: bytes) -> None:
    frames: list[tuple[bool, int, bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_upgrade(reader, writer)
        writer.write(server_frame(OP_PING, payload))
        frames.append(await read_client_frame(reader))
        # A ping between two fragments of a message is answered too, and does not break it.
        writer.write(server_frame(OP_BINARY, b"after", fin=False))
        writer.write(server_frame(OP_PING, b"mid"))
        writer.write(server_frame(OP_CONTINUATION, b" ping"))
        frames.append(await read_client_frame(reader))
        writer.write(server_frame(OP_CLOSE, close_payload(1000, "bye")))
        frames.append(await read_client_frame(reader))
        await until_eof(reader)

    async with asyncio.timeout(10), raw_server(handler) as (url, finished):
        socket = await connect(url)
        assert (await socket.receive()) == WsMessage(MessageKind.BINARY, b"after ping")
        message = await socket.receive()
        assert (message.kind, message.code, message.reason) == (MessageKind.CLOSE, 1000, "bye")
        await socket.send_close(1000)
        await finished.wait()
    assert [(fin, op, data) for fin, op, data, _ in frames] == [
        (True, OP_PONG, payload),
        (True, OP_PONG, b"mid"),
        (True, OP_CLOSE, close_payload(1000)),
    ]


@pytest.mark.parametrize(
    ("frame", "wire_code"),
    [
        (client_frame(OP_BINARY, b"masked!"), 1002),  # a server must not mask
        (client_frame(OP_BINARY, b"rsv", masked=False, rsv=0x40), 1002),
        (server_frame(OP_TEXT, b"\xff\xfe"), 1007),
        (server_frame(OP_PING, b"x", fin=False), 1002),
        (server_frame(OP_CONTINUATION, b"x"), 1002),
        (server_frame(0x3, b"x"), 1002),
        (server_frame(OP_PING, b"p" * 126), 1002),
        (server_frame(OP_CLOSE, struct.pack("!H", 1005)), 1002),
    ],
    ids=[
        "masked",
        "rsv",
        "bad-utf8",
        "fragmented-ping",
        "bare-continuation",
        "reserved-opcode",
        "long-ping",
        "bad-close-code",
    ],
)
async def test_protocol_violation_by_the_server(frame: bytes, wire_code: int) -> None:
    """What came before the violation is delivered; then we send a close frame with the
    violation's code, report a lost connection (1006) and drop the connection."""
    frames: list[tuple[bool, int, bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_upgrade(reader, writer)
        writer.write(server_frame(OP_BINARY, b"good") + frame)  # in one write
        frames.append(await read_client_frame(reader))
        await until_eof(reader)

    async with asyncio.timeout(10), raw_server(handler) as (url, finished):
        socket = await connect(url)
        lost = lost_event(socket)
        assert (await socket.receive()) == WsMessage(MessageKind.BINARY, b"good")
        message = await socket.receive()
        assert (message.kind, message.code) == (MessageKind.CLOSE, 1006)
        assert socket.close_sent and socket.close_received
        with pytest.raises(RelayConnectionError):
            await socket.send(b"x")
        await lost.wait()
        await finished.wait()
    [(fin, opcode, payload, _)] = frames
    assert (fin, opcode) == (True, OP_CLOSE)
    assert close_code_of(payload)[0] == wire_code


async def test_frames_right_after_the_101_are_read() -> None:
    """The first frames may arrive with the response head, or the head in pieces."""
    big = os.urandom(600 * KIB)  # above the queue's high mark: reading pauses meanwhile

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers = await read_request(reader)
        head = response_101(headers["sec-websocket-key"])
        for i in range(0, 40, 7):  # the head in pieces
            writer.write(head[i : i + 7])
            await writer.drain()
        writer.write(
            head[42:]
            + server_frame(OP_TEXT, b"early")
            + server_frame(OP_BINARY, big)
            + server_frame(OP_CLOSE, close_payload(1000))
        )
        await writer.drain()
        await until_eof(reader)

    async with asyncio.timeout(10), raw_server(handler) as (url, finished):
        socket = await connect(url)
        assert (await socket.receive()) == WsMessage(MessageKind.TEXT, "early")
        assert (await socket.receive()) == WsMessage(MessageKind.BINARY, big)
        assert (await socket.receive()).code == 1000
        await socket.send_close()
        await finished.wait()


def _garbage(key: str) -> bytes:
    return b"HELLO\r\n\r\n"


def _head_too_long(key: str) -> bytes:
    return b"HTTP/1.1 101 Switching Protocols\r\nX-Filler: " + b"a" * (MAX_RESPONSE_HEAD + 10)


def _wrong_accept(key: str) -> bytes:
    return response_101("dGhlIHNhbXBsZSBub25jZQ==")


def _unoffered_subprotocol(key: str) -> bytes:
    return response_101(key, "Sec-WebSocket-Protocol: chat")


def _extension(key: str) -> bytes:
    return response_101(key, "Sec-WebSocket-Extensions: permessage-deflate")


def _no_upgrade_header(key: str) -> bytes:
    return b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n" + (
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n".encode()
    )


def _malformed_header(key: str) -> bytes:
    return response_101(key).replace(b"\r\n\r\n", b"\r\nno colon here\r\n\r\n")


def _http2_status(key: str) -> bytes:
    return b"HTTP/2 101\r\n\r\n"


def _superscript_status(key: str) -> bytes:
    return b"HTTP/1.1 \xb2\xb2\xb2 Switching Protocols\r\n\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        _garbage,
        _head_too_long,
        _wrong_accept,
        _unoffered_subprotocol,
        _extension,
        _no_upgrade_header,
        _malformed_header,
        _http2_status,
        _superscript_status,
        None,  # the server closes the connection right after reading the request
    ],
    ids=[
        "garbage",
        "head-too-long",
        "wrong-accept",
        "unoffered-subprotocol",
        "extension",
        "no-upgrade-header",
        "malformed-header",
        "http2",
        "superscript-status",
        "closed",
    ],
)
async def test_failed_handshake_is_a_connection_error(
    answer: Callable[[str], bytes] | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Raised at once (not at the connect timeout), without the URL's secret, and the
    connection is dropped."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers = await read_request(reader)
        if answer is None:
            return  # closed by raw_server
        with suppress(ConnectionError):
            writer.write(answer(headers["sec-websocket-key"]))
            await writer.drain()
        await until_eof(reader)

    caplog.set_level(logging.DEBUG)
    async with raw_server(handler) as (url, finished):
        async with asyncio.timeout(5):
            with pytest.raises(RelayConnectionError) as info:
                await connect(
                    url + "/$hc/hc" + SECRET_QUERY, connect_timeout=30, protocols=("a.v1",)
                )
            await finished.wait()  # the client dropped the connection
    assert not isinstance(info.value, RelayTimeoutError)
    assert SECRET not in exception_text(info.value)
    assert all(SECRET not in record.getMessage() for record in caplog.records)
    # An expected failure, handled: nothing logged as an error (asyncio's "Fatal error ...").
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_http_status_from_a_raw_server_keeps_a_utf8_reason() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write("HTTP/1.1 409 Déjà pris ✓\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        await until_eof(reader)

    async with asyncio.timeout(10), raw_server(handler) as (url, finished):
        with pytest.raises(RelayHttpError) as info:
            await connect(url + SECRET_QUERY)
        await finished.wait()
    assert (info.value.status, info.value.description) == (409, "Déjà pris ✓")
    assert SECRET not in str(info.value)


async def test_write_nowait_on_a_reset_connection_does_not_raise() -> None:
    """The peer resets the connection and we learn it from a write, before the reset is read:
    write_nowait stays quiet (the sink is told by on_close), it does not raise into the
    caller's callback (the bridge calls it from a socket's data_received)."""
    loop = asyncio.get_running_loop()
    with socket_module.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        listening.setblocking(False)
        port = listening.getsockname()[1]
        async with asyncio.timeout(10):
            client = asyncio.create_task(connect(f"ws://127.0.0.1:{port}/"))
            peer, _ = await loop.sock_accept(listening)
            with peer:
                request = b""
                while not request.endswith(b"\r\n\r\n"):
                    request += await loop.sock_recv(peer, 4096)
                key = request.split(b"Sec-WebSocket-Key: ")[1].split(b"\r\n")[0].decode()
                await loop.sock_sendall(peer, response_101(key))
                socket = await client
                sink = RecordingSink()
                socket.attach(sink)
                # Close with a reset, synchronously: the loop has not seen it when we write.
                peer.setsockopt(
                    socket_module.SOL_SOCKET, socket_module.SO_LINGER, struct.pack("ii", 1, 0)
                )
            socket.write_nowait(os.urandom(200 * KIB))
            socket.write_nowait(os.urandom(200 * KIB))
            await sink.closed.wait()
            assert sink.close_events() == [(1006, "")]
            socket.write_nowait(b"more")
            socket.close_nowait()


# -- keep-alive -----------------------------------------------------------------------------


async def test_keepalive_pings_and_a_missed_pong_drops_the_connection() -> None:
    """Pings go out at the interval while pongs come back; the first ping left unanswered
    ends the connection, reported as a close 1006 that says why."""
    pings: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_upgrade(reader, writer)
        for _ in range(3):
            fin, opcode, payload, _key = await read_client_frame(reader)
            assert (fin, opcode) == (True, OP_PING)
            pings.append(payload)
            writer.write(server_frame(OP_PONG, payload))
        _, opcode, _, _ = await read_client_frame(reader)  # the 4th ping: not answered
        assert opcode == OP_PING
        await until_eof(reader)

    async with asyncio.timeout(10), raw_server(handler) as (url, finished):
        socket = await connect(url)
        socket.keep_alive(0.1)
        message = await socket.receive()
        assert (message.kind, message.code) == (MessageKind.CLOSE, 1006)
        assert "no pong" in message.reason
        assert socket.close_sent and socket.close_received
        await finished.wait()
    assert len(pings) == 3


async def test_keepalive_through_the_connector_keeps_a_live_channel_open() -> None:
    """Against aiohttp (which answers pings), a control channel with a short keep-alive stays
    open over several intervals and still carries messages."""
    pongs = 0
    three_pongs = asyncio.Event()

    async with asyncio.timeout(10), ws_server(echo) as url:
        connector = WebSocketConnector(ssl_context=ssl.create_default_context(), proxy=None)
        try:
            socket = await connector.connect(url, connect_timeout=5, keepalive=0.1)
            assert isinstance(socket, frames_ws.FrameSocket)
            original = socket._pong_received

            def counting() -> None:
                nonlocal pongs
                pongs += 1
                if pongs >= 3:
                    three_pongs.set()
                original()

            socket._pong_received = counting  # type: ignore[method-assign]
            await three_pongs.wait()
            assert not socket.close_received
            await socket.send("still here")
            assert await socket.receive() == WsMessage(MessageKind.TEXT, "still here")
            await socket.send_close(1000)
            message = await socket.receive()
            assert (message.kind, message.code) == (MessageKind.CLOSE, 1000)
        finally:
            await connector.aclose()


# -- through a proxy ------------------------------------------------------------------------


async def test_proxy_refusal_names_its_status_and_auth_is_sent() -> None:
    seen: list[tuple[str, dict[str, str]]] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
        await writer.drain()

    async with asyncio.timeout(10), raw_server(proxy) as (proxy_url, _):
        address = proxy_url.removeprefix("ws://")
        connector = WebSocketConnector(
            ssl_context=ssl.create_default_context(), proxy=f"http://us%40er:pw@{address}"
        )
        try:
            with pytest.raises(RelayConnectionError) as info:
                await connector.connect(
                    f"wss://relay.example:9443/$hc/x{SECRET_QUERY}", connect_timeout=5
                )
        finally:
            await connector.aclose()
    assert "407" in str(info.value)
    assert SECRET not in exception_text(info.value)
    [(request_line, headers)] = seen
    assert request_line == "CONNECT relay.example:9443 HTTP/1.1"
    assert headers["host"] == "relay.example:9443"
    assert headers["proxy-authorization"] == "Basic dXNAZXI6cHc="


def test_proxy_repr_hides_the_credentials() -> None:
    proxy = frames_ws.Proxy("p", 3128, "Basic c2VjcmV0OnB3")
    assert "c2VjcmV0" not in repr(proxy)
    assert "c2VjcmV0" not in str(proxy)


# -- mask keys ---------------------------------------------------------------------------------


def test_mask_keys_are_successive_slices_of_urandom_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each key is 4 fresh bytes of os.urandom, used once; a used-up batch is replaced."""
    batches: list[bytes] = []

    def urandom(size: int) -> bytes:
        batch = bytes((len(batches) * 7 + i) % 256 for i in range(size))
        batches.append(batch)
        return batch

    monkeypatch.setattr(os, "urandom", urandom)  # what the pool draws its batches from
    monkeypatch.setattr(frames_ws, "_MASK_KEYS", EntropyPool(4))
    per_batch = BATCH // 4
    keys = [frames_ws.mask_key() for _ in range(per_batch + 3)]
    assert [len(batch) for batch in batches] == [BATCH] * 2
    expected = [batch[i : i + 4] for batch in batches for i in range(0, len(batch), 4)]
    assert keys == expected[: per_batch + 3]


def test_a_forked_child_does_not_reuse_the_parents_mask_keys() -> None:
    frames_ws.mask_key()  # a batch is under way in this process
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next key, then out at once
        try:
            os.write(write_end, frames_ws.mask_key())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        child_key = os.read(read_end, 4)
        os.waitpid(pid, 0)
    finally:
        os.close(read_end)
    # Without the fork hook the child would have taken this very key from the shared batch.
    assert len(child_key) == 4
    assert child_key != frames_ws.mask_key()


def test_client_frames_use_the_mask_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frames_ws, "mask_key", lambda: b"\x01\x02\x03\x04")
    frame = frames_ws._client_frame(OP_TEXT, b"abcd")
    assert frame[:2] == bytes((0x80 | OP_TEXT, 0x80 | 4))
    assert frame[2:6] == b"\x01\x02\x03\x04"
    key = b"\x01\x02\x03\x04"
    assert bytes(frame[6:]) == bytes(a ^ b for a, b in zip(b"abcd", key, strict=True))
