"""Unmasked client frames (issue 17, finding 7): RFC 6455 5.1 says a server must fail the
connection when a client frame arrives without the MASK bit, with close code 1002.

Every WebSocket the relay serves is read by its own frame path after the 101, which checks
the bit (``protocol/websocket.py`` :class:`FrameForwarder`): control channels
(``transport/control_leg.py``), relayed connections (``transport/splice.py``) and HTTP
rendezvous (``transport/http_leg.py``). The first two are driven here by a raw WebSocket client
on a plain socket, so the frames are exactly the ones written.
"""

from __future__ import annotations

import pytest

from hybridrelay.transport.base import MessageKind
from hybridrelay.transport.http_leg import MessageLeg
from tests.conftest import Relay, eventually
from tests.server.test_http_leg import FakeTransport, feed
from tests.server.test_relay_websocket import AUTH
from tests.server.test_splice import OP_BINARY, OP_PING, OP_PONG, OP_TEXT, RawWebSocket, raw_pair
from tests.wsframes import client_frame

LISTEN = "/$hc/hc?sb-hc-action=listen"


async def _listen(relay: Relay, early: bytes = b"") -> RawWebSocket:
    return await RawWebSocket.open(relay, LISTEN, {AUTH: relay.token("hc")}, early)


@pytest.mark.timeout(30)
async def test_masked_frames_are_served_on_the_control_channel(relay: Relay) -> None:
    """The check lets a well-behaved listener through: its ping is answered."""
    control = await _listen(relay)
    try:
        await eventually(lambda: relay.server.broker.listener_count("hc") == 1)
        control.send(OP_PING, b"masked")
        assert await control.frame() == (True, OP_PONG, b"masked")
        assert relay.server.broker.listener_count("hc") == 1
    finally:
        control.abort()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_PING])
async def test_an_unmasked_frame_fails_the_control_channel_with_1002(
    relay: Relay, opcode: int
) -> None:
    control = await _listen(relay)
    try:
        await eventually(lambda: relay.server.broker.listener_count("hc") == 1)
        control.send(OP_PING, b"first, masked")
        assert await control.frame() == (True, OP_PONG, b"first, masked")
        control.send(opcode, b'{"renewToken":{"token":"x"}}', mask=False)
        assert (await control.close_frame())[0] == 1002
        assert await control.at_eof()
        await eventually(lambda: relay.server.broker.listener_count("hc") == 0)
    finally:
        control.abort()


@pytest.mark.timeout(30)
async def test_an_unmasked_frame_right_behind_the_upgrade_request_is_refused(
    relay: Relay,
) -> None:
    """Bytes sent in the same write as the upgrade reach aiohttp before the relay takes the
    connection (they wait in its request handler, and are handed over): they are checked too."""
    control = await _listen(relay, early=client_frame(OP_PING, b"early", masked=False))
    try:
        assert (await control.close_frame())[0] == 1002
        assert await control.at_eof()
    finally:
        control.abort()


@pytest.mark.timeout(30)
async def test_an_unmasked_frame_on_either_leg_of_a_relayed_connection_fails_it(
    relay: Relay,
) -> None:
    """The rendezvous path (splice) refuses it from the listener's leg as from the sender's
    (tests/server/test_splice.py covers the sender's): 1002 to the offender, 1011 to the
    other leg."""
    async with raw_pair(relay) as (sender, listener):
        listener.send(OP_BINARY, b"not masked", mask=False)
        assert (await listener.close_frame())[0] == 1002
        assert (await sender.close_frame())[0] == 1011
        assert await listener.at_eof()


@pytest.mark.timeout(10)
async def test_an_unmasked_frame_fails_an_http_rendezvous_leg() -> None:
    """The third rendezvous path: the listener's WebSocket for a relayed HTTP request's body
    (transport/http_leg.py) reads frames with the same checks."""
    transport = FakeTransport()
    leg = MessageLeg(transport, max_text_size=1024)
    leg.start()
    feed(leg, client_frame(OP_TEXT, b'{"response":{}}', masked=False))
    message = await leg.receive()
    assert message.kind is MessageKind.CLOSE  # to the relay: the leg is gone (1006)
    written = bytes(transport.written)  # our close frame: opcode 8, code 1002
    assert written[0] == 0x88 and int.from_bytes(written[2:4], "big") == 1002
    assert transport.closed
