"""The picows client socket (``HYBRIDRELAY_WS_CLIENT=picows``, docs/DECISIONS.md D8).

Two parts: the SDK's end-to-end scenarios re-run with picows selected (every one checks that
picows really opened the sockets), and the socket itself against a small aiohttp server that
can do what the relay never does (fragments, oversized messages, a dropped connection, ...).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

pytest.importorskip("picows")

from hybridrelay.client import HybridConnectionStream, _connect
from hybridrelay.exceptions import (
    AuthorizationError,
    RelayConnectionError,
    RelayHttpError,
    RelayTimeoutError,
)
from hybridrelay.transport import picows_ws
from hybridrelay.transport.aiohttp_ws import AiohttpMessageSocket
from hybridrelay.transport.base import MessageKind, WsMessage
from tests.client import test_e2e_accept as accept_tests
from tests.client import test_e2e_basic as basic_tests
from tests.client.helpers import (
    accept_one,
    make_client,
    open_listener,
    write_random,
)
from tests.conftest import Relay, TlsFiles

MIB = 1024 * 1024


# -- the SDK with picows selected -------------------------------------------------------------


@pytest.fixture
def picows_opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Select picows for this test; the list collects every URL picows connected to."""
    monkeypatch.setattr(_connect, "_ws_client", "picows")
    opened: list[str] = []
    real = picows_ws.connect

    async def counting(url: str, **kwargs: Any) -> picows_ws.PicowsMessageSocket:
        opened.append(url)
        return await real(url, **kwargs)

    monkeypatch.setattr(picows_ws, "connect", counting)
    yield opened


async def test_sdk_echo_sha256_both_ways_over_tls(
    tls_relay: Relay, picows_opened: list[str]
) -> None:
    await basic_tests.test_echo_sha256_both_ways_over_tls(tls_relay)
    # The sender's socket and the listener's rendezvous, not the control channel.
    assert len(picows_opened) == 2
    assert any("sb-hc-action=connect" in url for url in picows_opened)
    assert any("sb-hc-action=accept" in url for url in picows_opened)


async def test_sdk_half_close(relay: Relay, picows_opened: list[str]) -> None:
    await basic_tests.test_half_close_reply_after_eof(relay)
    assert len(picows_opened) == 2


async def test_sdk_untrusted_certificate(tls_relay: Relay, picows_opened: list[str]) -> None:
    await basic_tests.test_untrusted_certificate_is_a_connection_error(tls_relay)


async def test_sdk_unreachable_relay(relay: Relay, picows_opened: list[str]) -> None:
    await basic_tests.test_unreachable_relay_is_a_connection_error(relay)
    assert picows_opened


async def test_sdk_connect_timeout(relay: Relay, picows_opened: list[str]) -> None:
    await basic_tests.test_connect_timeout(relay)
    assert picows_opened


async def test_sdk_streams_outlive_listener_and_client(
    relay: Relay, picows_opened: list[str]
) -> None:
    await basic_tests.test_streams_outlive_their_listener_and_client(relay)
    assert picows_opened


@pytest.mark.parametrize(
    ("verdict", "status", "description"),
    [("reject", 409, "Busy: try again & later (100%)"), ("raise", 502, None)],
)
async def test_sdk_rejection_status_and_description(
    relay: Relay, picows_opened: list[str], verdict: str, status: int, description: str | None
) -> None:
    await accept_tests.test_rejection_reaches_sender(relay, verdict, status, description)
    # The sender's refused upgrade, and the listener's reject (answered 410 by the relay).
    assert len(picows_opened) == 2


async def test_sdk_auth_errors(relay: Relay, picows_opened: list[str]) -> None:
    await accept_tests.test_auth_errors(relay)


async def test_sdk_subprotocols(relay: Relay, picows_opened: list[str]) -> None:
    await accept_tests.test_subprotocol_first_offer_by_default(relay)
    await accept_tests.test_subprotocol_chosen_by_handler(relay)
    await accept_tests.test_no_subprotocol_when_none_offered(relay)
    assert len(picows_opened) == 6


async def test_sdk_headers_path_and_query(relay: Relay, picows_opened: list[str]) -> None:
    await accept_tests.test_handler_sees_headers_path_and_query(relay)
    assert picows_opened


async def test_sdk_slow_reader_backpressure(relay: Relay, picows_opened: list[str]) -> None:
    """The listener does not read for a while: the sender's writes must stall (not buffer
    without bound), and everything arrives intact once it reads."""
    async with asyncio.timeout(60):
        async with open_listener(relay) as listener, make_client(relay) as client:
            sender_task = asyncio.create_task(client.create_connection())
            stream = await accept_one(listener)
            sender = await sender_task
            writer = asyncio.create_task(write_random(sender, 64 * MIB))
            await asyncio.sleep(1.0)
            assert not writer.done(), "64 MiB were taken without anybody reading"
            total, digest = await read_digest_until(stream, 64 * MIB)
            sent = await writer
            assert (total, digest) == (64 * MIB, sent)
            await asyncio.gather(sender.aclose(), stream.aclose())
    assert len(picows_opened) == 2


async def read_digest_until(stream: HybridConnectionStream, size: int) -> tuple[int, str]:
    digest = hashlib.sha256()
    total = 0
    while total < size:
        data = await stream.read(65536)
        assert data
        digest.update(data)
        total += len(data)
    return total, digest.hexdigest()


async def test_sdk_sender_loss_reaches_the_listener(relay: Relay, picows_opened: list[str]) -> None:
    async with asyncio.timeout(20):
        async with open_listener(relay) as listener, make_client(relay) as client:
            sender_task = asyncio.create_task(client.create_connection())
            stream = await accept_one(listener)
            sender = await sender_task
            await sender.write(b"x")
            assert await stream.read(10) == b"x"
            sender._socket.abort()  # no close frame: the relay forwards an error close
            assert await stream.read(10) == b""
            assert stream.close_code == 1011  # 1006 is not sendable: PROTOCOL.md 5.5
            await stream.aclose()


# -- the socket against a local aiohttp server ------------------------------------------------

Handler = Callable[[AiohttpMessageSocket, web.BaseRequest], Awaitable[None]]


@asynccontextmanager
async def ws_server(
    handler: Handler,
    *,
    protocols: tuple[str, ...] = (),
    ssl_context: ssl.SSLContext | None = None,
    headers_seen: dict[str, str] | None = None,
) -> AsyncIterator[str]:
    """An aiohttp WebSocket server on 127.0.0.1; yields its ``ws[s]://`` URL."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
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
        await handler(socket, request)
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
        await runner.cleanup()


async def connect(url: str, **kwargs: Any) -> picows_ws.PicowsMessageSocket:
    options: dict[str, Any] = {
        "ssl_context": ssl.create_default_context(),
        "connect_timeout": 5.0,
        "headers": {},
        "protocols": (),
        "max_message_size": 16 * MIB,
    }
    options.update(kwargs)
    return await picows_ws.connect(url, **options)


async def echo(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
    while True:
        message = await socket.receive()
        if message.kind is MessageKind.CLOSE:
            await socket.send_close(message.code or 1000, message.reason)
            return
        await socket.send(message.data)


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
        assert (await socket.receive()).data == b"last words"
        message = await socket.receive()
        assert (message.kind, message.code, message.reason) == (
            MessageKind.CLOSE,
            1000,
            "server done",
        )
        assert socket.close_received and not socket.close_sent
        # picows did not answer the close: we can still send.
        for i in range(3):
            await socket.send(f"after close {i}".encode())
        await socket.send_close(1001)
        assert socket.close_sent
        assert socket._transport is not None
        await asyncio.wait_for(socket._transport.wait_disconnected(), 5)
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
        await socket.send_close()
        replies = []
        while (message := await socket.receive()).kind is not MessageKind.CLOSE:
            replies.append(message.data)
        assert replies == ["reply 0", "reply 1", "reply 2"]
        assert message.code == 1000


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


async def test_abort_drops_without_close_frame() -> None:
    peer_saw: list[WsMessage] = []

    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        peer_saw.append(await socket.receive())

    async with asyncio.timeout(10), ws_server(handler) as url:
        socket = await connect(url)
        socket.abort()
        assert (await socket.receive()).code == 1006
        await asyncio.sleep(0.2)
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
    async with asyncio.timeout(30), ws_server(handler) as url:
        socket = await connect(url)

        async def flood() -> int:
            sent = 0
            while sent < 256 * MIB:
                await socket.send(chunk)
                sent += len(chunk)
            return sent

        task = asyncio.create_task(flood())
        await asyncio.sleep(0.5)
        assert not task.done()
        assert socket._drain is not None, "send() is not waiting on the transport"
        assert socket._transport is not None
        buffered = socket._transport.underlying_transport.get_write_buffer_size()
        assert buffered < 16 * MIB
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await socket.send_close()
        assert (await socket.receive()).kind is MessageKind.CLOSE


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
        await asyncio.sleep(0.5)
        assert socket._reading_paused
        assert socket._queued_bytes < 2 * MIB
        stalled_at = sent
        assert stalled_at < 64 * MIB
        total = 0
        while (message := await socket.receive()).kind is not MessageKind.CLOSE:
            total += len(message.data)
        assert total == 64 * MIB
        await socket.send_close()


async def test_refused_upgrade_keeps_status_and_reason() -> None:
    async with asyncio.timeout(10), ws_server(echo) as url:
        with pytest.raises(RelayHttpError) as info:
            await connect(url + "/refuse")
        assert (info.value.status, info.value.description) == (499, "Custom: no & never (100%)")
        with pytest.raises(AuthorizationError) as auth:
            await connect(url + "/forbidden")
        assert (auth.value.status, auth.value.description) == (403, "Bad token")


async def test_headers_and_subprotocol() -> None:
    seen: dict[str, str] = {}
    server = ws_server(echo, protocols=("b.v1",), headers_seen=seen)
    async with asyncio.timeout(10), server as url:
        socket = await connect(
            url + "/$hc/hc?sb-hc-action=connect&x=a%20b",
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


async def test_tls_with_our_context(tls_files: TlsFiles) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tls_files.cert_file, tls_files.key_file)
    trusted = ssl.create_default_context(cafile=tls_files.ca_file)
    async with asyncio.timeout(10), ws_server(echo, ssl_context=server_context) as url:
        socket = await connect(url, ssl_context=trusted)
        await socket.send(b"over tls")
        assert (await socket.receive()).data == b"over tls"
        await socket.aclose()
        # server_hostname is checked: the certificate is for 127.0.0.1, not for this name.
        with pytest.raises(RelayConnectionError):
            await connect(url.replace("127.0.0.1", "localhost.invalid"), ssl_context=trusted)
        with pytest.raises(RelayConnectionError):
            await connect(url)  # system CAs do not know the test CA


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
            with pytest.raises(RelayTimeoutError):
                await connect(f"ws://127.0.0.1:{port}/", connect_timeout=0.3)
            await done.wait()  # and the half-open connection was closed by us
    finally:
        server.close()
        await server.wait_closed()


def test_selection_falls_back_to_the_default_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(_connect.WS_CLIENT_ENV, "picows")
    monkeypatch.setattr(_connect, "_ws_client", None)
    monkeypatch.setitem(sys.modules, "picows", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "hybridrelay.transport.picows_ws")
    with caplog.at_level(logging.WARNING, logger="hybridrelay.client"):
        assert _connect.ws_client() == _connect.DEFAULT_WS_CLIENT
        assert _connect.ws_client() == _connect.DEFAULT_WS_CLIENT
    assert len([r for r in caplog.records if "not installed" in r.getMessage()]) == 1


def test_selection_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_connect, "_ws_client", None)
    monkeypatch.setenv(_connect.WS_CLIENT_ENV, "picows")
    assert _connect.ws_client() == "picows"
    monkeypatch.setattr(_connect, "_ws_client", None)
    monkeypatch.delenv(_connect.WS_CLIENT_ENV)
    assert _connect.ws_client() == "frames"
