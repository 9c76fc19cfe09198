"""The relay's metrics against known traffic, scraped from its management listener as
Prometheus would (docs/METRICS.md): after N relayed connections the counter says N, the bytes
are at least what was sent, refusals are counted by outcome, gauges go back to zero.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hybridrelay.client import HybridConnectionClient, HybridConnectionListener
from tests.conftest import Relay, RelayFactory, eventually

pytestmark = pytest.mark.timeout(60)

CONNECTIONS = 5
PAYLOAD = b"x" * 10_000


async def scrape(relay: Relay) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert relay.server.management_url is not None
    async with aiohttp.ClientSession() as session:
        async with session.get(relay.server.management_url + "/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_match_the_traffic(make_relay: RelayFactory) -> None:
    async with make_relay(management=True) as relay:
        listener = HybridConnectionListener.from_connection_string(relay.connection_string("hc"))
        async with listener:
            await eventually(lambda: relay.server.broker.listener_count("hc") == 1)
            samples = await scrape(relay)
            assert value(samples, "hybridrelay_listeners_online", entity="hc") == 1
            client = HybridConnectionClient.from_connection_string(relay.connection_string("hc"))
            for _ in range(CONNECTIONS):
                stream = await client.create_connection()
                accepted = await listener.accept_connection()
                assert accepted is not None
                await stream.write(PAYLOAD)
                await stream.write_eof()
                received = b""
                while chunk := await accepted.read():
                    received += chunk
                assert received == PAYLOAD
                await accepted.write(b"ok")
                await asyncio.gather(stream.aclose(), accepted.aclose())
            await client.aclose()
            await eventually(lambda: not relay.server.runtime.connections())
            # A sender to an entity without listeners, and one with a bad token.
            async with aiohttp.ClientSession() as session:
                for url in (
                    f"{relay.base_url}/$hc/anon?sb-hc-action=connect",
                    f"{relay.base_url}/$hc/hc?sb-hc-action=connect&sb-hc-token=nonsense",
                ):
                    with pytest.raises(aiohttp.WSServerHandshakeError):
                        await session.ws_connect(url)
            samples = await scrape(relay)
        accepted_total = value(
            samples, "hybridrelay_sender_connections_total", entity="hc", outcome="accepted"
        )
        assert accepted_total == CONNECTIONS
        assert value(samples, "hybridrelay_accept_latency_seconds_count", entity="hc") == (
            CONNECTIONS
        )
        to_listener = value(
            samples, "hybridrelay_relayed_bytes_total", entity="hc", direction="to_listener"
        )
        assert to_listener >= CONNECTIONS * len(PAYLOAD)
        to_sender = value(
            samples, "hybridrelay_relayed_bytes_total", entity="hc", direction="to_sender"
        )
        assert to_sender >= CONNECTIONS * 2
        assert value(samples, "hybridrelay_relayed_connections_active", entity="hc") == 0
        assert (
            value(
                samples,
                "hybridrelay_sender_connections_total",
                entity="anon",
                outcome="no_listener",
            )
            == 1
        )
        assert (
            value(samples, "hybridrelay_sender_connections_total", entity="hc", outcome="401") == 1
        )
        assert value(samples, "hybridrelay_control_channels_opened_total", entity="hc") == 1
        assert value(samples, "hybridrelay_rendezvous_pending") == 0
        assert value(samples, "process_open_fds") > 0
        # The listener left: its gauge is back to zero and the loss is counted.
        await eventually(lambda: relay.server.broker.listener_count("hc") == 0)
        samples = await scrape(relay)
        assert value(samples, "hybridrelay_listeners_online", entity="hc") == 0
        lost = sum(
            v
            for (name, labels), v in samples.items()
            if name == "hybridrelay_control_channels_lost_total" and ("entity", "hc") in labels
        )
        assert lost == 1


async def test_http_requests_are_counted_by_status_class(make_relay: RelayFactory) -> None:
    async with make_relay(management=True) as relay, aiohttp.ClientSession() as session:
        # No listener: the relay answers itself, counted under the entity's label.
        for _ in range(3):
            async with session.get(f"{relay.http_url}/anon/x") as response:
                assert response.status == 502  # no listener, as Azure answers
        samples = await scrape(relay)
        assert (
            value(samples, "hybridrelay_http_requests_total", entity="anon", status_class="5xx")
            == 3
        )
        assert value(samples, "hybridrelay_http_request_latency_seconds_count", entity="anon") == 3


async def test_health_and_readiness(make_relay: RelayFactory) -> None:
    async with make_relay(management=True) as relay, aiohttp.ClientSession() as session:
        url = relay.server.management_url
        assert url is not None
        async with session.get(url + "/healthz") as response:
            assert response.status == 200
        async with session.get(url + "/readyz") as response:
            assert response.status == 200 and "ready" in await response.text()
        # Draining: not ready (the relay answers while its shutdown runs).
        closing = asyncio.create_task(relay.server.aclose())
        await eventually(lambda: relay.server._closing)
        try:
            async with session.get(url + "/readyz") as response:
                assert response.status == 503
                assert "draining" in await response.text()
        except aiohttp.ClientConnectionError:
            pass  # the listener closed first: also not ready
        await closing
