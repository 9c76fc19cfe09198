"""The bridge's ``--metrics-port``: Prometheus ``/metrics``, ``/healthz`` and ``/readyz`` of a
running bridge, checked against known traffic. A real relay and real bridge agents in process
(plus one ``hybridrelay bridge`` subprocess), every socket on 127.0.0.1, port 0."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from hybridrelay.bridge.agent import BridgeAgent
from hybridrelay.bridge.config import BridgeConfig, merge_cli, parse_config
from hybridrelay.exceptions import ConfigurationError
from tests.bridge.helpers import (
    FAST_RETRY,
    UdpClient,
    UdpEcho,
    exchange,
    random_bytes,
    read_until_closed,
    tcp_server,
)
from tests.conftest import Relay, eventually

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def bridge_config(
    relay: Relay,
    local: Sequence[str] = (),
    remote: Sequence[str] = (),
    http: Sequence[str] = (),
    document: dict[str, Any] | None = None,
) -> BridgeConfig:
    base = parse_config(
        {"shutdown_grace_period": 2, "connect_timeout": 10, "metrics_port": 0, **(document or {})}
    )
    return merge_cli(
        base,
        ["-x", relay.connection_string()]
        + [arg for spec in local for arg in ("-L", spec)]
        + [arg for spec in remote for arg in ("-R", spec)]
        + [arg for spec in http for arg in ("-H", spec)],
    )


@asynccontextmanager
async def running(config: BridgeConfig) -> AsyncIterator[BridgeAgent]:
    async with BridgeAgent(config, retry_schedule=FAST_RETRY) as agent:
        yield agent


def url_of(agent: BridgeAgent) -> str:
    assert agent.metrics_url is not None
    return agent.metrics_url


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def scrape(url: str) -> Samples:
    status, text = await get(url + "/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def until(url: str, name: str, expected: float, **labels: str) -> Samples:
    """Scrape until ``name{labels}`` is ``expected`` (the counters of a connection are added
    when its pump ends, a moment after the client saw the end); the samples of that scrape."""
    last: list[float | None] = [None]
    samples: Samples = {}

    async def check() -> bool:
        nonlocal samples
        samples = await scrape(url)
        last[0] = value(samples, name, **labels)
        return last[0] == expected

    for _ in range(250):
        if await check():
            return samples
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name}{labels} is {last[0]}, expected {expected}")


async def open_to(agent: BridgeAgent, index: int = 0) -> tuple[Any, Any]:
    host, port = agent.ingress_address(index)[:2]
    return await asyncio.open_connection(host, port)


# -- TCP through a -L/-R pair ------------------------------------------------------------------


async def test_tcp_connections_and_bytes_are_counted(relay: Relay) -> None:
    n, size = 3, 200_000
    async with tcp_server() as dest:
        edge_config = bridge_config(relay, remote=[f"hc:127.0.0.1:{dest.port}"])
        ingress_config = bridge_config(relay, local=["0:hc"])
        async with running(edge_config) as edge, running(ingress_config) as ingress:
            edge_url, ingress_url = url_of(edge), url_of(ingress)
            assert edge_url != ingress_url
            samples = await scrape(edge_url)
            remote = {"kind": "remote", "entity": "hc"}
            assert value(samples, "hybridrelay_bridge_listeners_online", **remote) == 1
            assert (
                value(samples, "hybridrelay_bridge_control_channel_connects_total", **remote) == 1
            )
            assert value(samples, "hybridrelay_bridge_control_channel_losses_total", **remote) == 0
            assert await get(edge_url + "/healthz") == (200, "ok\n")
            assert await get(edge_url + "/readyz") == (200, "ready\n")
            assert await get(ingress_url + "/readyz") == (200, "ready\n")

            for _ in range(n):
                reader, writer = await open_to(ingress)
                payload = random_bytes(size)
                assert await exchange(reader, writer, payload) == payload
                writer.close()
            # While one more connection is open, both sides count it active.
            reader, writer = await open_to(ingress)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            await until(
                ingress_url, "hybridrelay_bridge_connections_active", 1, kind="local", entity="hc"
            )
            await until(edge_url, "hybridrelay_bridge_connections_active", 1, **remote)
            writer.write_eof()
            assert await read_until_closed(reader) == b""
            writer.close()

            local = {"kind": "local", "entity": "hc"}
            samples = await until(ingress_url, "hybridrelay_bridge_connections_active", 0, **local)
            accepted = "hybridrelay_bridge_connections_total"
            assert value(samples, accepted, outcome="accepted", **local) == n + 1
            total = n * size + 4
            # Plain routes (no preamble): the payload exactly, each way.
            assert (
                value(samples, "hybridrelay_bridge_bytes_total", direction="to_relay", **local)
                == total
            )
            assert (
                value(samples, "hybridrelay_bridge_bytes_total", direction="from_relay", **local)
                == total
            )
            samples = await until(edge_url, "hybridrelay_bridge_connections_active", 0, **remote)
            assert value(samples, accepted, outcome="accepted", **remote) == n + 1
            # The destination echoes: what it sent went to the relay.
            assert (
                value(samples, "hybridrelay_bridge_bytes_total", direction="from_relay", **remote)
                == total
            )
            assert (
                value(samples, "hybridrelay_bridge_bytes_total", direction="to_relay", **remote)
                == total
            )
            # The process collectors are there, in the bridge's own registry.
            assert value(samples, "process_open_fds") is not None
    assert dest.connections == n + 1


async def test_named_routes_count_the_preamble_bytes_as_payload_at_least(relay: Relay) -> None:
    size = 50_000
    async with tcp_server() as dest:
        config = bridge_config(relay, ["0/ssh:hc"], [f"hc:ssh/127.0.0.1:{dest.port}"])
        async with running(config) as agent:
            reader, writer = await open_to(agent)
            assert len(await exchange(reader, writer, random_bytes(size))) == size
            writer.close()
            url = url_of(agent)
            labels = {"kind": "local", "entity": "hc"}
            samples = await until(url, "hybridrelay_bridge_connections_active", 0, **labels)
            # The bytes are the socket's; the preamble is on the relayed stream only.
            for direction in ("to_relay", "from_relay"):
                sent = value(
                    samples, "hybridrelay_bridge_bytes_total", direction=direction, **labels
                )
                assert sent is not None and sent >= size


# -- refusals ------------------------------------------------------------------------------------


async def test_refusals_are_counted_by_outcome(relay: Relay) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
    try:
        closed_port = holder.getsockname()[1]
        config = bridge_config(
            relay,
            remote=[f"hc:127.0.0.1:{closed_port}"],
            local=["0:anon"],
            document={"local_forwards": [{"spec": "0:hc", "allow": ["10.0.0.0/8"]}]},
        )
        async with running(config) as agent:
            url = url_of(agent)
            # 1. Outside the allow-list: reset by the ingress, never sent to the relay.
            reader, writer = await open_to(agent, 0)
            assert await read_until_closed(reader) == b""
            writer.close()
            await until(
                url,
                "hybridrelay_bridge_connections_total",
                1,
                kind="local",
                entity="hc",
                outcome="refused_allow_list",
            )
            # 2. A hybrid connection without a listener: the relay answers 404.
            reader, writer = await open_to(agent, 1)
            assert await read_until_closed(reader) == b""
            writer.close()
            await until(
                url,
                "hybridrelay_bridge_connections_total",
                1,
                kind="local",
                entity="anon",
                outcome="relay_404",
            )
            # 3. The edge cannot reach its destination (and the ingress' connection is cut).
            edge_config = bridge_config(relay, local=["0:hc"])
            async with running(edge_config) as ingress:
                reader, writer = await open_to(ingress)
                writer.write(b"x")
                assert await read_until_closed(reader) == b""
                writer.close()
            samples = await until(
                url,
                "hybridrelay_bridge_connections_total",
                1,
                kind="remote",
                entity="hc",
                outcome="destination_unreachable",
            )
            assert (
                value(
                    samples,
                    "hybridrelay_bridge_connections_total",
                    kind="remote",
                    entity="hc",
                    outcome="accepted",
                )
                == 0
            )
    finally:
        holder.close()


# -- readiness -------------------------------------------------------------------------------------


async def test_not_ready_until_the_listener_is_online(make_relay: Any) -> None:
    # "anon" already has its one allowed listener: the bridge's is refused (429, quota) and
    # retried (a 404 or 401 would end the bridge at start: they need a fix, not a retry).
    async with make_relay(limits={"max_listeners_per_connection": 1}) as relay:
        async with aiohttp.ClientSession() as s:
            occupant = await s.ws_connect(
                f"{relay.base_url}/$hc/anon?sb-hc-action=listen",
                headers={"ServiceBusAuthorization": relay.token("anon")},
            )
            config = bridge_config(relay, remote=["anon:127.0.0.1:9", "hc:127.0.0.1:9"])
            agent = BridgeAgent(config, retry_schedule=FAST_RETRY)
            task = asyncio.create_task(agent.run())
            try:
                await eventually(lambda: agent.metrics_url is not None or task.done())
                url = url_of(agent)
                assert (await get(url + "/healthz"))[0] == 200
                await until(
                    url, "hybridrelay_bridge_listeners_online", 1, kind="remote", entity="hc"
                )
                status, text = await get(url + "/readyz")
                assert (status, text) == (503, "not ready: -R anon is offline\n")
                samples = await scrape(url)
                online = value(
                    samples, "hybridrelay_bridge_listeners_online", kind="remote", entity="anon"
                )
                assert online == 0
                assert not agent.started.is_set()
            finally:
                agent.shutdown()
                await asyncio.wait_for(task, 30)
                await occupant.close()


async def test_a_lost_listener_is_not_ready_and_counted(make_relay: Any) -> None:
    async with make_relay() as relay:
        config = bridge_config(relay, remote=["hc:127.0.0.1:9"])
        async with running(config) as agent:
            url = url_of(agent)
            assert await get(url + "/readyz") == (200, "ready\n")
            await relay.server.aclose()  # the relay goes: the control channel is lost
            labels = {"kind": "remote", "entity": "hc"}
            samples = await until(url, "hybridrelay_bridge_listeners_online", 0, **labels)
            assert value(samples, "hybridrelay_bridge_control_channel_losses_total", **labels) == 1
            status, text = await get(url + "/readyz")
            assert (status, text) == (503, "not ready: -R hc is offline\n")


async def test_not_ready_while_draining(relay: Relay) -> None:
    async with tcp_server() as dest:
        config = bridge_config(
            relay,
            ["0:hc"],
            [f"hc:127.0.0.1:{dest.port}"],
            document={"shutdown_grace_period": 30},
        )
        agent = BridgeAgent(config, retry_schedule=FAST_RETRY)
        await agent.__aenter__()
        try:
            url = url_of(agent)
            # An open connection holds the drain (up to the grace period).
            reader, writer = await open_to(agent)
            writer.write(b"hold")
            assert await reader.readexactly(4) == b"hold"
            assert await get(url + "/readyz") == (200, "ready\n")
            agent.shutdown()
            status, text = await get(url + "/readyz")
            assert (status, text) == (503, "not ready: draining: the bridge is shutting down\n")
            assert (await get(url + "/healthz"))[0] == 200  # alive while it drains
            writer.write_eof()
            assert await read_until_closed(reader) == b""
            writer.close()
        finally:
            await agent.__aexit__(None, None, None)
    # The metrics listener closes with the bridge.
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(url + "/healthz")


# -- UDP and HTTP ---------------------------------------------------------------------------------


async def test_udp_flows_are_counted(relay: Relay) -> None:
    loop = asyncio.get_running_loop()
    echo_transport, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
    client_transport, client = await loop.create_datagram_endpoint(
        UdpClient, local_addr=("127.0.0.1", 0)
    )
    try:
        port = echo_transport.get_extra_info("sockname")[1]
        config = bridge_config(
            relay, ["0/udp:hc"], [f"hc:127.0.0.1:{port}/udp"], document={"udp_idle_timeout": 1}
        )
        async with running(config) as agent:
            url = url_of(agent)
            target = agent.ingress_address(0)
            for payload in (b"one", b"second"):
                client_transport.sendto(payload, target)
                async with asyncio.timeout(10):
                    assert await client.received.get() == b"echo:" + payload
            local = {"kind": "local", "entity": "hc"}
            samples = await scrape(url)
            assert value(samples, "hybridrelay_bridge_udp_flows_active", **local) == 1
            assert (
                value(samples, "hybridrelay_bridge_udp_flows_active", kind="remote", entity="hc")
                == 1
            )
            # The flow idles out (1 s); its bytes are counted then.
            samples = await until(url, "hybridrelay_bridge_udp_flows_active", 0, **local)
            outcome = "hybridrelay_bridge_connections_total"
            assert value(samples, outcome, outcome="accepted", **local) == 1
            sent = len(b"one") + len(b"second")
            bytes_total = "hybridrelay_bridge_bytes_total"
            assert value(samples, bytes_total, direction="to_relay", **local) == sent
            assert value(samples, bytes_total, direction="from_relay", **local) == sent + 10
    finally:
        client_transport.close()
        echo_transport.close()


@asynccontextmanager
async def upstream() -> AsyncIterator[str]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404, text="no")

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_get("/missing", missing)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_http_requests_are_counted_by_status_class(relay: Relay) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    try:
        async with upstream() as up:
            down = f"http://127.0.0.1:{holder.getsockname()[1]}"
            config = bridge_config(relay, http=[f"hc:{up}", f"anon:{down}"])
            async with running(config) as agent, aiohttp.ClientSession() as session:
                url = url_of(agent)
                headers = {"ServiceBusAuthorization": relay.token("hc")}
                for path, status in (("/hc/hello", 200), ("/hc/hello", 200), ("/hc/missing", 404)):
                    async with session.get(relay.http_url + path, headers=headers) as response:
                        assert response.status == status
                async with session.get(relay.http_url + "/anon/x") as response:
                    assert response.status == 502  # the upstream is down
                samples = await scrape(url)
    finally:
        holder.close()
    requests = "hybridrelay_bridge_http_requests_total"
    assert value(samples, requests, entity="hc", status_class="2xx") == 2
    assert value(samples, requests, entity="hc", status_class="4xx") == 1
    assert value(samples, requests, entity="anon", status_class="5xx") == 1
    latency = "hybridrelay_bridge_http_request_latency_seconds_count"
    assert value(samples, latency, entity="hc") == 3
    outcome = "hybridrelay_bridge_connections_total"
    assert value(samples, outcome, kind="http", entity="hc", outcome="accepted") == 3
    assert (
        value(samples, outcome, kind="http", entity="anon", outcome="destination_unreachable") == 1
    )
    for entity in ("hc", "anon"):
        assert (
            value(samples, "hybridrelay_bridge_listeners_online", kind="http", entity=entity) == 1
        )


# -- configuration ---------------------------------------------------------------------------------


def test_metrics_options() -> None:
    config = merge_cli(
        BridgeConfig(),
        ["-L", "1:a", "--metrics-port", "9464", "--metrics-host", "::1"],
    )
    assert (config.metrics_port, config.metrics_host) == (9464, "::1")
    assert parse_config({"metrics_port": 0}).metrics_port == 0
    assert BridgeConfig().metrics_port is None  # not served unless asked
    assert BridgeConfig().metrics_host == "127.0.0.1"
    with pytest.raises(ConfigurationError, match="metrics_port"):
        parse_config({"metrics_port": 65536})
    with pytest.raises(ConfigurationError, match="--metrics-port"):
        merge_cli(BridgeConfig(), ["--metrics-port", "-1"])
    with pytest.raises(ConfigurationError, match="metrics_host"):
        parse_config({"metrics_host": "not a host"})


async def test_a_metrics_port_in_use_stops_the_bridge_with_a_configuration_error(
    relay: Relay,
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = bridge_config(relay, local=["0:hc"], document={"metrics_port": port})
        with pytest.raises(ConfigurationError, match=f"cannot listen on 127.0.0.1:{port}"):
            async with running(config):
                pass


# -- the command ---------------------------------------------------------------------------------


async def test_bridge_command_serves_metrics_on_port_zero(relay: Relay) -> None:
    async with tcp_server() as dest:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hybridrelay",
            "bridge",
            "-x",
            relay.connection_string(),
            "-R",
            f"hc:127.0.0.1:{dest.port}",
            "--metrics-port",
            "0",
            "--shutdown-grace-period",
            "2",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        lines: list[str] = []
        url = ""
        try:
            async with asyncio.timeout(30):
                # Readiness is the log lines, not a sleep: the address, then "all forwards
                # are up" (the listener was online before it is written).
                while True:
                    line = (await process.stderr.readline()).decode(errors="replace")
                    assert line, "the bridge exited before it was ready:\n" + "".join(lines)
                    lines.append(line)
                    found = re.search(r"metrics on (http://127\.0\.0\.1:\d+)/metrics", line)
                    if found:
                        url = found.group(1)
                    if "all forwards are up" in line:
                        break
            assert url, "".join(lines)
            assert await get(url + "/readyz") == (200, "ready\n")
            samples = await scrape(url)
            labels = {"kind": "remote", "entity": "hc"}
            assert value(samples, "hybridrelay_bridge_listeners_online", **labels) == 1
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                _, rest = await process.communicate()
    err = "".join(lines) + rest.decode(errors="replace")
    assert process.returncode == 0, err
    assert "Traceback" not in err
    key = relay.connection_string().split("SharedAccessKey=")[1]
    assert key not in err
