"""The relay's frame-level splice (transport/splice.py), driven frame by frame by raw WebSocket
peers written here on plain sockets: what crosses, what is answered by the relay, what is
refused."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import aiohttp
import pytest

from hybridrelay.transport import splice as splice_module
from tests.conftest import Relay, RelayFactory, eventually
from tests.server.test_relay_websocket import AUTH, next_accept, open_listener, session
from tests.wsframes import client_frame

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def _client_tls(relay: Relay) -> ssl.SSLContext | None:
    """The client context for a TLS relay (trusting the test CA), None for a plain one."""
    return ssl.create_default_context(cafile=relay.ca_file) if relay.ca_file else None


class RawWebSocket:
    """A WebSocket client on a bare socket that writes exactly the frames it is told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(
        cls, relay: Relay, target: str, headers: dict[str, str], early: bytes = b""
    ) -> RawWebSocket:
        """Upgrade; ``early`` bytes go out in the same write as the request."""
        context = _client_tls(relay)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            relay.server.port,
            ssl=context,
            server_hostname="127.0.0.1" if context else None,
        )
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: 127.0.0.1:{relay.server.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Version: 13",
            f"Sec-WebSocket-Key: {key}",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + early)
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def send(
        self, opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True
    ) -> None:
        self.writer.write(client_frame(opcode, payload, fin=fin, masked=mask))

    async def frame(self) -> tuple[bool, int, bytes]:
        """The next frame from the relay (server frames are never masked)."""
        async with asyncio.timeout(10):
            first, second = await self.reader.readexactly(2)
            assert not second & 0x80, "a server frame must not be masked"
            n = second & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.reader.readexactly(8), "big")
            return bool(first & 0x80), first & 0x0F, await self.reader.readexactly(n)

    async def close_frame(self) -> tuple[int, str]:
        fin, opcode, payload = await self.frame()
        assert (fin, opcode) == (True, OP_CLOSE), (opcode, payload[:50])
        return int.from_bytes(payload[:2], "big"), payload[2:].decode()

    async def at_eof(self) -> bool:
        async with asyncio.timeout(10):
            return await self.reader.read(1) == b""

    def abort(self) -> None:
        self.writer.transport.abort()


@asynccontextmanager
async def raw_pair(
    relay: Relay, entity: str = "hc", listener_early: bytes = b""
) -> AsyncIterator[tuple[RawWebSocket, RawWebSocket]]:
    """(sender, listener): both legs of one relayed connection, as raw peers.

    ``listener_early``: bytes the listener sends with its upgrade request, before any 101."""
    async with session() as s:
        control = await open_listener(s, relay, entity, ssl=_client_tls(relay) or True)
        connecting = asyncio.ensure_future(
            RawWebSocket.open(
                relay, f"/$hc/{entity}?sb-hc-action=connect", {AUTH: relay.token(entity)}
            )
        )
        accept = await next_accept(control)
        address = urlsplit(str(accept["address"]))
        listener = await RawWebSocket.open(
            relay, f"{address.path}?{address.query}", {}, listener_early
        )
        sender = await connecting
        try:
            yield sender, listener
        finally:
            sender.abort()
            listener.abort()
            await control.close()


async def test_frames_cross_unchanged_and_pings_are_answered_by_the_relay(relay: Relay) -> None:
    async with raw_pair(relay) as (sender, listener):
        sender.send(OP_TEXT, b"Hel", fin=False)
        sender.send(OP_PING, b"are you there")  # allowed between fragments (RFC 6455 5.4)
        sender.send(OP_CONT, "lo ✓".encode())
        sender.send(OP_BINARY, b"\x00" * 70_000)
        assert await sender.frame() == (True, OP_PONG, b"are you there")
        assert await listener.frame() == (False, OP_TEXT, b"Hel")
        assert await listener.frame() == (True, OP_CONT, "lo ✓".encode())
        assert await listener.frame() == (True, OP_BINARY, b"\x00" * 70_000)
        listener.send(OP_PING, b"x")
        listener.send(OP_BINARY, b"")
        assert await listener.frame() == (True, OP_PONG, b"x")
        assert await sender.frame() == (True, OP_BINARY, b"")  # the ping stayed on its leg


async def test_close_codes_cross_and_the_other_direction_keeps_flowing(relay: Relay) -> None:
    async with raw_pair(relay) as (sender, listener):
        sender.send(OP_CLOSE, (4001).to_bytes(2, "big") + b"done sending")
        assert await listener.close_frame() == (4001, "done sending")
        listener.send(OP_BINARY, b"still answering")
        assert await sender.frame() == (True, OP_BINARY, b"still answering")
        listener.send(OP_CLOSE, (1000).to_bytes(2, "big"))
        assert await sender.close_frame() == (1000, "")
        assert await sender.at_eof() and await listener.at_eof()


async def test_listener_may_speak_first(relay: Relay) -> None:
    """Bytes the listener sends right behind its upgrade request, before the sender's upgrade is
    answered, reach the sender (they wait in the relay's socket, not in a buffer of ours)."""
    banner = client_frame(OP_TEXT, b"banner")
    async with raw_pair(relay, listener_early=banner) as (sender, _listener):
        assert await sender.frame() == (True, OP_TEXT, b"banner")


async def test_protocol_violation_closes_both_legs(relay: Relay) -> None:
    async with raw_pair(relay) as (sender, listener):
        sender.send(OP_BINARY, b"not masked", mask=False)
        assert (await sender.close_frame())[0] == 1002
        assert (await listener.close_frame())[0] == 1011
        assert await sender.at_eof()
        listener.send(OP_CLOSE, (1000).to_bytes(2, "big"))
        assert await listener.at_eof()


async def test_message_too_big(make_relay: RelayFactory) -> None:
    async with make_relay(limits={"max_message_size": 1024}) as relay:
        async with raw_pair(relay) as (sender, listener):
            sender.send(OP_BINARY, b"a" * 1024)
            assert await listener.frame() == (True, OP_BINARY, b"a" * 1024)
            sender.send(OP_BINARY, b"b" * 600, fin=False)
            sender.send(OP_CONT, b"b" * 600)
            assert await listener.frame() == (False, OP_BINARY, b"b" * 600)
            assert (await sender.close_frame())[0] == 1009
            assert (await listener.close_frame())[0] == 1009


async def test_lost_sender_closes_the_listener_with_1011(relay: Relay) -> None:
    async with raw_pair(relay) as (sender, listener):
        sender.send(OP_BINARY, b"last words")
        assert await listener.frame() == (True, OP_BINARY, b"last words")
        sender.abort()
        assert (await listener.close_frame())[0] == 1011


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_a_listener_that_stops_reading_pauses_the_sender(
    make_relay: RelayFactory, tls: bool
) -> None:
    """Backpressure crosses the relay: the sender's leg stops being read while the listener's
    leg cannot take more, and nothing is lost or reordered when it reads again (also through
    asyncio's TLS transport, which reads into the splice's shared buffer in slices)."""
    async with make_relay(tls=tls) as relay:
        await _pause_and_drain(relay)


async def _pause_and_drain(relay: Relay) -> None:
    chunk = os.urandom(65536)
    count = 400  # 25 MiB: far more than the kernel buffers of both legs
    async with raw_pair(relay) as (sender, listener):

        async def send_all() -> None:
            for i in range(count):
                sender.send(OP_BINARY, i.to_bytes(4, "big") + chunk)
                await sender.writer.drain()

        sending = asyncio.ensure_future(send_all())
        legs = relay.server._legs

        def sender_leg_paused() -> bool:
            return any(not leg.transport.is_reading() for leg in legs)

        await eventually(sender_leg_paused, seconds=20)
        assert not sending.done()
        for i in range(count):
            fin, opcode, payload = await listener.frame()
            assert (fin, opcode, payload[:4]) == (True, OP_BINARY, i.to_bytes(4, "big"))
            assert payload[4:] == chunk
        async with asyncio.timeout(10):
            await sending


async def test_relay_shutdown_sends_1001_on_both_legs(make_relay: RelayFactory) -> None:
    async with make_relay() as relay, raw_pair(relay) as (sender, listener):
        closing = asyncio.ensure_future(relay.server.aclose())
        assert (await sender.close_frame())[0] == 1001
        assert (await listener.close_frame())[0] == 1001
        sender.send(OP_CLOSE, (1001).to_bytes(2, "big"))
        listener.send(OP_CLOSE, (1001).to_bytes(2, "big"))
        assert await sender.at_eof() and await listener.at_eof()
        async with asyncio.timeout(10):
            await closing


async def test_aiohttp_client_sees_the_same_messages(relay: Relay) -> None:
    """A library client (aiohttp) on the sender side: messages and the close code arrive."""
    async with session() as s:
        control = await open_listener(s, relay)
        connecting = asyncio.ensure_future(
            s.ws_connect(
                f"{relay.base_url}/$hc/hc?sb-hc-action=connect",
                headers={AUTH: relay.token("hc")},
                autoclose=False,
            )
        )
        address = urlsplit(str((await next_accept(control))["address"]))
        listener = await RawWebSocket.open(relay, f"{address.path}?{address.query}", {})
        sender = await connecting
        await sender.send_bytes(b"x" * 200_000)
        assert await listener.frame() == (True, OP_BINARY, b"x" * 200_000)
        listener.send(OP_TEXT, "héllo".encode())
        message = await sender.receive(timeout=10)
        assert (message.type, message.data) == (aiohttp.WSMsgType.TEXT, "héllo")
        listener.send(OP_CLOSE, (4000).to_bytes(2, "big") + b"app close")
        message = await sender.receive(timeout=10)
        assert (message.type, message.data, message.extra) == (
            aiohttp.WSMsgType.CLOSE,
            4000,
            "app close",
        )
        await sender.close()
        listener.abort()
        await control.close()


async def test_spliced_legs_leave_aiohttp_and_are_tracked_until_closed(relay: Relay) -> None:
    """After the hand-over aiohttp keeps nothing of a spliced connection (its per-connection
    state is what the hand-over saves); the relay tracks the legs until they are gone."""
    runner = relay.server._runner
    assert runner is not None and runner.server is not None
    async with raw_pair(relay) as (sender, listener):
        sender.send(OP_BINARY, b"ping")
        assert await listener.frame() == (True, OP_BINARY, b"ping")
        assert len(relay.server._legs) == 2
        # Nor of the listener's control channel: it left aiohttp after its 101 too (D23).
        assert len(runner.server.connections) == 0
        sender.send(OP_CLOSE, (1000).to_bytes(2, "big"))
        assert await listener.close_frame() == (1000, "")
        listener.send(OP_CLOSE, (1000).to_bytes(2, "big"))
        assert await sender.close_frame() == (1000, "")
        assert await sender.at_eof() and await listener.at_eof()
        await eventually(lambda: not relay.server._legs)


async def test_a_paused_sender_is_read_again_when_its_listener_dies(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender was paused (its listener stopped reading); when the listener's connection is
    lost the sender is told (1011) and its close answer is read at once, not at the deadline."""
    monkeypatch.setattr(splice_module, "CLOSE_TIMEOUT", 60.0)
    chunk = os.urandom(65536)
    async with raw_pair(relay) as (sender, listener):

        async def flood() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(400):
                    sender.send(OP_BINARY, chunk)
                    await sender.writer.drain()

        flooding = asyncio.ensure_future(flood())
        legs = relay.server._legs
        await eventually(lambda: any(not leg.transport.is_reading() for leg in legs), seconds=20)
        listener.abort()
        assert (await sender.close_frame())[0] == 1011
        flooding.cancel()
        sender.writer.transport.write(client_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
        assert await sender.at_eof()  # well before the 60 s deadline (frame reads time out at 10)


async def test_many_relayed_connections_leave_nothing_behind(relay: Relay) -> None:
    """Open, use and close 100 relayed connections: no leg, pending rendezvous or aiohttp
    connection stays behind."""
    runner = relay.server._runner
    assert runner is not None and runner.server is not None
    aiohttp_server = runner.server
    for i in range(100):
        async with raw_pair(relay) as (sender, listener):
            sender.send(OP_BINARY, i.to_bytes(2, "big"))
            assert await listener.frame() == (True, OP_BINARY, i.to_bytes(2, "big"))
            listener.send(OP_CLOSE, (1000).to_bytes(2, "big"))
            assert await sender.close_frame() == (1000, "")
            sender.send(OP_CLOSE, (1000).to_bytes(2, "big"))
            assert await listener.close_frame() == (1000, "")
            assert await sender.at_eof() and await listener.at_eof()
    await eventually(lambda: not relay.server._legs)
    assert relay.server.broker.pending_count == 0
    await eventually(lambda: len(aiohttp_server.connections) == 0)  # control channels too
