"""Keep-alive probes on the raw TCP hops (src/hybridrelay/tcp_keepalive.py): the relay's own
``ingress:`` port and a ``bridge -L`` port arm the kernel's keep-alive timer on every
connection they accept, paced by their ``keep_alive_interval``.

These tests read what the kernel reports of the accepted socket in ``/proc/net/tcp``: which
timer is armed (2 is keep-alive) and when it fires. Without the option an idle established
socket has none. That a dropped link is found this way is shown with packets really dropped
in tests/reliability/test_dropped_packets.py."""

from __future__ import annotations

import asyncio
import socket
import sys
from contextlib import suppress
from pathlib import Path

import pytest

from hybridrelay.tcp_keepalive import KEEPALIVE_PROBES, keepalive_options
from tests.bridge.helpers import make_config, running, tcp_server
from tests.conftest import RelayFactory, eventually

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net/tcp"),
]

#: The kernel reports timers in clock ticks (USER_HZ).
TICKS = 100


def test_options_follow_the_interval() -> None:
    assert keepalive_options(30.0) == {
        "TCP_KEEPIDLE": 30,
        "TCP_KEEPINTVL": 10,
        "TCP_KEEPCNT": KEEPALIVE_PROBES,
    }
    # Below a second the kernel's unit wins: whole seconds, at least one.
    assert keepalive_options(0.2) == {
        "TCP_KEEPIDLE": 1,
        "TCP_KEEPINTVL": 1,
        "TCP_KEEPCNT": KEEPALIVE_PROBES,
    }


def accepted_timer(server_port: int, client_port: int) -> tuple[int, float] | None:
    """(timer kind, seconds until it fires) of the socket the server accepted from the
    client, as the kernel reports it; None while it is not listed."""
    local, remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        if fields[1] == local and fields[2] == remote:
            kind, when = fields[5].split(":")
            return int(kind, 16), int(when, 16) / TICKS
    return None


async def assert_keepalive_armed(server_port: int, writer: asyncio.StreamWriter) -> None:
    client_port = writer.get_extra_info("sockname")[1]
    # Idle now: the keep-alive timer is the one armed, due within the interval (2 s).
    await eventually(lambda: (accepted_timer(server_port, client_port) or (0,))[0] == 2)
    timer = accepted_timer(server_port, client_port)
    assert timer is not None and 0 < timer[1] <= 2.0, timer


async def test_the_relay_ingress_port_arms_keepalive(make_relay: RelayFactory) -> None:
    ingress = {"listen": "127.0.0.1:0", "hybrid_connection": "hc"}
    async with (
        make_relay(ingress=[ingress], limits={"keep_alive_interval": 2.0}) as relay,
        tcp_server() as dest,
        running(make_config(relay, remote=[f"hc:127.0.0.1:{dest.port}"])) as edge,
    ):
        await edge.started.wait()
        address = relay.server.ingress[0].address
        assert address is not None
        reader, writer = await asyncio.open_connection(*address[:2])
        try:
            writer.write(b"x")  # through the tunnel and back, which stays open
            assert await reader.readexactly(1) == b"x"
            await assert_keepalive_armed(address[1], writer)
        finally:
            writer.close()
            await writer.wait_closed()


async def test_a_bridge_l_port_arms_keepalive(make_relay: RelayFactory) -> None:
    async with (
        make_relay() as relay,
        tcp_server() as dest,
        running(make_config(relay, remote=[f"hc:127.0.0.1:{dest.port}"])) as edge,
        running(
            make_config(relay, local=["127.0.0.1:0:hc"], document={"keep_alive_interval": 2.0})
        ) as ingress,
    ):
        await edge.started.wait()
        await ingress.started.wait()
        host, port = ingress.ingress_address(0)[:2]
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(b"x")  # through the tunnel and back, which stays open
            assert await reader.readexactly(1) == b"x"
            await assert_keepalive_armed(port, writer)
        finally:
            writer.close()
            await writer.wait_closed()


async def test_a_plain_socket_has_no_timer() -> None:
    """The check itself can fail: an accepted socket without the option reports none."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0, family=socket.AF_INET)
    async with server:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        await eventually(lambda: bool(accepted))
        timer = accepted_timer(port, writer.get_extra_info("sockname")[1])
        assert timer is not None and timer[0] == 0, timer
        writer.close()
        accepted[0].close()


STALL_INTERVAL = 1.0


async def test_a_client_that_stops_reading_is_kept(make_relay: RelayFactory) -> None:
    """A live client of an ``ingress:`` port and of a ``bridge -L`` port that reads nothing
    for five keep-alive intervals while the destination writes (its window closed, the
    kernel probing it) keeps its connection and then gets every byte. ``TCP_USER_TIMEOUT``
    would have dropped both after 4 s: Linux applies it to a closed window too."""
    written: list[int] = []
    stop = asyncio.Event()

    async def write_until_stopped(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(written)
        written.append(0)
        chunk = b"\x5a" * 65536
        with suppress(ConnectionError):
            while not stop.is_set():
                writer.write(chunk)
                await writer.drain()
                written[index] += len(chunk)
            writer.close()

    ingress = {"listen": "127.0.0.1:0", "hybrid_connection": "hc"}
    limits = {"keep_alive_interval": STALL_INTERVAL}
    async with (
        make_relay(ingress=[ingress], limits=limits) as relay,
        tcp_server(write_until_stopped) as dest,
        running(make_config(relay, remote=[f"hc:127.0.0.1:{dest.port}"])),
        running(
            make_config(relay, local=["127.0.0.1:0:hc"], document={"keep_alive_interval": 1.0})
        ) as agent,
    ):
        address = relay.server.ingress[0].address
        assert address is not None
        clients = [
            await asyncio.open_connection(*address[:2]),
            await asyncio.open_connection(*agent.ingress_address(0)[:2]),
        ]
        try:
            await eventually(lambda: len(written) == 2)
            await asyncio.sleep(5 * STALL_INTERVAL)  # the span under test, not a readiness wait
            stop.set()  # the destination closes its connections: each client reads to EOF
            received = []
            for reader, _ in clients:
                received.append(0)
                async with asyncio.timeout(20):
                    while data := await reader.read(1 << 20):
                        received[-1] += len(data)
            assert all(received) and sum(received) == sum(written), (received, written)
        finally:
            for _, writer in clients:
                writer.transport.abort()
