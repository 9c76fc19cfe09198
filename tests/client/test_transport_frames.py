"""Our own client WebSocket (``HYBRIDRELAY_WS_CLIENT=frames``, transport/frames_ws.py, D11).

Three parts: the SDK's end-to-end scenarios re-run with frames selected (every one checks that
frames really opened the sockets); the socket itself against a small aiohttp server that can do
what the relay never does (fragments, oversized messages, a dropped connection, ...), the same
contract as tests/client/test_transport_picows.py; and what only this socket has or can get
wrong: splice mode (``attach``/``write_nowait``/``close_nowait``/flow control), the handshake
it does by hand, and the frames it reads and writes itself, against a raw asyncio server.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket as socket_module
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest
import trustme
from aiohttp import web

from hybridrelay.client import HybridConnectionStream, _connect
from hybridrelay.client._connect import WebSocketConnector
from hybridrelay.exceptions import (
    AuthorizationError,
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
from tests.client import test_e2e_accept as accept_tests
from tests.client import test_e2e_basic as basic_tests
from tests.client.helpers import accept_one, make_client, open_listener, write_random
from tests.conftest import Relay, TlsFiles, eventually
from tests.wsframes import client_frame

MIB = 1024 * 1024
KIB = 1024
SECRET = "SECRET123"
SECRET_QUERY = f"?sb-hc-action=accept&sb-hc-id=abc&sb-hc-rendezvous={SECRET}"

pytestmark = pytest.mark.timeout(60)

# -- the SDK with frames selected -------------------------------------------------------------


@pytest.fixture
def frames_opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Select frames for this test; the list collects every URL frames connected to."""
    monkeypatch.setattr(_connect, "_ws_client", "frames")
    opened: list[str] = []
    real = frames_ws.connect

    async def counting(url: str, **kwargs: Any) -> frames_ws.FrameSocket:
        opened.append(url)
        return await real(url, **kwargs)

    monkeypatch.setattr(frames_ws, "connect", counting)
    yield opened


async def test_sdk_echo_sha256_both_ways_over_tls(
    tls_relay: Relay, frames_opened: list[str]
) -> None:
    await basic_tests.test_echo_sha256_both_ways_over_tls(tls_relay)
    # The sender's socket and the listener's rendezvous, not the control channel.
    assert len(frames_opened) == 2
    assert any("sb-hc-action=connect" in url for url in frames_opened)
    assert any("sb-hc-action=accept" in url for url in frames_opened)


async def test_sdk_half_close(relay: Relay, frames_opened: list[str]) -> None:
    await basic_tests.test_half_close_reply_after_eof(relay)
    assert len(frames_opened) == 2


async def test_sdk_untrusted_certificate(tls_relay: Relay, frames_opened: list[str]) -> None:
    await basic_tests.test_untrusted_certificate_is_a_connection_error(tls_relay)


async def test_sdk_unreachable_relay(relay: Relay, frames_opened: list[str]) -> None:
    await basic_tests.test_unreachable_relay_is_a_connection_error(relay)
    assert frames_opened


async def test_sdk_connect_timeout(relay: Relay, frames_opened: list[str]) -> None:
    await basic_tests.test_connect_timeout(relay)
    assert frames_opened


async def test_sdk_streams_outlive_listener_and_client(
    relay: Relay, frames_opened: list[str]
) -> None:
    await basic_tests.test_streams_outlive_their_listener_and_client(relay)
    assert frames_opened


@pytest.mark.parametrize(
    ("verdict", "status", "description"),
    [("reject", 409, "Busy: try again & later (100%)"), ("raise", 502, None)],
)
async def test_sdk_rejection_status_and_description(
    relay: Relay, frames_opened: list[str], verdict: str, status: int, description: str | None
) -> None:
    await accept_tests.test_rejection_reaches_sender(relay, verdict, status, description)
    # The sender's refused upgrade, and the listener's reject (answered 410 by the relay).
    assert len(frames_opened) == 2


async def test_sdk_auth_errors(relay: Relay, frames_opened: list[str]) -> None:
    await accept_tests.test_auth_errors(relay)


async def test_sdk_subprotocols(relay: Relay, frames_opened: list[str]) -> None:
    await accept_tests.test_subprotocol_first_offer_by_default(relay)
    await accept_tests.test_subprotocol_chosen_by_handler(relay)
    await accept_tests.test_no_subprotocol_when_none_offered(relay)
    assert len(frames_opened) == 6


async def test_sdk_headers_path_and_query(relay: Relay, frames_opened: list[str]) -> None:
    await accept_tests.test_handler_sees_headers_path_and_query(relay)
    assert frames_opened


async def test_sdk_slow_reader_backpressure(relay: Relay, frames_opened: list[str]) -> None:
    """The listener does not read for a while: the sender's writes must stall (not buffer
    without bound), and everything arrives intact once it reads."""
    async with asyncio.timeout(60):
        async with open_listener(relay) as listener, make_client(relay) as client:
            sender_task = asyncio.create_task(client.create_connection())
            stream = await accept_one(listener)
            sender = await sender_task
            writer = asyncio.create_task(write_random(sender, 64 * MIB))
            await asyncio.sleep(1.0)  # nothing to wait for: the point is that nothing happens
            assert not writer.done(), "64 MiB were taken without anybody reading"
            total, digest = await read_digest_until(stream, 64 * MIB)
            sent = await writer
            assert (total, digest) == (64 * MIB, sent)
            await asyncio.gather(sender.aclose(), stream.aclose())
    assert len(frames_opened) == 2


async def read_digest_until(stream: HybridConnectionStream, size: int) -> tuple[int, str]:
    digest = hashlib.sha256()
    total = 0
    while total < size:
        data = await stream.read(65536)
        assert data
        digest.update(data)
        total += len(data)
    return total, digest.hexdigest()


async def test_sdk_sender_loss_reaches_the_listener(relay: Relay, frames_opened: list[str]) -> None:
    async with asyncio.timeout(20):
        async with open_listener(relay) as listener, make_client(relay) as client:
            sender_task = asyncio.create_task(client.create_connection())
            stream = await accept_one(listener)
            sender = await sender_task
            assert isinstance(sender._socket, frames_ws.FrameSocket)
            await sender.write(b"x")
            assert await stream.read(10) == b"x"
            sender._socket.abort()  # no close frame: the relay forwards an error close
            assert await stream.read(10) == b""
            assert stream.close_code == 1011  # 1006 is not sendable: PROTOCOL.md 5.5
            await stream.aclose()


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
    assert len(frames_opened) == 2


async def test_connector_keeps_aiohttp_for_heartbeat_and_proxy(
    frames_opened: list[str],
) -> None:
    """Control channels (heartbeat) and proxied connections never go to frames."""
    async with asyncio.timeout(10), ws_server(echo) as url:
        connector = WebSocketConnector(ssl_context=ssl.create_default_context(), proxy=None)
        try:
            own = await connector.connect(url, connect_timeout=5)
            assert isinstance(own, frames_ws.FrameSocket)
            await own.aclose()
            await connector.release(own)
            control = await connector.connect(url, connect_timeout=5, heartbeat=30)
            assert isinstance(control, AiohttpMessageSocket)
            await control.aclose()
            await connector.release(control)
        finally:
            await connector.aclose()
        closed_port = unused_port()
        proxied = WebSocketConnector(
            ssl_context=ssl.create_default_context(), proxy=f"http://127.0.0.1:{closed_port}"
        )
        try:
            with pytest.raises(RelayConnectionError):
                await proxied.connect(url, connect_timeout=5)
        finally:
            await proxied.aclose()
    assert frames_opened == [url]


def test_frame_socket_implements_the_interfaces() -> None:
    socket = frames_ws.FrameSocket(1024)
    assert isinstance(socket, SpliceSocket)
    assert isinstance(socket, FragmentSocket)


def test_selection_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_connect, "_ws_client", None)
    monkeypatch.setenv(_connect.WS_CLIENT_ENV, " Frames ")
    assert _connect.ws_client() == "frames"
    monkeypatch.setattr(_connect, "_ws_client", None)
    monkeypatch.setenv(_connect.WS_CLIENT_ENV, "turbo")
    with caplog.at_level(logging.WARNING, logger="hybridrelay.client"):
        assert _connect.ws_client() == "frames"
        assert _connect.ws_client() == "frames"
    assert len([r for r in caplog.records if "turbo" in r.getMessage()]) == 1
    monkeypatch.setattr(_connect, "_ws_client", None)
    monkeypatch.setenv(_connect.WS_CLIENT_ENV, "aiohttp")
    assert _connect.ws_client() == "aiohttp"
    monkeypatch.setattr(_connect, "_ws_client", None)
    monkeypatch.delenv(_connect.WS_CLIENT_ENV)
    assert _connect.ws_client() == "frames"


# -- the socket against a local aiohttp server ------------------------------------------------

Handler = Callable[[AiohttpMessageSocket, web.BaseRequest], Awaitable[None]]


@asynccontextmanager
async def ws_server(
    handler: Handler,
    *,
    protocols: tuple[str, ...] = (),
    ssl_context: ssl.SSLContext | None = None,
    headers_seen: dict[str, str] | None = None,
    targets_seen: list[str] | None = None,
) -> AsyncIterator[str]:
    """An aiohttp WebSocket server on 127.0.0.1; yields its ``ws[s]://`` URL.

    At the exit it waits (up to 5 s) for the handlers still running, so that what they
    recorded is complete, and re-raises the first exception a handler raised (aiohttp would
    only log it)."""
    handlers: set[asyncio.Task[Any]] = set()
    errors: list[BaseException] = []

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        if targets_seen is not None:
            targets_seen.append(request.raw_path)
        if request.path == "/refuse":
            return web.Response(status=499, reason="Custom: no & never (100%)")
        if request.path == "/forbidden":
            return web.Response(status=403, reason="Bad token")
        ws = web.WebSocketResponse(
            autoclose=False, autoping=True, protocols=protocols, max_msg_size=64 * MIB
        )
        await ws.prepare(request)
        if headers_seen is not None:
            headers_seen.update(request.headers)
        socket = AiohttpMessageSocket.server(ws, request)
        try:
            await handler(socket, request)
        except Exception as exc:
            errors.append(exc)
            raise
        return ws

    server = web.Server(handle)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    assert site._server is not None
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    try:
        yield f"{'wss' if ssl_context else 'ws'}://127.0.0.1:{port}"
    finally:
        running = [task for task in handlers if not task.done()]
        if running:
            await asyncio.wait(running, timeout=5)
        await runner.cleanup()
    if errors:
        raise errors[0]


async def connect(url: str, **kwargs: Any) -> frames_ws.FrameSocket:
    options: dict[str, Any] = {
        "ssl_context": ssl.create_default_context(),
        "connect_timeout": 5.0,
        "headers": {},
        "protocols": (),
        "max_message_size": 16 * MIB,
    }
    options.update(kwargs)
    return await frames_ws.connect(url, **options)


async def echo(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
    while True:
        message = await socket.receive()
        if message.kind is MessageKind.CLOSE:
            await socket.send_close(message.code or 1000, message.reason)
            return
        await socket.send(message.data)


def lost_event(socket: frames_ws.FrameSocket) -> asyncio.Event:
    """An event set once the socket's connection is gone (``connection_lost`` was called)."""
    event = asyncio.Event()
    if socket._lost:
        event.set()
        return event
    original = socket.connection_lost

    def connection_lost(exc: Exception | None) -> None:
        original(exc)
        event.set()

    socket.connection_lost = connection_lost  # type: ignore[method-assign]
    return event


def unused_port() -> int:
    """A port on 127.0.0.1 that nobody listens on (bound, then released)."""
    with socket_module.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_text_binary_empty_and_large_messages_round_trip() -> None:
    big = os.urandom(5 * MIB)
    async with asyncio.timeout(20), ws_server(echo) as url:
        socket = await connect(url)
        for data in ("héllo", b"\x00\x01binary", b"", "", big):
            await socket.send(data)
            message = await socket.receive()
            kind = MessageKind.TEXT if isinstance(data, str) else MessageKind.BINARY
            assert message.kind is kind
            assert message.data == data
        await socket.send_close(4000, "app done")
        message = await socket.receive()
        assert (message.kind, message.code, message.reason) == (MessageKind.CLOSE, 4000, "app done")
        assert socket.close_sent and socket.close_received
        # After the close, receive() keeps reporting it; send() is refused.
        assert (await socket.receive()).code == 4000
        with pytest.raises(RelayConnectionError):
            await socket.send(b"late")


async def test_half_close_peer_closes_first_and_we_keep_sending() -> None:
    received: list[bytes | str] = []

    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        await socket.send(b"last words")
        await socket.send_close(1000, "server done")
        while (message := await socket.receive()).kind is not MessageKind.CLOSE:
            received.append(message.data)
        assert message.code == 1001

    async with asyncio.timeout(10), ws_server(handler) as url:
        socket = await connect(url)
        lost = lost_event(socket)
        assert (await socket.receive()).data == b"last words"
        message = await socket.receive()
        assert (message.kind, message.code, message.reason) == (
            MessageKind.CLOSE,
            1000,
            "server done",
        )
        assert socket.close_received and not socket.close_sent
        # The close was reported, not answered: we can still send.
        for i in range(3):
            await socket.send(f"after close {i}".encode())
        assert not lost.is_set()
        await socket.send_close(1001)
        assert socket.close_sent
        await lost.wait()  # both close frames seen: we dropped the connection
    assert received == [b"after close 0", b"after close 1", b"after close 2"]


async def test_half_close_we_close_first_and_keep_receiving() -> None:
    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        message = await socket.receive()
        assert (message.kind, message.code) == (MessageKind.CLOSE, 1000)
        for i in range(3):
            await socket.send(f"reply {i}")
        await socket.send_close(1000)

    async with asyncio.timeout(10), ws_server(handler) as url:
        socket = await connect(url)
        lost = lost_event(socket)
        await socket.send_close()
        assert socket.close_sent and not socket.close_received
        replies = []
        while (message := await socket.receive()).kind is not MessageKind.CLOSE:
            replies.append(message.data)
        assert replies == ["reply 0", "reply 1", "reply 2"]
        assert message.code == 1000
        await lost.wait()


async def test_fragmented_messages_are_reassembled_both_ways() -> None:
    got: list[WsMessage] = []

    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        got.append(await socket.receive())
        await socket.send_fragment(b"ab", first=True, last=False)
        await socket.send_fragment(b"", first=False, last=False)
        await socket.send_fragment(b"cd" * 40_000, first=False, last=True)
        await socket.send(b"next")
        await echo(socket, request)

    async with asyncio.timeout(10), ws_server(handler) as url:
        socket = await connect(url)
        await socket.send_fragment(b"12", first=True, last=False)
        await socket.send_fragment(b"34" * 50_000, first=False, last=True)
        message = await socket.receive()
        assert message == WsMessage(MessageKind.BINARY, b"ab" + b"cd" * 40_000)
        assert (await socket.receive()).data == b"next"
        await socket.aclose()
    assert got == [WsMessage(MessageKind.BINARY, b"12" + b"34" * 50_000)]


@pytest.mark.parametrize("fragmented", [False, True])
async def test_message_above_the_limit_is_closed_with_1009(fragmented: bool) -> None:
    peer_saw: list[WsMessage] = []

    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        try:
            if fragmented:
                for i in range(10):
                    await socket.send_fragment(b"x" * 1000, first=i == 0, last=i == 9)
            else:
                await socket.send(b"x" * 10_000)
        except RelayConnectionError:
            pass
        peer_saw.append(await socket.receive())

    async with asyncio.timeout(10), ws_server(handler) as url:
        socket = await connect(url, max_message_size=4096)
        message = await socket.receive()
        assert (message.kind, message.code) == (MessageKind.CLOSE, 1009)
        assert socket.close_sent and socket.close_received
    assert peer_saw and peer_saw[0].kind is MessageKind.CLOSE and peer_saw[0].code == 1009


async def test_connection_lost_is_close_1006() -> None:
    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        await socket.send(b"before")
        socket.abort()

    async with asyncio.timeout(10), ws_server(handler) as url:
        socket = await connect(url)
        assert (await socket.receive()).data == b"before"
        message = await socket.receive()
        assert (message.kind, message.code) == (MessageKind.CLOSE, 1006)
        assert socket.close_received and socket.close_sent
        with pytest.raises(RelayConnectionError):
            await socket.send(b"x")
        assert (await socket.receive()).code == 1006


async def test_abort_drops_without_close_frame() -> None:
    peer_saw: list[WsMessage] = []
    seen = asyncio.Event()

    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        peer_saw.append(await socket.receive())
        seen.set()

    async with asyncio.timeout(10), ws_server(handler) as url:
        socket = await connect(url)
        socket.abort()
        assert socket.close_sent and socket.close_received
        assert (await socket.receive()).code == 1006
        await seen.wait()
    assert peer_saw == [WsMessage(MessageKind.CLOSE, code=1006)]


async def test_send_waits_while_the_peer_does_not_read() -> None:
    release = asyncio.Event()
    received = 0

    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        nonlocal received
        await release.wait()
        while (message := await socket.receive()).kind is not MessageKind.CLOSE:
            received += len(message.data)
        await socket.send_close()

    chunk = b"z" * 65536
    sent = 0
    async with asyncio.timeout(30), ws_server(handler) as url:
        socket = await connect(url)

        async def flood() -> None:
            nonlocal sent
            while sent < 256 * MIB:
                await socket.send(chunk)
                sent += len(chunk)

        task = asyncio.create_task(flood())
        await eventually(lambda: socket._drain_waiter is not None)
        assert socket._write_paused
        await asyncio.sleep(0.5)  # nothing to wait for: the point is that nothing happens
        assert not task.done(), "send() does not wait for the transport"
        assert socket._drain_waiter is not None, "send() is not waiting on the transport"
        assert socket._transport is not None
        assert socket._transport.get_write_buffer_size() < 16 * MIB
        assert sent < 64 * MIB
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await socket.send_close()
        assert (await socket.receive()).kind is MessageKind.CLOSE
    # Everything that send() took went out (the cancelled send's frame was written whole).
    assert received in (sent, sent + len(chunk))


async def test_reading_pauses_when_we_do_not_receive() -> None:
    sent = 0

    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        nonlocal sent
        try:
            while sent < 64 * MIB:
                await socket.send(b"q" * 65536)
                sent += 65536
        except RelayConnectionError:
            return
        await socket.send_close()
        await socket.receive()

    async with asyncio.timeout(30), ws_server(handler) as url:
        socket = await connect(url)
        await eventually(lambda: socket._reading_paused)
        await asyncio.sleep(0.5)  # nothing to wait for: the point is that nothing happens
        assert socket._reading_paused
        assert socket._queued < 2 * MIB
        stalled_at = sent
        assert stalled_at < 64 * MIB
        total = 0
        while (message := await socket.receive()).kind is not MessageKind.CLOSE:
            total += len(message.data)
        assert total == 64 * MIB
        assert socket._queued == 0
        await socket.send_close()


async def test_refused_upgrade_keeps_status_and_reason() -> None:
    async with asyncio.timeout(10), ws_server(echo) as url:
        with pytest.raises(RelayHttpError) as info:
            await connect(url + "/refuse" + SECRET_QUERY)
        assert (info.value.status, info.value.description) == (499, "Custom: no & never (100%)")
        assert SECRET not in str(info.value)
        with pytest.raises(AuthorizationError) as auth:
            await connect(url + "/forbidden")
        assert (auth.value.status, auth.value.description) == (403, "Bad token")


async def test_headers_target_and_subprotocol() -> None:
    seen: dict[str, str] = {}
    targets: list[str] = []
    server = ws_server(echo, protocols=("b.v1",), headers_seen=seen, targets_seen=targets)
    async with asyncio.timeout(10), server as url:
        socket = await connect(
            url + "/$hc/hc?sb-hc-action=connect&x=a%20b&y=%2F%3D",
            headers={"ServiceBusAuthorization": "SharedAccessSignature sr=x&sig=y"},
            protocols=("a.v1", "b.v1"),
        )
        assert socket.subprotocol == "b.v1"
        await socket.aclose()
        other = await connect(url)
        assert other.subprotocol is None
        await other.aclose()
    assert seen["ServiceBusAuthorization"] == "SharedAccessSignature sr=x&sig=y"
    assert "Sec-WebSocket-Extensions" not in seen
    assert seen["Host"] == url.removeprefix("ws://")
    # The target goes out byte for byte (a rendezvous address must reach the relay as is).
    assert targets == ["/$hc/hc?sb-hc-action=connect&x=a%20b&y=%2F%3D", "/"]


async def test_tls_with_our_context(tls_files: TlsFiles) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tls_files.cert_file, tls_files.key_file)
    trusted = ssl.create_default_context(cafile=tls_files.ca_file)
    async with asyncio.timeout(10), ws_server(echo, ssl_context=server_context) as url:
        socket = await connect(url, ssl_context=trusted)
        await socket.send(b"over tls")
        assert (await socket.receive()).data == b"over tls"
        big = os.urandom(3 * MIB)
        await socket.send(big)
        assert (await socket.receive()).data == big
        await socket.aclose()
        with pytest.raises(RelayConnectionError):
            await connect(url.replace("127.0.0.1", "localhost.invalid"), ssl_context=trusted)
        with pytest.raises(RelayConnectionError) as info:
            await connect(url)  # system CAs do not know the test CA
        assert "TLS" in str(info.value)


async def test_tls_checks_the_host_name() -> None:
    """server_hostname is sent and checked: a certificate for another name is refused."""
    ca = trustme.CA()
    cert = ca.issue_cert("other.example")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    async with asyncio.timeout(10), ws_server(echo, ssl_context=server_context) as url:
        with pytest.raises(RelayConnectionError) as info:
            await connect(url + SECRET_QUERY, ssl_context=trusted)
        assert "TLS" in str(info.value)
        assert SECRET not in str(info.value)


async def test_connect_timeout_without_101() -> None:
    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)  # the upgrade request; never answered
        await reader.read(65536)  # b"": the client gave up and closed
        writer.close()
        await writer.wait_closed()
        done.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(10):
            with pytest.raises(RelayTimeoutError) as info:
                await connect(f"ws://127.0.0.1:{port}/{SECRET_QUERY}", connect_timeout=0.3)
            assert SECRET not in str(info.value)
            await done.wait()  # and the half-open connection was closed by us
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1/x" + SECRET_QUERY,
        "ws:///no-host" + SECRET_QUERY,
        "ws://127.0.0.1:99999/" + SECRET_QUERY,
        "ws://127.0.0.1:notaport/" + SECRET_QUERY,
    ],
)
async def test_malformed_url_is_a_connection_error(url: str) -> None:
    async with asyncio.timeout(5):
        with pytest.raises(RelayConnectionError) as info:
            await connect(url)
    assert not isinstance(info.value, RelayTimeoutError)
    assert SECRET not in exception_text(info.value)


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Evil": "a\r\nInjected: yes"},
        {"X-Evil": "a\nInjected: yes"},
        {"X-Evil": "a\rInjected: yes"},
        {"X-Evil\r\nInjected": "yes"},
        {"": "empty name"},
        {"X Evil": "space in the name"},
    ],
)
async def test_header_injection_is_refused_before_connecting(headers: dict[str, str]) -> None:
    async with asyncio.timeout(5):
        with pytest.raises(RelayConnectionError) as info:
            # Nobody listens there: only a refusal before connecting gives this message.
            await connect(f"ws://127.0.0.1:{unused_port()}/{SECRET_QUERY}", headers=headers)
    assert isinstance(info.value.__cause__, ValueError), str(info.value)
    assert SECRET not in exception_text(info.value)


async def test_unreachable_port_is_a_connection_error() -> None:
    async with asyncio.timeout(5):
        with pytest.raises(RelayConnectionError) as info:
            await connect(f"ws://127.0.0.1:{unused_port()}/{SECRET_QUERY}")
    assert not isinstance(info.value, RelayTimeoutError)
    assert SECRET not in exception_text(info.value)


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
    upload = os.urandom(200 * KIB)

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
    # write_nowait sent binary messages of at most 64 KiB that add up to the data.
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


def exception_text(exc: BaseException) -> str:
    """The messages of an exception and of its causes/contexts."""
    parts: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(parts) < 10:
        parts += [str(current), repr(current)]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


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
