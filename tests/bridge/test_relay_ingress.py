"""The relay's own ingress ports (``ingress:`` in the relay's config, server/ingress.py):
client -> relay -> edge agent (our bridge ``-R`` or an SDK listener) -> destination, on real
sockets."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import struct
from typing import Any

import pytest

from hybridrelay.client import AcceptContext
from hybridrelay.exceptions import ConfigurationError
from hybridrelay.server import RelayConfig
from tests.bridge.helpers import (
    digest_handler,
    exchange,
    make_config,
    random_bytes,
    read_until_closed,
    running,
    tcp_server,
    wait_until_reset,
)
from tests.client.helpers import open_listener
from tests.conftest import Relay, RelayFactory, eventually

pytestmark = [pytest.mark.timeout(60), pytest.mark.both_loops]


def ingress(port_name: str | None = None, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"listen": "127.0.0.1:0", "hybrid_connection": "hc", **extra}
    if port_name:
        entry["port_name"] = port_name
    return entry


async def open_ingress(
    relay: Relay, index: int = 0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    address = relay.server.ingress[index].address
    assert address is not None
    return await asyncio.open_connection(*address)


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_tcp_8_mib_each_way(make_relay: RelayFactory, tls: bool) -> None:
    async with make_relay(tls=tls, ingress=[ingress()]) as relay, tcp_server() as dest:
        async with running(make_config(relay, remote=[f"hc:127.0.0.1:{dest.port}"])) as edge:
            await edge.started.wait()
            payload = random_bytes(8 << 20)
            reader, writer = await open_ingress(relay)
            echoed = await exchange(reader, writer, payload)
            writer.close()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert dest.connections == 1


async def test_half_close_crosses_both_ways(make_relay: RelayFactory) -> None:
    """The destination answers only after the client's EOF, then closes: the client gets the
    whole answer and then EOF."""
    async with make_relay(ingress=[ingress()]) as relay, tcp_server(digest_handler) as dest:
        async with running(make_config(relay, remote=[f"hc:127.0.0.1:{dest.port}"])) as edge:
            await edge.started.wait()
            payload = random_bytes(3 << 20)
            reader, writer = await open_ingress(relay)
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            async with asyncio.timeout(20):
                reply = await reader.read()
            writer.close()
    assert reply[:32] == hashlib.sha256(payload).digest()
    assert reply[32:] == b"z" * (1 << 20)


async def test_port_names_select_routes_at_the_edge(make_relay: RelayFactory) -> None:
    entries = [ingress("alpha"), ingress("beta"), ingress("nope")]
    async with make_relay(ingress=entries) as relay:
        async with tcp_server(banner=b"A") as a, tcp_server(banner=b"B") as b:
            routes = [f"hc:alpha/127.0.0.1:{a.port}", f"hc:beta/127.0.0.1:{b.port}"]
            async with running(make_config(relay, remote=routes)) as edge:
                await edge.started.wait()
                for index, banner in ((0, b"A"), (1, b"B"), (0, b"A")):
                    reader, writer = await open_ingress(relay, index)
                    assert await exchange(reader, writer, b"-x-") == banner + b"-x-"
                    writer.close()
                # An unknown port: the edge closes without a reply, the client is reset.
                reader, writer = await open_ingress(relay, 2)
                writer.write(b"anything")
                assert await read_until_closed(reader) == b""
                writer.close()
    assert (a.connections, b.connections) == (2, 1)


async def test_sdk_listener_sees_the_client_and_can_reject(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    decisions = [False, True]

    def decide(context: AcceptContext) -> bool:
        return decisions.pop(0)

    async with make_relay(ingress=[ingress()]) as relay:
        async with open_listener(relay, accept_handler=decide) as listener:
            # Rejected by the listener: the client is reset, with a warning saying why.
            reader, writer = await open_ingress(relay)
            with caplog.at_level(logging.WARNING, "hybridrelay.refused"):
                assert await read_until_closed(reader) == b""
            writer.close()
            assert "status=400 reason=Rejected by user code" in caplog.text
            # Accepted: the listener learns the client's address; bytes cross as a stream.
            reader, writer = await open_ingress(relay)
            async with asyncio.timeout(10):
                stream = await listener.accept_connection()
            assert stream is not None
            assert stream.remote_endpoint == writer.get_extra_info("sockname")[:2]
            # What a WebSocket upgrade would carry (listeners such as hyco-ws check it).
            assert stream.connect_headers["Upgrade"] == "websocket"
            assert stream.connect_headers["Sec-WebSocket-Version"] == "13"
            assert len(stream.connect_headers["Sec-WebSocket-Key"]) == 24
            writer.write(b"ping")
            assert await stream.read() == b"ping"
            await stream.send_message("pong")  # a text message arrives as its bytes
            assert await reader.readexactly(4) == b"pong"
            writer.write_eof()
            assert await stream.read() == b""  # the client's EOF is the close frame
            await stream.aclose()
            assert await reader.read() == b""
            writer.close()


async def test_no_listener_and_unknown_listener_failures_reset_promptly(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async with make_relay(ingress=[ingress()]) as relay:
        reader, writer = await open_ingress(relay)
        with caplog.at_level(logging.WARNING, "hybridrelay.refused"):
            assert await read_until_closed(reader, seconds=5) == b""
        writer.close()
    assert "There are no listeners connected" in caplog.text


async def test_destination_failure_resets_the_client(make_relay: RelayFactory) -> None:
    """The edge cannot reach its destination and closes with an error code: the client sees
    a reset (or an immediate close), never a clean EOF after partial data."""
    async with make_relay(ingress=[ingress()]) as relay, tcp_server() as dead:
        port = dead.port
        assert dead.server is not None
        dead.server.close()
        await dead.server.wait_closed()
        async with running(make_config(relay, remote=[f"hc:127.0.0.1:{port}"])) as edge:
            await edge.started.wait()
            reader, writer = await open_ingress(relay)
            writer.write(b"hello")
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                async with asyncio.timeout(10):
                    await reader.readexactly(1)
            writer.close()


async def test_allow_list_and_connection_limit(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    entries = [ingress(allow=["10.0.0.0/8"]), ingress(allow=["127.0.0.0/8"], max_connections=1)]
    async with make_relay(ingress=entries) as relay, tcp_server() as dest:
        async with running(make_config(relay, remote=[f"hc:127.0.0.1:{dest.port}"])) as edge:
            await edge.started.wait()
            with caplog.at_level(logging.WARNING, "hybridrelay.server"):
                reader, writer = await open_ingress(relay, 0)
                assert await read_until_closed(reader) == b""
                writer.close()
                assert "not in the allow-list" in caplog.text
                first_reader, first_writer = await open_ingress(relay, 1)
                first_writer.write(b"1")
                assert await first_reader.readexactly(1) == b"1"
                reader, writer = await open_ingress(relay, 1)
                assert await read_until_closed(reader) == b""
                writer.close()
                assert "max_connections 1 reached" in caplog.text
            first_writer.close()
            await eventually(lambda: relay.server.ingress[1].connections == 0)
            reader, writer = await open_ingress(relay, 1)  # the slot is free again
            assert await exchange(reader, writer, b"2") == b"2"
            writer.close()
    assert dest.connections == 2


async def test_backpressure_reaches_the_client(make_relay: RelayFactory) -> None:
    resume = asyncio.Event()
    received = bytearray()

    async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await resume.wait()
        while data := await reader.read(1 << 20):
            received.extend(data)
        writer.close()

    async with make_relay(ingress=[ingress()]) as relay, tcp_server(slow_reader) as dest:
        async with running(make_config(relay, remote=[f"hc:127.0.0.1:{dest.port}"])) as edge:
            await edge.started.wait()
            reader, writer = await open_ingress(relay)
            payload = random_bytes(64 << 20)
            writer.write(payload)
            # Nothing on the path buffers without bound: 64 MiB cannot all leave the client.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(2):
                    await writer.drain()
            resume.set()
            async with asyncio.timeout(30):
                await writer.drain()
            writer.write_eof()
            async with asyncio.timeout(30):
                assert await reader.read() == b""
            writer.close()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


async def test_a_fast_client_is_read_no_faster_than_the_listener_takes_it(
    make_relay: RelayFactory,
) -> None:
    """uvloop reads a new connection even though connection_made paused it, and what came
    before the listener accepted is written to it at once: the relay still reads the client
    only as fast as the listener's leg drains (its write buffers stay near the high-water
    mark, not the size of what the client sent)."""

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1 << 20):
            pass
        writer.close()

    peak = 0
    async with make_relay(ingress=[ingress()]) as relay, tcp_server(sink) as dest:
        async with running(make_config(relay, remote=[f"hc:127.0.0.1:{dest.port}"])) as edge:
            await edge.started.wait()
            reader, writer = await open_ingress(relay)
            chunk = bytes(1 << 20)
            for _ in range(128):
                writer.write(chunk)
                await writer.drain()
                sizes = [leg.transport.get_write_buffer_size() for leg in relay.server._legs]
                peak = max([peak, *sizes])
            writer.write_eof()
            async with asyncio.timeout(30):
                assert await reader.read() == b""
            writer.close()
    assert peak <= 4 << 20, f"{peak} bytes queued on the relay"


async def test_bytes_and_eof_that_come_before_the_listener_accepts(
    make_relay: RelayFactory,
) -> None:
    """A client that sends its request and its EOF at once: both reach the destination even
    when the relay reads them before the listener accepted (uvloop)."""
    async with make_relay(ingress=[ingress()]) as relay, tcp_server() as dest:
        async with running(make_config(relay, remote=[f"hc:127.0.0.1:{dest.port}"])) as edge:
            await edge.started.wait()
            for _ in range(5):
                reader, writer = await open_ingress(relay)
                writer.write(b"ping")
                writer.write_eof()
                async with asyncio.timeout(10):
                    assert await reader.read() == b"ping"
                writer.close()


async def test_many_connections_leave_nothing_behind_and_shutdown_resets(
    make_relay: RelayFactory,
) -> None:
    async with make_relay(ingress=[ingress()]) as relay, tcp_server() as dest:
        async with running(make_config(relay, remote=[f"hc:127.0.0.1:{dest.port}"])) as edge:
            await edge.started.wait()

            async def one(i: int) -> bytes:
                reader, writer = await open_ingress(relay)
                try:
                    return await exchange(reader, writer, b"%d" % i)
                finally:
                    writer.close()

            results = await asyncio.gather(*(one(i) for i in range(100)))
            assert results == [b"%d" % i for i in range(100)]
            await eventually(lambda: not relay.server._legs)
            assert relay.server.ingress[0].connections == 0
            # An open connection at shutdown is ended, and the relay stops in bounded time.
            reader, writer = await open_ingress(relay)
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            async with asyncio.timeout(15):
                await relay.server.aclose()
                assert await read_until_closed(reader) == b""
            writer.close()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"hybrid_connection": "hc"}, "ingress[0].listen: required"),
        ({"listen": "127.0.0.1:70000", "hybrid_connection": "hc"}, "port must be 0 to 65535"),
        ({"listen": "example.com:22", "hybrid_connection": "hc"}, "host must be an IP address"),
        ({"listen": 2222, "hybrid_connection": "other"}, "not a configured hybrid connection"),
        ({"listen": 2222, "hybrid_connection": "hc", "allow": ["x"]}, "not an address or CIDR"),
        ({"listen": 2222, "hybrid_connection": "hc", "port": 1}, "unknown key(s): ingress[0].port"),
        ({"listen": 2222, "hybrid_connection": "hc", "port_name": ""}, "1 to 255 bytes"),
    ],
)
def test_config_errors_name_the_key(entry: dict[str, Any], message: str) -> None:
    document = {
        "server": {"plaintext": True},
        "namespace": {"hybrid_connections": [{"name": "hc"}]},
        "ingress": [entry],
    }
    with pytest.raises(ConfigurationError) as info:
        RelayConfig.from_dict(document)
    assert message in str(info.value)


def test_config_defaults_and_duplicates() -> None:
    document: dict[str, Any] = {
        "server": {"plaintext": True},
        "namespace": {"hybrid_connections": [{"name": "hc"}]},
        "ingress": [{"listen": 2222, "hybrid_connection": "hc"}],
    }
    (entry,) = RelayConfig.from_dict(document).ingress
    assert (entry.host, entry.port, entry.port_name, entry.allow) == ("127.0.0.1", 2222, None, ())
    assert entry.allows("192.0.2.1")
    document["ingress"].append({"listen": "127.0.0.1:2222", "hybrid_connection": "hc"})
    with pytest.raises(ConfigurationError, match="already used above"):
        RelayConfig.from_dict(document)


async def test_a_port_in_use_is_a_configuration_error(make_relay: RelayFactory) -> None:
    async with tcp_server() as taken:
        with pytest.raises(ConfigurationError, match="cannot listen"):
            async with make_relay(ingress=[ingress(listen=f"127.0.0.1:{taken.port}")]):
                pass


async def test_listener_close_after_an_unseen_client_reset(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The listener half-closes when the client has reset but the relay has not read the RST
    yet: the half-close fails inside the read callback of the listener's leg; the client's
    connection is dropped quietly, and the listener still gets its answer."""
    async with make_relay(ingress=[ingress()]) as relay:
        async with open_listener(relay) as listener:
            reader, writer = await open_ingress(relay)
            async with asyncio.timeout(10):
                stream = await listener.accept_connection()
            assert stream is not None
            writer.write(b"hi")
            assert await stream.read() == b"hi"
            (leg,) = relay.server.ingress[0]._legs
            leg.transport.pause_reading()  # the reset stays unread, as under load
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST
            await wait_until_reset(leg.transport.get_extra_info("socket"))
            with caplog.at_level(logging.ERROR):
                await stream.write_eof()  # -> the relay's half-close of the reset socket
                async with asyncio.timeout(10):
                    assert await stream.read() == b""
                await stream.aclose()
                await eventually(lambda: not relay.server._legs)
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
