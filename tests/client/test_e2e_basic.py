"""End to end over real sockets: a relay on port 0, our listener and our sender."""

from __future__ import annotations

import asyncio

import pytest

from hybridrelay.client import HybridConnectionClient, HybridConnectionListener
from hybridrelay.exceptions import RelayConnectionError, RelayTimeoutError
from tests.client.helpers import (
    accept_one,
    make_client,
    open_listener,
    read_all,
    read_digest,
    root_provider,
    write_random,
)
from tests.conftest import Relay

MIB = 1024 * 1024


async def test_echo_sha256_both_ways_over_tls(tls_relay: Relay) -> None:
    async with asyncio.timeout(30):
        async with open_listener(tls_relay) as listener, make_client(tls_relay) as client:
            sender_task = asyncio.create_task(client.create_connection())
            server_stream = await accept_one(listener)
            sender = await sender_task

            async def sender_side() -> tuple[str, tuple[int, str]]:
                sent = await write_random(sender, 3 * MIB)
                await sender.write_eof()
                return sent, await read_digest(sender)

            async def listener_side() -> tuple[tuple[int, str], str]:
                received = await read_digest(server_stream)
                sent = await write_random(server_stream, 4 * MIB)
                await server_stream.write_eof()
                return received, sent

            (up_sent, down_received), (up_received, down_sent) = await asyncio.gather(
                sender_side(), listener_side()
            )
            assert up_received == (3 * MIB, up_sent)
            assert down_received == (4 * MIB, down_sent)
            assert sender.close_code == 1000
            assert server_stream.close_code == 1000
            await sender.aclose()
            await server_stream.aclose()


async def test_half_close_reply_after_eof(relay: Relay) -> None:
    async with asyncio.timeout(20):
        async with open_listener(relay) as listener, make_client(relay) as client:
            sender_task = asyncio.create_task(client.create_connection())
            server_stream = await accept_one(listener)
            sender = await sender_task
            await sender.write(b"request body")
            await sender.write_eof()
            assert await read_all(server_stream) == b"request body"
            assert server_stream.at_eof
            # The listener still writes after it read EOF: the other direction is open.
            reply = b"reply " * 50_000
            await server_stream.write(reply)
            await server_stream.write_eof()
            assert await read_all(sender) == reply
            await asyncio.gather(sender.aclose(), server_stream.aclose())


async def test_untrusted_certificate_is_a_connection_error(tls_relay: Relay) -> None:
    async with asyncio.timeout(20):
        client = HybridConnectionClient(tls_relay.base_url, "hc", root_provider())
        async with client:
            with pytest.raises(RelayConnectionError) as info:
                await client.create_connection()
            assert "TLS" in str(info.value)
        listener = HybridConnectionListener(tls_relay.base_url, "hc", root_provider())
        with pytest.raises(RelayConnectionError):
            await listener.open()


async def test_unreachable_relay_is_a_connection_error(relay: Relay) -> None:
    async with asyncio.timeout(20):
        port = relay.server.port
        await relay.server.aclose()
        async with HybridConnectionClient(f"ws://127.0.0.1:{port}", "hc", None) as client:
            with pytest.raises(RelayConnectionError):
                await client.create_connection()


async def test_connect_timeout(relay: Relay) -> None:
    # A listener that never decides: the sender's own timeout fires first.
    gate = asyncio.Event()

    async def handler(ctx: object) -> bool:
        await gate.wait()
        return True

    async with asyncio.timeout(20):
        async with open_listener(relay, accept_handler=handler):
            async with make_client(relay, connect_timeout=0.5) as client:
                with pytest.raises(RelayTimeoutError):
                    await client.create_connection()
            gate.set()


async def test_streams_outlive_their_listener_and_client(relay: Relay) -> None:
    async with asyncio.timeout(20):
        listener = HybridConnectionListener(relay.base_url, "hc", root_provider())
        client = make_client(relay)
        try:
            await listener.open()
            sender = await client.create_connection()
            stream = await accept_one(listener)
        finally:
            await listener.aclose()
            await client.aclose()
        # Both owners are closed; the established connection still carries data both ways.
        await sender.write(b"still here")
        assert await stream.read() == b"still here"
        await stream.write(b"me too")
        assert await sender.read() == b"me too"
        await asyncio.gather(sender.aclose(), stream.aclose())
        with pytest.raises(RelayConnectionError):
            await client.create_connection()
