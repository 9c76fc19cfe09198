"""The contract of our client socket (``frames``, transport/frames_ws.py, D11), the SDK's only
one since picows went (D8, superseded).

Two parts: the SDK's end-to-end scenarios re-run with the client selected (every one checks
that the client really opened the sockets), and the socket itself against a small aiohttp
server that can do what the relay never does (fragments, oversized messages, a dropped
connection, ...). The rest is in test_transport_frames.py; the internals the tests look at
are in ws_peers.py.
"""

from __future__ import annotations

import asyncio
import os
import ssl

import pytest
import trustme
from aiohttp import web

from hybridrelay.exceptions import (
    AuthorizationError,
    RelayConnectionError,
    RelayHttpError,
    RelayTimeoutError,
)
from hybridrelay.transport.aiohttp_ws import AiohttpMessageSocket
from hybridrelay.transport.base import MessageKind, WsMessage
from tests.client import test_e2e_accept as accept_tests
from tests.client import test_e2e_basic as basic_tests
from tests.client.helpers import accept_one, make_client, open_listener, write_random
from tests.client.ws_peers import (
    CLIENT_NAMES,
    MIB,
    SECRET,
    SECRET_QUERY,
    ClientUnderTest,
    client_named,
    echo,
    exception_text,
    read_digest_until,
    record_connects,
    refused_port,
    ws_server,
)
from tests.conftest import Relay, TlsFiles, eventually

pytestmark = [pytest.mark.timeout(60), pytest.mark.both_loops]


@pytest.fixture(params=CLIENT_NAMES)
def client(request: pytest.FixtureRequest) -> ClientUnderTest:
    """The client under test."""
    name: str = request.param
    return client_named(name)


# -- the SDK with the client selected ---------------------------------------------------------


@pytest.fixture
def opened(client: ClientUnderTest, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Select the client for this test; the list collects every URL it connected to."""
    return record_connects(monkeypatch, client.name, client.module)


async def test_sdk_echo_sha256_both_ways_over_tls(tls_relay: Relay, opened: list[str]) -> None:
    await basic_tests.test_echo_sha256_both_ways_over_tls(tls_relay)
    # The listener's control channel, the sender's socket and the listener's rendezvous.
    assert len(opened) == 3
    assert any("sb-hc-action=listen" in url for url in opened)
    assert any("sb-hc-action=connect" in url for url in opened)
    assert any("sb-hc-action=accept" in url for url in opened)


async def test_sdk_half_close(relay: Relay, opened: list[str]) -> None:
    await basic_tests.test_half_close_reply_after_eof(relay)
    assert len(opened) == 3  # control channel, sender, rendezvous


async def test_sdk_untrusted_certificate(tls_relay: Relay, opened: list[str]) -> None:
    await basic_tests.test_untrusted_certificate_is_a_connection_error(tls_relay)


async def test_sdk_unreachable_relay(relay: Relay, opened: list[str]) -> None:
    await basic_tests.test_unreachable_relay_is_a_connection_error(relay)
    assert opened


async def test_sdk_connect_timeout(relay: Relay, opened: list[str]) -> None:
    await basic_tests.test_connect_timeout(relay)
    assert opened


async def test_sdk_streams_outlive_listener_and_client(relay: Relay, opened: list[str]) -> None:
    await basic_tests.test_streams_outlive_their_listener_and_client(relay)
    assert opened


@pytest.mark.parametrize(
    ("verdict", "status", "description"),
    [("reject", 409, "Busy: try again & later (100%)"), ("raise", 502, None)],
)
async def test_sdk_rejection_status_and_description(
    relay: Relay, opened: list[str], verdict: str, status: int, description: str | None
) -> None:
    await accept_tests.test_rejection_reaches_sender(relay, verdict, status, description)
    # The control channel, the sender's refused upgrade, and the listener's reject (answered
    # 410 by the relay).
    assert len(opened) == 3


async def test_sdk_auth_errors(relay: Relay, opened: list[str]) -> None:
    await accept_tests.test_auth_errors(relay)


async def test_sdk_subprotocols(relay: Relay, opened: list[str]) -> None:
    await accept_tests.test_subprotocol_first_offer_by_default(relay)
    await accept_tests.test_subprotocol_chosen_by_handler(relay)
    await accept_tests.test_no_subprotocol_when_none_offered(relay)
    assert len(opened) == 9  # three listeners: a control channel and two sockets each


async def test_sdk_headers_path_and_query(relay: Relay, opened: list[str]) -> None:
    await accept_tests.test_handler_sees_headers_path_and_query(relay)
    assert opened


async def test_sdk_slow_reader_backpressure(relay: Relay, opened: list[str]) -> None:
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
    assert len(opened) == 3  # control channel, sender, rendezvous


async def test_sdk_sender_loss_reaches_the_listener(
    relay: Relay, client: ClientUnderTest, opened: list[str]
) -> None:
    async with asyncio.timeout(20):
        async with open_listener(relay) as listener, make_client(relay) as sdk:
            sender_task = asyncio.create_task(sdk.create_connection())
            stream = await accept_one(listener)
            sender = await sender_task
            assert isinstance(sender._socket, client.socket_type)
            await sender.write(b"x")
            assert await stream.read(10) == b"x"
            sender._socket.abort()  # no close frame: the relay forwards an error close
            assert await stream.read(10) == b""
            assert stream.close_code == 1011  # 1006 is not sendable: PROTOCOL.md 5.5
            await stream.aclose()
    assert len(opened) == 3  # control channel, sender, rendezvous


# -- the socket against a local aiohttp server ------------------------------------------------


async def test_text_binary_empty_and_large_messages_round_trip(client: ClientUnderTest) -> None:
    big = os.urandom(5 * MIB)
    async with asyncio.timeout(20), ws_server(echo) as url:
        socket = await client.connect(url)
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


async def test_half_close_peer_closes_first_and_we_keep_sending(client: ClientUnderTest) -> None:
    received: list[bytes | str] = []

    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        await socket.send(b"last words")
        await socket.send_close(1000, "server done")
        while (message := await socket.receive()).kind is not MessageKind.CLOSE:
            received.append(message.data)
        assert message.code == 1001

    async with asyncio.timeout(10), ws_server(handler) as url:
        socket = await client.connect(url)
        lost = client.lost(socket)
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
        # Both close frames seen: we dropped the connection.
        await asyncio.wait_for(lost.wait(), 5)
    assert received == [b"after close 0", b"after close 1", b"after close 2"]


async def test_half_close_we_close_first_and_keep_receiving(client: ClientUnderTest) -> None:
    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        message = await socket.receive()
        assert (message.kind, message.code) == (MessageKind.CLOSE, 1000)
        for i in range(3):
            await socket.send(f"reply {i}")
        await socket.send_close(1000)

    async with asyncio.timeout(10), ws_server(handler) as url:
        socket = await client.connect(url)
        lost = client.lost(socket)
        await socket.send_close()
        assert socket.close_sent and not socket.close_received
        replies = []
        while (message := await socket.receive()).kind is not MessageKind.CLOSE:
            replies.append(message.data)
        assert replies == ["reply 0", "reply 1", "reply 2"]
        assert message.code == 1000
        await lost.wait()


async def test_fragmented_messages_are_reassembled_both_ways(client: ClientUnderTest) -> None:
    got: list[WsMessage] = []

    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        got.append(await socket.receive())
        await socket.send_fragment(b"ab", first=True, last=False)
        await socket.send_fragment(b"", first=False, last=False)
        await socket.send_fragment(b"cd" * 40_000, first=False, last=True)
        await socket.send(b"next")
        await echo(socket, request)

    async with asyncio.timeout(10), ws_server(handler) as url:
        socket = await client.connect(url)
        await socket.send_fragment(b"12", first=True, last=False)
        await socket.send_fragment(b"34" * 50_000, first=False, last=True)
        message = await socket.receive()
        assert message == WsMessage(MessageKind.BINARY, b"ab" + b"cd" * 40_000)
        assert (await socket.receive()).data == b"next"
        await socket.aclose()
    assert got == [WsMessage(MessageKind.BINARY, b"12" + b"34" * 50_000)]


@pytest.mark.parametrize("fragmented", [False, True])
async def test_message_above_the_limit_is_closed_with_1009(
    client: ClientUnderTest, fragmented: bool
) -> None:
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
        socket = await client.connect(url, max_message_size=4096)
        message = await socket.receive()
        assert (message.kind, message.code) == (MessageKind.CLOSE, 1009)
        assert socket.close_sent and socket.close_received
    assert peer_saw and peer_saw[0].kind is MessageKind.CLOSE and peer_saw[0].code == 1009


async def test_connection_lost_is_close_1006(client: ClientUnderTest) -> None:
    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        await socket.send(b"before")
        socket.abort()

    async with asyncio.timeout(10), ws_server(handler) as url:
        socket = await client.connect(url)
        assert (await socket.receive()).data == b"before"
        message = await socket.receive()
        assert (message.kind, message.code) == (MessageKind.CLOSE, 1006)
        assert socket.close_received and socket.close_sent
        with pytest.raises(RelayConnectionError):
            await socket.send(b"x")
        assert (await socket.receive()).code == 1006


async def test_abort_drops_without_close_frame(client: ClientUnderTest) -> None:
    peer_saw: list[WsMessage] = []
    seen = asyncio.Event()

    async def handler(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
        peer_saw.append(await socket.receive())
        seen.set()

    async with asyncio.timeout(10), ws_server(handler) as url:
        socket = await client.connect(url)
        socket.abort()
        assert socket.close_sent and socket.close_received
        assert (await socket.receive()).code == 1006
        await seen.wait()
    assert peer_saw == [WsMessage(MessageKind.CLOSE, code=1006)]


async def test_send_waits_while_the_peer_does_not_read(client: ClientUnderTest) -> None:
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
        socket = await client.connect(url)

        async def flood() -> None:
            nonlocal sent
            while sent < 256 * MIB:
                await socket.send(chunk)
                sent += len(chunk)

        task = asyncio.create_task(flood())
        await eventually(lambda: client.send_is_waiting(socket))
        assert client.write_paused(socket)
        await asyncio.sleep(0.5)  # nothing to wait for: the point is that nothing happens
        assert not task.done(), "send() does not wait for the transport"
        assert client.send_is_waiting(socket), "send() is not waiting on the transport"
        assert client.write_buffered(socket) < 16 * MIB
        assert sent < 64 * MIB
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await socket.send_close()
        assert (await socket.receive()).kind is MessageKind.CLOSE
    # Everything that send() took went out (the cancelled send's frame was written whole).
    assert received in (sent, sent + len(chunk))


async def test_reading_pauses_when_we_do_not_receive(client: ClientUnderTest) -> None:
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
        socket = await client.connect(url)
        await eventually(lambda: client.reading_paused(socket))
        await asyncio.sleep(0.5)  # nothing to wait for: the point is that nothing happens
        assert client.reading_paused(socket)
        assert client.queued(socket) < 2 * MIB
        stalled_at = sent
        assert stalled_at < 64 * MIB
        total = 0
        while (message := await socket.receive()).kind is not MessageKind.CLOSE:
            total += len(message.data)
        assert total == 64 * MIB
        assert client.queued(socket) == 0
        await socket.send_close()


async def test_refused_upgrade_keeps_status_and_reason(client: ClientUnderTest) -> None:
    async with asyncio.timeout(10), ws_server(echo) as url:
        with pytest.raises(RelayHttpError) as info:
            await client.connect(url + "/refuse" + SECRET_QUERY)
        assert (info.value.status, info.value.description) == (499, "Custom: no & never (100%)")
        assert SECRET not in str(info.value)
        with pytest.raises(AuthorizationError) as auth:
            await client.connect(url + "/forbidden")
        assert (auth.value.status, auth.value.description) == (403, "Bad token")


async def test_headers_target_and_subprotocol(client: ClientUnderTest) -> None:
    seen: dict[str, str] = {}
    targets: list[str] = []
    server = ws_server(echo, protocols=("b.v1",), headers_seen=seen, targets_seen=targets)
    async with asyncio.timeout(10), server as url:
        socket = await client.connect(
            url + "/$hc/hc?sb-hc-action=connect&x=a%20b&y=%2F%3D",
            headers={"ServiceBusAuthorization": "SharedAccessSignature sr=x&sig=y"},
            protocols=("a.v1", "b.v1"),
        )
        assert socket.subprotocol == "b.v1"
        await socket.aclose()
        other = await client.connect(url)
        assert other.subprotocol is None
        await other.aclose()
    assert seen["ServiceBusAuthorization"] == "SharedAccessSignature sr=x&sig=y"
    assert "Sec-WebSocket-Extensions" not in seen
    assert seen["Host"] == url.removeprefix("ws://")
    # The target goes out byte for byte (a rendezvous address must reach the relay as is).
    assert targets == ["/$hc/hc?sb-hc-action=connect&x=a%20b&y=%2F%3D", "/"]


async def test_tls_with_our_context(client: ClientUnderTest, tls_files: TlsFiles) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tls_files.cert_file, tls_files.key_file)
    trusted = ssl.create_default_context(cafile=tls_files.ca_file)
    async with asyncio.timeout(10), ws_server(echo, ssl_context=server_context) as url:
        socket = await client.connect(url, ssl_context=trusted)
        await socket.send(b"over tls")
        assert (await socket.receive()).data == b"over tls"
        big = os.urandom(3 * MIB)
        await socket.send(big)
        assert (await socket.receive()).data == big
        await socket.aclose()
        with pytest.raises(RelayConnectionError):
            await client.connect(url.replace("127.0.0.1", "localhost.invalid"), ssl_context=trusted)
        with pytest.raises(RelayConnectionError) as info:
            await client.connect(url)  # system CAs do not know the test CA
        assert "TLS" in str(info.value)


async def test_tls_checks_the_host_name(client: ClientUnderTest) -> None:
    """server_hostname is sent and checked: a certificate for another name is refused."""
    ca = trustme.CA()
    cert = ca.issue_cert("other.example")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    async with asyncio.timeout(10), ws_server(echo, ssl_context=server_context) as url:
        with pytest.raises(RelayConnectionError) as info:
            await client.connect(url + SECRET_QUERY, ssl_context=trusted)
        assert "TLS" in str(info.value)
        assert SECRET not in str(info.value)


async def test_connect_timeout_without_101(client: ClientUnderTest) -> None:
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
                await client.connect(f"ws://127.0.0.1:{port}/{SECRET_QUERY}", connect_timeout=0.3)
            assert SECRET not in str(info.value)
            await done.wait()  # and the half-open connection was closed by us
    finally:
        server.close()
        await server.wait_closed()


async def test_unreachable_port_is_a_connection_error(client: ClientUnderTest) -> None:
    async with asyncio.timeout(5):
        with refused_port() as port, pytest.raises(RelayConnectionError) as info:
            await client.connect(f"ws://127.0.0.1:{port}/{SECRET_QUERY}")
    assert not isinstance(info.value, RelayTimeoutError)
    assert SECRET not in exception_text(info.value)


# -- refused before connecting ----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1/x" + SECRET_QUERY,
        "ws:///no-host" + SECRET_QUERY,
        "ws://127.0.0.1:99999/" + SECRET_QUERY,
        "ws://127.0.0.1:notaport/" + SECRET_QUERY,
    ],
)
async def test_malformed_url_is_a_connection_error(client: ClientUnderTest, url: str) -> None:
    async with asyncio.timeout(5):
        with pytest.raises(RelayConnectionError) as info:
            await client.connect(url)
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
async def test_header_injection_is_refused_before_connecting(
    client: ClientUnderTest, headers: dict[str, str]
) -> None:
    async with asyncio.timeout(5):
        with refused_port() as port, pytest.raises(RelayConnectionError) as info:
            # Nobody listens there: only a refusal before connecting gives this message.
            await client.connect(f"ws://127.0.0.1:{port}/{SECRET_QUERY}", headers=headers)
    assert isinstance(info.value.__cause__, ValueError), str(info.value)
    assert SECRET not in exception_text(info.value)
