"""The connection gate (issue 17 findings 5, 6): caps in all and per source address, and the
first request head bounded in time and size. Real sockets, a real aiohttp server behind it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web

from hybridrelay.server.connection_gate import ConnectionGate, GateLimits
from tests.conftest import RelayFactory, eventually

pytestmark = pytest.mark.both_loops

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


async def hello(request: web.BaseRequest) -> web.StreamResponse:
    return web.Response(text="hello")


@asynccontextmanager
async def gated_server(**overrides: float) -> AsyncIterator[tuple[ConnectionGate, int]]:
    settings = {
        "max_connections": 100,
        "max_connections_per_source": 100,
        "header_timeout": 10.0,
        "max_header_bytes": 1024,
    } | overrides
    limits = GateLimits(
        max_connections=int(settings["max_connections"]),
        max_connections_per_source=int(settings["max_connections_per_source"]),
        header_timeout=float(settings["header_timeout"]),
        max_header_bytes=int(settings["max_header_bytes"]),
    )
    gate = ConnectionGate(lambda: limits)
    handler = web.Server(hello)
    server = await asyncio.get_running_loop().create_server(gate.wrap(handler), "127.0.0.1", 0)
    try:
        yield gate, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await handler.shutdown(1.0)
        await server.wait_closed()


OPENED: list[asyncio.StreamWriter] = []


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    yield
    for writer in OPENED:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for w in OPENED), return_exceptions=True)
    OPENED.clear()


async def connect(
    port: int, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    OPENED.append(writer)
    return reader, writer


async def closed_without_answer(reader: asyncio.StreamReader) -> bool:
    async with asyncio.timeout(10):
        return await reader.read() == b""


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(REQUEST)
    await writer.drain()
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0]


@pytest.mark.timeout(30)
async def test_the_connection_cap_counts_until_a_connection_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with gated_server(max_connections=3) as (gate, port):
        held = [await connect(port) for _ in range(3)]
        # All three handed over to aiohttp by a whole request (kept alive): all three count.
        for client in held:
            assert await answer(*client) == b"HTTP/1.1 200 OK"
        await eventually(lambda: gate.open_connections == 3)
        reader, _ = await connect(port)
        assert await closed_without_answer(reader)  # refused before a byte was read
        assert "connections refused at the gate: 1 over max_connections" in caplog.text
        # The handed-over one closes: its place is free again (learned without any protocol
        # telling the gate).
        held[0][1].close()

        async def admitted() -> bool:
            reader, writer = await connect(port)
            try:
                return await answer(reader, writer) == b"HTTP/1.1 200 OK"
            except (ConnectionError, asyncio.IncompleteReadError):
                return False
            finally:
                writer.close()

        for _ in range(50):
            if await admitted():
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the closed connection's place was never given back")
        for _, writer in held[1:]:
            writer.close()


@pytest.mark.timeout(30)
async def test_at_the_cap_the_oldest_idle_connection_makes_room() -> None:
    """A flood of idle connections (from many addresses) cannot lock out a client that sends
    its request: the oldest connection that has sent no whole head yet is closed for it."""
    async with gated_server(max_connections=3) as (gate, port):
        idle = [await connect(port, source=f"127.0.0.{i + 2}") for i in range(3)]
        await eventually(lambda: gate.open_connections == 3)
        newcomer = await connect(port)
        assert await answer(*newcomer) == b"HTTP/1.1 200 OK"
        assert await closed_without_answer(idle[0][0])  # the oldest one
        assert gate.evicted == 1 and gate.open_connections == 3


@pytest.mark.timeout(30)
async def test_one_source_cannot_take_every_connection() -> None:
    async with gated_server(max_connections_per_source=2) as (gate, port):
        held = [await connect(port) for _ in range(2)]
        await eventually(lambda: gate.open_connections == 2)
        reader, _ = await connect(port)
        assert await closed_without_answer(reader)
        # Another address still gets in (Linux routes all of 127/8 to loopback).
        other = await connect(port, source="127.0.0.2")
        assert await answer(*other) == b"HTTP/1.1 200 OK"
        for _, writer in [*held, other]:
            writer.close()


@pytest.mark.timeout(30)
async def test_a_head_that_does_not_finish_in_time_gets_408() -> None:
    async with gated_server(header_timeout=0.2) as (gate, port):
        reader, writer = await connect(port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
        async with asyncio.timeout(10):
            response = await reader.read()
        assert response.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert b"Server: hybridrelay\r\n" in response
        idle_reader, _ = await connect(port)  # says nothing at all: closed, no answer
        assert await closed_without_answer(idle_reader)
        await eventually(lambda: gate.open_connections == 0)


@pytest.mark.timeout(30)
async def test_a_head_over_the_byte_bound_gets_431() -> None:
    async with gated_server(max_header_bytes=1024) as (_, port):
        reader, writer = await connect(port)
        writer.write(b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"a" * 2000 + b"\r\n\r\n")
        async with asyncio.timeout(10):
            response = await reader.read()
        assert response.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


@pytest.mark.timeout(30)
async def test_a_head_in_pieces_is_handed_over_whole_with_what_follows() -> None:
    """The blank line split across reads, and a second request pipelined behind the first."""
    async with gated_server() as (_, port):
        reader, writer = await connect(port)
        for piece in (
            b"GET / HTTP/1.1\r\nHost: x\r",
            b"\n\r",
            b"\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        ):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)  # separate reads on the server (not a readiness wait)
        async with asyncio.timeout(10):
            first = await reader.readuntil(b"hello")
            second = await reader.readuntil(b"hello")
        assert first.startswith(b"HTTP/1.1 200 OK") and second.startswith(b"HTTP/1.1 200 OK")
        writer.close()


# -- the relay behind its gate -----------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_the_relay_caps_idle_connections_per_source_and_keeps_serving_others(
    make_relay: RelayFactory,
) -> None:
    """Idle connections from one address (what exhausted the relay's descriptors) stop at
    the per-source cap; a listener and a sender from another address still work."""
    limits = {"max_connections_per_source": 5, "header_timeout": 30.0}
    async with make_relay(limits=limits) as relay:
        port = relay.server.port
        for _ in range(5):
            await connect(port)
        await eventually(lambda: relay.server.gate.open_connections == 5)
        reader, _ = await connect(port)
        assert await closed_without_answer(reader)
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=connector) as s:
            control = await s.ws_connect(
                f"{relay.base_url}/$hc/hc?sb-hc-action=listen",
                headers={"ServiceBusAuthorization": relay.token("hc")},
            )
            sender = asyncio.create_task(
                s.ws_connect(
                    f"{relay.base_url}/$hc/hc?sb-hc-action=connect",
                    headers={"ServiceBusAuthorization": relay.token("hc")},
                )
            )
            accept = json.loads((await control.receive(timeout=10)).data)["accept"]
            rendezvous = await s.ws_connect(accept["address"])
            ws = await sender
            await ws.send_bytes(b"through")
            assert await rendezvous.receive_bytes(timeout=10) == b"through"
            await asyncio.gather(ws.close(), rendezvous.close(), control.close())


@pytest.mark.timeout(60)
async def test_the_relay_answers_a_slow_head_with_408(make_relay: RelayFactory) -> None:
    async with make_relay(limits={"header_timeout": 0.3}) as relay:
        reader, writer = await connect(relay.server.port)
        writer.write(b"GET /$hc/hc?sb-hc-action=listen HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        async with asyncio.timeout(10):
            response = await reader.read()
        assert response.startswith(b"HTTP/1.1 408 ")


@pytest.mark.timeout(60)
async def test_the_relay_s_ingress_ports_are_capped_too(make_relay: RelayFactory) -> None:
    ingress = [{"listen": "127.0.0.1:0", "hybrid_connection": "hc"}]
    async with make_relay(limits={"max_connections_per_source": 2}, ingress=ingress) as relay:
        address = relay.server.ingress[0].address
        assert address is not None
        for _ in range(2):
            await connect(address[1])
        reader, _ = await connect(address[1])
        assert await closed_without_answer(reader)
