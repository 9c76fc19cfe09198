"""observability/endpoint.py: ``/metrics``, ``/healthz`` and ``/readyz`` on a real socket
(port 0, loopback), over a registry of the test's own."""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from hybridrelay.exceptions import ConfigurationError
from hybridrelay.observability import endpoint
from hybridrelay.observability.endpoint import MetricsServer

pytestmark = pytest.mark.timeout(30)


class Ready:
    """A readiness check whose answer the test sets."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.calls = 0

    async def __call__(self) -> str | None:
        self.calls += 1
        return self.reason


async def get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


async def test_metrics_health_and_readiness_on_a_real_socket() -> None:
    registry = CollectorRegistry()
    hits = Counter("test_hits", "hits", registry=registry)
    ready = Ready()
    async with MetricsServer(registry, ready, port=0) as server:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        hits.inc(3)
        status, content_type, text = await get(server.url + "/metrics")
        assert status == 200
        assert content_type.startswith("text/plain; version=")  # the exposition format
        values = {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        assert values["test_hits_total"] == 3
        assert await get(server.url + "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
        status, _, text = await get(server.url + "/readyz")
        assert (status, text) == (200, "ready\n")
        ready.reason = "-R hc is offline"
        status, _, text = await get(server.url + "/readyz")
        assert (status, text) == (503, "not ready: -R hc is offline\n")
        assert ready.calls == 2
        status, _, _ = await get(server.url + "/nothing")
        assert status == 404
    # Closed: nothing listens on the port any more.
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(server.url + "/healthz")


async def test_a_readiness_check_that_hangs_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(endpoint, "READINESS_TIMEOUT", 0.05)
    never = asyncio.Event()

    async def hangs() -> str | None:
        await never.wait()
        return None

    async with MetricsServer(CollectorRegistry(), hangs) as server:
        status, _, text = await get(server.url + "/readyz")
        # The loop still answers: the process is alive, just not ready.
        assert (await get(server.url + "/healthz"))[0] == 200
    assert status == 503
    assert text == "not ready: the readiness check did not answer in 0.05 s\n"


async def test_a_port_in_use_is_a_configuration_error_naming_it_and_the_fix() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = MetricsServer(CollectorRegistry(), Ready(), port=port)
        with pytest.raises(ConfigurationError) as caught:
            await server.start()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"metrics: cannot listen on 127.0.0.1:{port}: ")
    assert "--metrics-port" in message
    assert server.port == 0
    await server.aclose()  # nothing to close: harmless


async def test_an_unresolvable_host_is_a_configuration_error() -> None:
    server = MetricsServer(
        CollectorRegistry(), Ready(), host="no-such-host.invalid", hint="fix --metrics-host"
    )
    with pytest.raises(
        ConfigurationError, match=r"no-such-host\.invalid:0: .*\(fix --metrics-host\)"
    ):
        await server.start()


async def test_start_twice_is_refused_and_close_is_idempotent() -> None:
    server = MetricsServer(CollectorRegistry(), Ready())
    await server.start()
    try:
        with pytest.raises(RuntimeError):
            await server.start()
    finally:
        await server.aclose()
    await server.aclose()


async def test_beyond_loopback_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hybridrelay.observability")
    async with MetricsServer(CollectorRegistry(), Ready(), host="0.0.0.0") as server:
        assert server.port > 0
    assert any("beyond loopback" in r.getMessage() for r in caplog.records)
    caplog.clear()
    async with MetricsServer(CollectorRegistry(), Ready(), host="127.0.0.1"):
        pass
    assert not any("beyond loopback" in r.getMessage() for r in caplog.records)
