"""Warm connections (transport/warm.py): the connections to the relay that our client sockets'
handshakes take instead of connecting, against a raw server that counts its connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from hybridrelay.protocol.websocket import accept_key
from hybridrelay.transport import frames_ws
from hybridrelay.transport.warm import WarmPool
from tests.client.ws_peers import connect_options
from tests.conftest import eventually

pytestmark = [pytest.mark.timeout(30), pytest.mark.both_loops]


@dataclass
class CountingServer:
    """Answers each upgrade with 101; records on which connection each request came."""

    url: str = ""
    accepted: int = 0
    upgraded_on: list[int] = field(default_factory=list)
    closed: int = 0
    idle: dict[int, asyncio.StreamWriter] = field(default_factory=dict)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.accepted
        self.accepted += 1
        self.idle[index] = writer
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.idle.pop(index, None)
            self.upgraded_on.append(index)
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                + accept_key(key.decode()).encode()
                + b"\r\n\r\n"
            )
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.idle.pop(index, None)
            self.closed += 1
            writer.close()

    def close_idle(self) -> None:
        for writer in list(self.idle.values()):
            writer.close()


@asynccontextmanager
async def counting_server() -> AsyncIterator[CountingServer]:
    record = CountingServer()
    server = await asyncio.start_server(record.handle, "127.0.0.1", 0)
    record.url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/x"
    try:
        yield record
    finally:
        server.close()
        record.close_idle()


async def connect(server: CountingServer, pool: WarmPool[frames_ws.FrameSocket]) -> None:
    socket = await frames_ws.connect(server.url, **connect_options(warm=pool))
    socket.abort()


async def test_an_address_used_once_is_not_warmed() -> None:
    pool: WarmPool[frames_ws.FrameSocket] = WarmPool(size=2, ttl=10)
    async with counting_server() as server:
        await connect(server, pool)
        assert len(pool) == 0 and pool.opening == 0 and server.accepted == 1
    await pool.aclose()


async def test_handshakes_take_warm_connections_once_the_address_is_in_use() -> None:
    pool: WarmPool[frames_ws.FrameSocket] = WarmPool(size=2, ttl=10)
    async with counting_server() as server:
        await connect(server, pool)
        await connect(server, pool)  # the second use within the TTL warms the address
        await eventually(lambda: len(pool) == 2)
        assert server.accepted == 4
        for _ in range(3):
            before = server.accepted
            await connect(server, pool)
            assert server.upgraded_on[-1] < before  # on a connection opened ahead
            await eventually(lambda: len(pool) == 2)  # and one more opened behind it
        assert server.upgraded_on[:2] == [0, 1]
        await pool.aclose()
        await eventually(lambda: server.closed == server.accepted)


async def test_a_warm_connection_the_server_closed_is_not_used() -> None:
    pool: WarmPool[frames_ws.FrameSocket] = WarmPool(size=2, ttl=10)
    async with counting_server() as server:
        await connect(server, pool)
        await connect(server, pool)
        await eventually(lambda: len(pool) == 2)
        server.close_idle()  # an idle timeout on the server's side
        await eventually(lambda: server.closed == server.accepted)
        await connect(server, pool)  # on a new connection, without an error
        assert server.upgraded_on[-1] >= 4
        await pool.aclose()


async def test_a_handshake_on_a_connection_closed_under_it_is_retried() -> None:
    """The server closes the warm connection just as the request goes out (not yet seen by
    the client): nothing came back on it, so the handshake is made on a new connection."""
    pool: WarmPool[frames_ws.FrameSocket] = WarmPool(size=1, ttl=10)
    async with counting_server() as server:
        await connect(server, pool)
        await connect(server, pool)
        await eventually(lambda: len(pool) == 1)
        ((warm, _),) = pool._idle[next(iter(pool._idle))]
        assert warm._transport is not None
        server.close_idle()
        await eventually(lambda: server.closed == server.accepted)
        # The client has not processed the close yet only if we get there first: force the
        # case by taking the connection as usable whatever its state.
        warm.warm_usable = lambda: True  # type: ignore[method-assign]
        await connect(server, pool)
        assert server.upgraded_on[-1] >= 3
        await pool.aclose()


async def test_unused_warm_connections_are_closed_after_the_ttl() -> None:
    pool: WarmPool[frames_ws.FrameSocket] = WarmPool(size=2, ttl=0.3)
    async with counting_server() as server:
        await connect(server, pool)
        await connect(server, pool)
        await eventually(lambda: server.accepted == 4)
        await eventually(lambda: server.closed == 4 and len(pool) == 0)
        await pool.aclose()


async def test_failed_warm_connects_are_quiet_and_counted_down() -> None:
    pool: WarmPool[frames_ws.FrameSocket] = WarmPool(size=2, ttl=10)
    calls = 0

    async def refused() -> frames_ws.FrameSocket:
        nonlocal calls
        calls += 1
        raise ConnectionRefusedError

    assert pool.take("a", refused) is None
    assert pool.take("a", refused) is None  # in use: two are opened, and both fail
    await eventually(lambda: pool.opening == 0)
    assert calls == 2 and len(pool) == 0
    await pool.aclose()
    assert pool.take("a", refused) is None and calls == 2  # closed: nothing more is opened
