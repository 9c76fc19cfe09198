"""The relay's shutdown: the close handshake of a listener's control channel, and the drain
(``RelayServer.drain``; ``hybridrelay serve`` on SIGTERM/SIGINT)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.client.helpers import open_listener as sdk_listener
from tests.conftest import RelayFactory
from tests.server.test_relay_websocket import open_listener, session


@pytest.mark.timeout(30)
async def test_the_relay_answers_a_listeners_close_frame(make_relay: RelayFactory) -> None:
    async with make_relay() as relay, session() as s:
        control = await open_listener(s, relay)
        await control.send_frame((4000).to_bytes(2, "big") + b"bye", aiohttp.WSMsgType.CLOSE)
        async with asyncio.timeout(5):
            answer = await control.receive()
        # RFC 6455 5.5.1: the answer is a close frame (echoing the code), not a dropped socket.
        assert answer.type is aiohttp.WSMsgType.CLOSE and answer.data == 4000, answer
        await control.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("activity", [False, True])
async def test_listener_aclose_returns_without_waiting_its_close_timeout(
    make_relay: RelayFactory, activity: bool
) -> None:
    async with make_relay() as relay:
        async with sdk_listener(relay) as listener:
            if activity:  # the control task has run and reads the channel
                await asyncio.sleep(0)
            # Not its 10 s CLOSE_TIMEOUT: the relay answers the close at once.
            await asyncio.wait_for(listener.aclose(), 5)
            assert listener.status == "offline"
