"""One tenant cannot starve the others (docs/RELIABILITY.md): the pending table's per-entity
bound, slots given back when their sender goes away, and load shed from a listener that stopped
reading rather than the listener unrouted for good. Real sockets against a relay in the loop."""

from __future__ import annotations

import asyncio
import socket
import struct

import aiohttp
import pytest

from tests.conftest import Relay, RelayFactory, eventually
from tests.server.test_relay_websocket import (
    AUTH,
    handshake_status,
    next_accept,
    open_listener,
    relayed_pair,
    session,
)

pytestmark = pytest.mark.both_loops

ENTITIES = [{"name": "noisy", "requires_client_authorization": False}, {"name": "hc"}]


async def raw_connect(relay: Relay, entity: str) -> asyncio.StreamWriter:
    """A sender's upgrade request, sent by hand so that the test can reset its connection."""
    _, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    writer.write(
        (
            f"GET /$hc/{entity}?sb-hc-action=connect HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{relay.server.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    return writer


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a flood of connect-then-reset senders does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def drain(control: aiohttp.ClientWebSocketResponse) -> None:
    """A listener that reads what it is told and answers nothing."""
    async for _ in control:
        pass


@pytest.mark.timeout(60)
async def test_a_flood_on_one_entity_leaves_the_others_their_slots(
    make_relay: RelayFactory,
) -> None:
    limits = {"max_pending_per_connection": 20, "max_pending_rendezvous": 30}
    async with make_relay(entities=ENTITIES, limits=limits) as relay, session() as s:
        broker = relay.server.broker
        noisy_listener = await open_listener(s, relay, "noisy")
        reading = asyncio.create_task(drain(noisy_listener))
        flood = [await raw_connect(relay, "noisy") for _ in range(20)]
        await eventually(lambda: broker.pending_count == 20)
        # The noisy entity is at its bound ...
        status, _ = await handshake_status(relay, "/$hc/noisy?sb-hc-action=connect")
        assert status == 503
        # ... and another entity's sender still gets through, well within the 30 s that the
        # flood's slots would otherwise be held.
        canary = await open_listener(s, relay, "hc")
        sender, rendezvous = await relayed_pair(s, relay, canary)
        await sender.send_bytes(b"ping")
        assert (await rendezvous.receive_bytes(timeout=5)) == b"ping"
        # Both at once: each end's close reaches the other, which answers it while closing.
        await asyncio.gather(sender.close(), rendezvous.close())
        # Senders that reset their connection give their slots back at once.
        for writer in flood:
            reset(writer)
        await eventually(lambda: broker.pending_count == 0)
        again = await raw_connect(relay, "noisy")
        await eventually(lambda: broker.pending_count == 1)
        reset(again)
        await eventually(lambda: broker.pending_count == 0)
        reading.cancel()
        await canary.close()
        await noisy_listener.close()


@pytest.mark.timeout(60)
async def test_a_sender_that_closes_while_waiting_frees_its_slot(make_relay: RelayFactory) -> None:
    """A plain close (FIN) too, not only a reset."""
    async with make_relay(entities=ENTITIES) as relay, session() as s:
        broker = relay.server.broker
        listener = await open_listener(s, relay, "noisy")
        reading = asyncio.create_task(drain(listener))
        writer = await raw_connect(relay, "noisy")
        await eventually(lambda: broker.pending_count == 1)
        writer.close()
        await eventually(lambda: broker.pending_count == 0)
        reading.cancel()
        await listener.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", ["101", "200", "302"])
async def test_a_rejection_that_is_not_an_error_status_is_refused(
    relay: Relay, status: str
) -> None:
    """Only 4xx/5xx make sense as a rejection: a bare 101 would leave the sender with an open
    connection and no WebSocket. The sender gets 400 and so does the listener's reject."""
    async with session() as s:
        control = await open_listener(s, relay)
        sender = asyncio.create_task(
            handshake_status(relay, "/$hc/hc?sb-hc-action=connect", {AUTH: relay.token("hc")})
        )
        address = str((await next_accept(control))["address"])
        reject = address + f"&sb-hc-statusCode={status}&sb-hc-statusDescription=odd"
        refused, reason = await handshake_status(relay, reject[len(relay.base_url) :])
        assert (refused, reason.split(" TrackingId")[0]) == (
            400,
            "sb-hc-statusCode must be an error status, 400-599.",
        )
        assert (await sender)[0] == 400
        await control.close()
