"""Several relay endpoints (a cluster's nodes) in the SDK's listener and sender and in the
bridge: the first that answers is used, a listener that loses its relay moves to the next one,
a sender's connect that cannot reach a relay (or is answered 502/503) is tried on the next and
sticks to the one that worked. No Redis needed: independent relays stand for the nodes."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from hybridrelay.bridge.config import ConnectionSettings, merge_cli, parse_config
from hybridrelay.client import (
    HybridConnectionClient,
    HybridConnectionListener,
    SharedAccessKeyTokenProvider,
)
from hybridrelay.exceptions import AuthorizationError, ConfigurationError
from tests.bridge.helpers import exchange, running
from tests.client.helpers import root_provider
from tests.cluster.test_cluster import echo, echoed, round_trip
from tests.conftest import ROOT_KEY_NAME, RelayFactory


def refused_endpoint() -> str:
    """A loopback address where nothing listens (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"ws://127.0.0.1:{port}"


@pytest.mark.timeout(30)
async def test_the_listener_skips_an_endpoint_that_cannot_be_reached(
    make_relay: RelayFactory,
) -> None:
    async with make_relay() as relay:
        listener = HybridConnectionListener(
            [refused_endpoint(), relay.base_url], "hc", root_provider()
        )
        async with listener:
            task = asyncio.get_running_loop().create_task(echo(listener))
            assert await round_trip(relay, b"second endpoint") == b"second endpoint"
            task.cancel()


@pytest.mark.timeout(30)
async def test_a_listener_that_loses_its_relay_moves_to_the_next(
    make_relay: RelayFactory,
) -> None:
    async with make_relay() as first, make_relay() as second:
        listener = HybridConnectionListener(
            [first.base_url, second.base_url], "hc", root_provider()
        )
        online = asyncio.Event()
        listener.on_status(lambda status, error: online.set() if status == "online" else None)
        async with listener:
            task = asyncio.get_running_loop().create_task(echo(listener))
            assert first.server.broker.listener_count("hc") == 1
            online.clear()
            await first.server.aclose()  # the node goes away (1001)
            async with asyncio.timeout(10):
                await online.wait()
            assert second.server.broker.listener_count("hc") == 1
            assert await round_trip(second, b"moved") == b"moved"
            task.cancel()


def test_the_bridge_takes_more_endpoints() -> None:
    settings = ConnectionSettings(
        endpoint="sb://node1.example.com", more_endpoints=("sb://node2.example.com",)
    )
    assert settings.more_endpoints == ("sb://node2.example.com",)
    with pytest.raises(ConfigurationError, match="must look like"):
        ConnectionSettings(endpoint="sb://node1.example.com", more_endpoints=("node2",))


@pytest.mark.timeout(30)
async def test_the_sender_skips_an_endpoint_that_cannot_be_reached_and_sticks_to_the_next(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hybridrelay.client")
    async with make_relay() as relay:
        listener = HybridConnectionListener(relay.base_url, "hc", root_provider())
        async with listener:
            task = asyncio.get_running_loop().create_task(echo(listener))
            client = HybridConnectionClient(
                [refused_endpoint(), relay.base_url], "hc", root_provider()
            )
            async with client:
                assert await echoed(client, b"first") == b"first"
                assert await echoed(client, b"second") == b"second"
                await client.check_access()
            task.cancel()
    moves = [r for r in caplog.records if "trying the next relay endpoint" in r.getMessage()]
    assert len(moves) == 1, [r.getMessage() for r in moves]  # the one that worked is sticky


@pytest.mark.timeout(30)
async def test_a_sender_refused_by_a_draining_relay_uses_the_next(
    make_relay: RelayFactory,
) -> None:
    """A rolling restart's step: the first node drains (new connects get 503); a sender given
    both nodes connects through the second, where the listener moved (1012)."""
    async with make_relay() as first, make_relay() as second:
        listener = HybridConnectionListener(
            [first.base_url, second.base_url], "hc", root_provider()
        )
        async with listener:
            task = asyncio.get_running_loop().create_task(echo(listener))
            client = HybridConnectionClient(
                [first.base_url, second.base_url], "hc", root_provider()
            )
            online = asyncio.Event()
            listener.on_status(lambda status, _: online.set() if status == "online" else None)
            async with client:
                held = await client.create_connection()  # keeps the drain going
                online.clear()
                drain = asyncio.get_running_loop().create_task(first.server.drain(grace=20))
                async with asyncio.timeout(10):
                    await online.wait()  # after the 1012, on the second relay
                assert second.server.broker.listener_count("hc") == 1
                assert await echoed(client, b"moved") == b"moved"
                await held.write(b"still")
                assert await held.read() == b"still"  # the relayed connection was not cut
                await held.aclose()
                await drain
            task.cancel()


@pytest.mark.timeout(30)
async def test_a_refused_key_is_not_tried_on_the_other_endpoints(
    make_relay: RelayFactory,
) -> None:
    async with make_relay() as relay:
        wrong = SharedAccessKeyTokenProvider(ROOT_KEY_NAME, "d3Jvbmcga2V5")
        client = HybridConnectionClient([relay.base_url, refused_endpoint()], "hc", wrong)
        async with client:
            # Tried on the refused endpoint it would end in a RelayConnectionError.
            with pytest.raises(AuthorizationError):
                await client.create_connection()
            with pytest.raises(AuthorizationError):
                await client.check_access()


@pytest.mark.timeout(40)
async def test_the_bridge_s_local_forward_survives_its_first_relay_being_stopped(
    make_relay: RelayFactory,
) -> None:
    async with make_relay() as first, make_relay() as second:
        listener = HybridConnectionListener(
            [first.base_url, second.base_url], "hc", root_provider()
        )
        base = parse_config({"shutdown_grace_period": 2, "connect_timeout": 10})
        config = merge_cli(
            base,
            ["-x", first.connection_string(), "--also-endpoint", second.base_url, "-L", "0:hc"],
        )
        async with listener, running(config) as agent:
            task = asyncio.get_running_loop().create_task(echo(listener))
            host, port = agent.ingress_address(0)[:2]

            async def through_the_bridge(payload: bytes) -> bytes:
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    async with asyncio.timeout(10):
                        return await exchange(reader, writer, payload)
                finally:
                    writer.close()

            assert await through_the_bridge(b"via the first") == b"via the first"
            online = asyncio.Event()
            listener.on_status(lambda status, _: online.set() if status == "online" else None)
            await first.server.aclose()  # the first node goes away; the listener moves
            async with asyncio.timeout(10):
                await online.wait()
            assert second.server.broker.listener_count("hc") == 1
            assert await through_the_bridge(b"via the second") == b"via the second"
            task.cancel()
