"""Destinations and clients for the bridge's end-to-end tests (all on loopback, port 0)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

from hybridrelay.bridge.agent import BridgeAgent
from hybridrelay.bridge.config import BridgeConfig, merge_cli, parse_config
from tests.conftest import Relay

#: Retry quickly in tests when an edge listener cannot be opened.
FAST_RETRY = (0.05, 0.1, 0.2)


def make_config(
    relay: Relay,
    local: Sequence[str] = (),
    remote: Sequence[str] = (),
    document: dict[str, Any] | None = None,
) -> BridgeConfig:
    base = parse_config({"shutdown_grace_period": 2, "connect_timeout": 10, **(document or {})})
    return merge_cli(
        base,
        ["-x", relay.connection_string()]
        + (["--ca-file", relay.ca_file] if relay.ca_file else [])
        + [arg for spec in local for arg in ("-L", spec)]
        + [arg for spec in remote for arg in ("-R", spec)],
    )


@asynccontextmanager
async def running(config: BridgeConfig) -> AsyncIterator[BridgeAgent]:
    async with BridgeAgent(config, retry_schedule=FAST_RETRY) as agent:
        yield agent


class Server:
    """A TCP or Unix server whose handler is given; records its connections."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.connections = 0
        self.peers: list[Any] = []

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo as data arrives; half-close after the client's EOF."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def digest_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read to EOF, then answer SHA-256 of everything plus 1 MiB: needs half-close to work."""
    hasher = hashlib.sha256()
    while data := await reader.read(65536):
        hasher.update(data)
    writer.write(hasher.digest() + b"z" * (1 << 20))
    await writer.drain()
    writer.close()


@asynccontextmanager
async def tcp_server(handler: Any = echo_handler, banner: bytes = b"") -> AsyncIterator[Server]:
    record = Server()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record.connections += 1
        record.peers.append(writer.get_extra_info("peername"))
        if banner:
            writer.write(banner)
        await handler(reader, writer)

    # A backlog like the bridge's own (ingress.LISTEN_BACKLOG): bursts must not be reset here.
    record.server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=1024)
    try:
        yield record
    finally:
        record.server.close()


@asynccontextmanager
async def unix_server(path: str, handler: Any = echo_handler) -> AsyncIterator[Server]:
    record = Server()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record.connections += 1
        await handler(reader, writer)

    record.server = await asyncio.start_unix_server(serve, path)
    try:
        yield record
    finally:
        record.server.close()


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes
) -> bytes:
    """Write ``payload`` (then EOF) while reading everything back; both concurrently."""

    async def send() -> None:
        view = memoryview(payload)
        for start in range(0, len(view), 256 * 1024):
            writer.write(view[start : start + 256 * 1024])
            await writer.drain()
        writer.write_eof()

    async with asyncio.TaskGroup() as group:
        group.create_task(send())
        received = group.create_task(reader.read())
    return received.result()


async def read_until_closed(reader: asyncio.StreamReader, seconds: float = 10.0) -> bytes:
    """Everything until the connection closes; a reset counts as a close with nothing more."""
    async with asyncio.timeout(seconds):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


class UdpEcho(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.sources: set[Any] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.sources.add(addr)
        assert self.transport is not None
        self.transport.sendto(b"echo:" + data, addr)


class UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait(data)


def reset(peer: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()


async def wait_until_reset(wrapped: Any) -> None:
    """Until the kernel holds the peer's RST for this socket (asyncio's ``TransportSocket`` or a
    socket), peeked on a duplicate so that asyncio itself has not seen it yet."""
    probe = socket.socket(fileno=os.dup(wrapped.fileno()))
    try:
        for _ in range(500):
            try:
                probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            except ConnectionResetError:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("no RST")
    finally:
        probe.close()
