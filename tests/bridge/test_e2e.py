"""The bridge end to end: ingress agent -> relay -> edge agent -> destination, in process."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest

from hybridrelay.bridge.agent import BridgeAgent
from hybridrelay.bridge.udp import UdpIngress
from hybridrelay.client import HybridConnectionClient, SharedAccessKeyTokenProvider
from hybridrelay.exceptions import ConfigurationError, RelayError
from hybridrelay.protocol.azbridge import Mode, encode_preamble
from tests.bridge.helpers import (
    UdpClient,
    UdpEcho,
    digest_handler,
    exchange,
    make_config,
    random_bytes,
    read_until_closed,
    running,
    tcp_server,
    unix_server,
)
from tests.conftest import ROOT_KEY, ROOT_KEY_NAME, Relay, eventually


def _exists(path: str) -> bool:
    return os.path.exists(path)


async def open_to(agent: BridgeAgent, index: int = 0) -> tuple[Any, Any]:
    host, port = agent.ingress_address(index)[:2]
    return await asyncio.open_connection(host, port)


async def test_tcp_8_mib_each_way(relay: Relay) -> None:
    async with tcp_server() as dest:
        config = make_config(relay, ["0:hc"], [f"hc:127.0.0.1:{dest.port}"])
        async with running(config) as edge_and_ingress:
            payload = random_bytes(8 << 20)
            reader, writer = await open_to(edge_and_ingress)
            echoed = await exchange(reader, writer, payload)
            writer.close()
            assert len(echoed) == len(payload)
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert dest.connections == 1


async def test_half_close_client_still_gets_the_reply(relay: Relay) -> None:
    async with tcp_server(digest_handler) as dest:
        config = make_config(relay, ["0:hc"], [f"hc:127.0.0.1:{dest.port}"])
        async with running(config) as agent:
            payload = random_bytes(3 << 20)
            reader, writer = await open_to(agent)
            writer.write(payload)
            await writer.drain()
            writer.write_eof()  # the destination answers only after our EOF
            async with asyncio.timeout(20):
                reply = await reader.read()
            writer.close()
    assert reply[:32] == hashlib.sha256(payload).digest()
    assert reply[32:] == b"z" * (1 << 20)


async def test_separate_agents_for_ingress_and_edge(relay: Relay) -> None:
    async with tcp_server() as dest:
        edge_config = make_config(relay, remote=[f"hc:127.0.0.1:{dest.port}"])
        ingress_config = make_config(relay, local=["0:hc"])
        async with running(edge_config), running(ingress_config) as ingress:
            reader, writer = await open_to(ingress)
            assert await exchange(reader, writer, b"hello") == b"hello"
            writer.close()


async def test_fifty_concurrent_connections(relay: Relay) -> None:
    async with tcp_server() as dest:
        config = make_config(relay, ["0:hc"], [f"hc:127.0.0.1:{dest.port}"])
        async with running(config) as agent:

            async def one(i: int) -> bool:
                payload = random_bytes(64 * 1024 + i)
                reader, writer = await open_to(agent)
                try:
                    return await exchange(reader, writer, payload) == payload
                finally:
                    writer.close()

            results = await asyncio.gather(*(one(i) for i in range(50)))
    assert all(results)
    assert dest.connections == 50


async def test_port_names_select_routes(relay: Relay) -> None:
    async with tcp_server(banner=b"A") as a, tcp_server(banner=b"B") as b:
        config = make_config(
            relay,
            ["0/alpha:hc", "0/beta:hc"],
            [f"hc:alpha/127.0.0.1:{a.port}", f"hc:beta/127.0.0.1:{b.port}"],
        )
        async with running(config) as agent:
            for index, banner in ((0, b"A"), (1, b"B"), (0, b"A")):
                reader, writer = await open_to(agent, index)
                assert await exchange(reader, writer, b"-x-") == banner + b"-x-"
                writer.close()
    assert (a.connections, b.connections) == (2, 1)


async def test_unknown_port_name_is_rejected(relay: Relay) -> None:
    async with tcp_server() as dest:
        config = make_config(relay, ["0/nope:hc"], [f"hc:ssh/127.0.0.1:{dest.port}"])
        async with running(config) as agent:
            reader, writer = await open_to(agent)
            writer.write(b"anything")
            data = await read_until_closed(reader)
            writer.close()
    assert data == b""
    assert dest.connections == 0


async def test_preamble_rejections_on_the_wire(relay: Relay) -> None:
    """Raw SDK sender against the edge: bad version and mode mismatches get azbridge's codes."""
    async with tcp_server() as dest:
        config = make_config(
            relay, remote=[f"hc:tcp/127.0.0.1:{dest.port}", "hc:dns/127.0.0.1:53/udp"]
        )
        async with running(config):
            client = HybridConnectionClient(
                f"ws://127.0.0.1:{relay.server.port}",
                "hc",
                SharedAccessKeyTokenProvider(ROOT_KEY_NAME, ROOT_KEY),
            )
            async with client:
                cases = [
                    (b"\x02\x00\x00\x03tcp", b"\x00\x00\x00"),
                    (encode_preamble("tcp", Mode.DATAGRAM), b"\x00\x00\xff"),
                    (encode_preamble("dns", Mode.STREAM), b"\x00\x00\x01"),
                    (encode_preamble("tcp", Mode.STREAM), b"\x01\x00\x00"),
                ]
                for preamble, expected in cases:
                    stream = await client.create_connection()
                    await stream.write(preamble)
                    reply = b""
                    async with asyncio.timeout(10):
                        while len(reply) < 3 and (chunk := await stream.read(3 - len(reply))):
                            reply += chunk
                    assert reply == expected, preamble
                    await stream.aclose()
    assert dest.connections == 1


async def test_destination_refuses_client_sees_prompt_close(relay: Relay) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]  # bound, never listening: connections are refused
    try:
        config = make_config(relay, ["0:hc"], [f"hc:127.0.0.1:{closed_port}"])
        async with running(config) as agent:
            reader, writer = await open_to(agent)
            writer.write(b"hello")
            data = await read_until_closed(reader)
            writer.close()
        assert data == b""
    finally:
        probe.close()


async def test_udp_flows(relay: Relay) -> None:
    loop = asyncio.get_running_loop()
    echo_transport, echo = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
    try:
        port = echo_transport.get_extra_info("sockname")[1]
        config = make_config(relay, ["0/dns/udp:hc"], [f"hc:dns/127.0.0.1:{port}/udp"])
        async with running(config) as agent:
            target = agent.ingress_address(0)
            clients = []
            for _ in range(4):
                transport, client = await loop.create_datagram_endpoint(
                    UdpClient, local_addr=("127.0.0.1", 0)
                )
                clients.append((transport, client))
            try:
                for i, (transport, client) in enumerate(clients):
                    for j in range(5):
                        payload = f"{i}:{j}".encode() * (j + 1)
                        transport.sendto(payload, target)
                        async with asyncio.timeout(10):
                            assert await client.received.get() == b"echo:" + payload
                big = random_bytes(60000)
                clients[0][0].sendto(big, target)
                async with asyncio.timeout(10):
                    assert await clients[0][1].received.get() == b"echo:" + big
            finally:
                for transport, _ in clients:
                    transport.close()
        # One relay connection (and one edge socket) per client flow.
        assert len(echo.sources) == 4
    finally:
        echo_transport.close()


async def test_udp_idle_flow_is_closed_and_reopened(relay: Relay) -> None:
    loop = asyncio.get_running_loop()
    echo_transport, echo = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
    try:
        port = echo_transport.get_extra_info("sockname")[1]
        config = make_config(
            relay,
            ["0/udp:hc"],
            [f"hc:127.0.0.1:{port}/udp"],
            document={"udp_idle_timeout": 0.5},
        )
        async with running(config) as agent:
            target = agent.ingress_address(0)
            transport, client = await loop.create_datagram_endpoint(
                UdpClient, local_addr=("127.0.0.1", 0)
            )
            try:
                transport.sendto(b"one", target)
                async with asyncio.timeout(10):
                    assert await client.received.get() == b"echo:one"
                ingress = agent.ingress[0]
                assert isinstance(ingress, UdpIngress)
                assert ingress.active_flows == 1
                async with asyncio.timeout(10):
                    await ingress.wait_no_flows()
                transport.sendto(b"two", target)
                async with asyncio.timeout(10):
                    assert await client.received.get() == b"echo:two"
            finally:
                transport.close()
        # The edge opened a fresh socket for the second flow.
        assert len(echo.sources) == 2
    finally:
        echo_transport.close()


async def test_unix_sockets_on_both_sides(relay: Relay) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="hrb") as directory:
        dest_path = str(Path(directory) / "dest.sock")
        in_path = str(Path(directory) / "in.sock")
        async with unix_server(dest_path, digest_handler) as dest:
            config = make_config(relay, [f"unix:{in_path}#app:hc"], [f"hc:app/unix:{dest_path}"])
            async with running(config):
                reader, writer = await asyncio.open_unix_connection(in_path)
                payload = random_bytes(1 << 20)
                writer.write(payload)
                writer.write_eof()
                async with asyncio.timeout(20):
                    reply = await reader.read()
                writer.close()
            assert not _exists(in_path)  # removed at shutdown
        assert reply[:32] == hashlib.sha256(payload).digest()
        assert dest.connections == 1


async def test_allow_list_refuses_other_clients(relay: Relay) -> None:
    async with tcp_server() as dest:
        config = make_config(
            relay,
            remote=[f"hc:127.0.0.1:{dest.port}"],
            document={
                "local_forwards": [
                    {"spec": "0:hc", "allow": ["10.0.0.0/8"]},
                    {"spec": "0:hc", "allow": ["127.0.0.0/8"]},
                ]
            },
        )
        async with running(config) as agent:
            reader, writer = await open_to(agent, 0)
            data = await read_until_closed(reader)
            writer.close()
            assert data == b""
            reader, writer = await open_to(agent, 1)
            assert await exchange(reader, writer, b"ok") == b"ok"
            writer.close()
    assert dest.connections == 1


async def test_graceful_shutdown_lets_open_connections_finish(relay: Relay) -> None:
    async with tcp_server() as dest:
        config = make_config(
            relay,
            ["0:hc"],
            [f"hc:127.0.0.1:{dest.port}"],
            document={"shutdown_grace_period": 10},
        )
        agent = BridgeAgent(config)
        async with asyncio.TaskGroup() as group:
            run = group.create_task(agent.run())
            await agent.started.wait()
            host, port = agent.ingress_address(0)[:2]
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"before")
            await writer.drain()
            assert await reader.readexactly(6) == b"before"
            agent.shutdown()
            await asyncio.sleep(0.2)  # let the listening socket close
            with pytest.raises(OSError):
                await asyncio.open_connection(host, port)
            assert not run.done()
            # The open connection still works during the grace period.
            writer.write(b"after")
            await writer.drain()
            assert await reader.readexactly(5) == b"after"
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
            async with asyncio.timeout(10):
                await run


async def test_bind_failure_is_a_configuration_error(relay: Relay) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        port = blocker.getsockname()[1]
        config = make_config(relay, [f"{port}:hc"])
        with pytest.raises(ConfigurationError, match="cannot listen"):
            async with running(config):
                pass
    finally:
        blocker.close()


async def test_edge_for_an_unknown_hybrid_connection_ends_at_start(make_relay: Any) -> None:
    """A 404 at start needs a fix (issue 15): the edge ends at once, naming the forward and
    what to do, instead of retrying forever."""
    async with make_relay(entities=[{"name": "other"}]) as relay:
        config = make_config(relay, remote=["hc:127.0.0.1:9"])
        agent = BridgeAgent(config, retry_schedule=(0.05,))
        async with asyncio.timeout(10):
            with pytest.raises(RelayError, match=r"^-R hc: cannot listen: 404 .*hc create hc"):
                await agent.run()
        assert not agent.started.is_set()


async def test_backpressure_reaches_the_client(relay: Relay) -> None:
    """A destination that does not read stalls the client's writes; nothing is lost after."""
    resume = asyncio.Event()
    received = bytearray()

    async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await resume.wait()
        while data := await reader.read(1 << 20):
            received.extend(data)
        writer.close()

    async with tcp_server(slow_reader) as dest:
        config = make_config(relay, ["0:hc"], [f"hc:127.0.0.1:{dest.port}"])
        async with running(config) as agent:
            reader, writer = await open_to(agent)
            payload = random_bytes(64 << 20)
            writer.write(payload)
            # Everything in between (sockets, bridge, relay) is bounded, so 64 MiB cannot all
            # leave the client while the destination reads nothing.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(2):
                    await writer.drain()
            assert writer.transport.get_write_buffer_size() > 0
            resume.set()
            async with asyncio.timeout(30):
                await writer.drain()
            writer.write_eof()
            async with asyncio.timeout(30):
                assert await reader.read() == b""
            writer.close()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


async def test_several_edges_share_one_hybrid_connection(relay: Relay) -> None:
    async with tcp_server(banner=b"1") as one, tcp_server(banner=b"2") as two:
        edge1 = make_config(relay, remote=[f"hc:127.0.0.1:{one.port}"])
        edge2 = make_config(relay, remote=[f"hc:127.0.0.1:{two.port}"])
        ingress_config = make_config(relay, local=["0:hc"])
        async with running(edge1), running(edge2), running(ingress_config) as ingress:
            for _ in range(24):
                reader, writer = await open_to(ingress)
                reply = await exchange(reader, writer, b".")
                writer.close()
                assert reply in (b"1.", b"2.")
    assert one.connections + two.connections == 24
    assert one.connections > 0 and two.connections > 0


async def test_clients_that_vanish_mid_exchange_leave_no_connection_behind(relay: Relay) -> None:
    """100 clients exchanging data half-close and then reset (as a killed load generator's
    sockets do): every relayed connection ends promptly, none waits for a peer that is gone."""
    async with tcp_server() as dest:
        config = make_config(relay, ["0:hc"], [f"hc:127.0.0.1:{dest.port}"])
        async with running(config) as agent:

            async def vanish(i: int) -> None:
                reader, writer = await open_to(agent)
                for _ in range(5):
                    writer.write(b"x" * 1024)
                    await reader.readexactly(1024)
                writer.write(b"y" * 4096)  # in flight when the client goes
                if i % 2:
                    writer.write_eof()
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()  # RST

            await asyncio.gather(*(vanish(i) for i in range(100)))
            group = agent.ingress[0]._group
            assert group is not None
            await eventually(lambda: len(group) == 0, seconds=8)


async def test_a_burst_of_clients_waits_in_the_accept_queue(relay: Relay) -> None:
    """400 clients connecting at once are all served, none reset by an overflowing backlog."""
    async with tcp_server() as dest:
        config = make_config(relay, ["0:hc"], [f"hc:127.0.0.1:{dest.port}"])
        async with running(config) as agent:
            host, port = agent.ingress_address(0)[:2]
            opened = await asyncio.gather(
                *(asyncio.open_connection(host, port) for _ in range(400))
            )

            async def echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
                try:
                    return await exchange(reader, writer, b"ping") == b"ping"
                finally:
                    writer.close()

            async with asyncio.timeout(60):
                results = await asyncio.gather(*(echo_once(r, w) for r, w in opened))
    assert all(results)
    assert dest.connections == 400
