"""Several relay endpoints (a cluster's nodes) in the SDK's listener and the bridge's
configuration: the first that answers is used, and a listener that loses its relay moves to the
next one. No Redis needed: two independent relays stand for two nodes."""

from __future__ import annotations

import asyncio
import socket

import pytest

from hybridrelay.bridge.config import ConnectionSettings
from hybridrelay.client import HybridConnectionListener
from hybridrelay.exceptions import ConfigurationError
from tests.client.helpers import root_provider
from tests.cluster.test_cluster import echo, round_trip
from tests.conftest import RelayFactory


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
