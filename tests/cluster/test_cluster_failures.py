"""Failures of a cluster: a node killed with SIGKILL (subprocess nodes: ``serve --cluster``) and
its listener moving to another node; Redis stopped and restarted under load (in-process nodes):
local pairs keep working, ``/readyz`` says not ready, one log line per node, recovery without a
restart, no entity lost."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from hybridrelay.client import HybridConnectionClient, HybridConnectionListener
from hybridrelay.exceptions import RelayError
from tests.client.helpers import root_provider
from tests.cluster.conftest import RedisServer, cluster_nodes
from tests.cluster.test_cluster import (
    echo,
    echoed,
    listening_across,
    round_trip,
    sees_listener,
    until,
)
from tests.cluster.test_endpoints import refused_endpoint
from tests.serve_process import ServeProcess, relay_document, serve, write_config

#: What docs/CLUSTER.md states: a new connection through a surviving node succeeds within this
#: long of a node's SIGKILL (the listener's first reconnect is at once, to the next endpoint;
#: the dead node is skipped at once as its pub/sub connection is gone, and its lease runs out
#: in at most 4 s).
FAILOVER_BOUND = 6.0


async def try_round_trip(base_url: str, payload: bytes) -> bool:
    try:
        async with asyncio.timeout(5):
            async with HybridConnectionClient(base_url, "hc", root_provider()) as client:
                return await echoed(client, payload) == payload
    except (RelayError, TimeoutError, OSError):
        return False


@asynccontextmanager
async def serve_nodes(config: Path, url: str, count: int) -> AsyncIterator[list[ServeProcess]]:
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(serve(config, "--cluster", url)) for _ in range(count)
        ]


@pytest.mark.timeout(90)
async def test_a_killed_node_s_listener_comes_back_on_another_node(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Node 1 is a subprocess (SIGKILL); nodes 2 and 3 run here (fewer processes to start).
    config = write_config(tmp_path / "relay.yaml", relay_document())
    file_entity = {"entities": [{"name": "hc"}]}
    async with (
        serve_nodes(config, redis_server.url, 1) as (one,),
        cluster_nodes(redis_server.url, 2, node_options={0: file_entity, 1: file_entity}) as (
            two,
            three,
        ),
    ):
        listener = HybridConnectionListener([one.base_url, two.base_url], "hc", root_provider())
        async with listener:
            echoing = asyncio.get_running_loop().create_task(echo(listener))
            # Node 3 learns of the listener on node 1 within its route cache's second.
            await until(lambda: try_round_trip(three.base_url, b"before"), 10.0)

            loop = asyncio.get_running_loop()
            one.signal(signal.SIGKILL)
            killed_at = loop.time()
            await one.wait()
            await until(lambda: try_round_trip(three.base_url, b"after"), FAILOVER_BOUND + 4)
            recovered = loop.time() - killed_at
            # The surviving node that holds the listener now serves its own senders too.
            assert await try_round_trip(two.base_url, b"local")
            echoing.cancel()
        logging.getLogger(__name__).info("failover: %.2f s after SIGKILL", recovered)
        assert recovered < FAILOVER_BOUND, f"new connections failed for {recovered:.1f}s"


@pytest.mark.timeout(90)
async def test_redis_restarted_under_load(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hybridrelay")
    async with cluster_nodes(redis_server.url, 2) as (one, two):
        async with listening_across(one, two):
            assert await round_trip(two, b"cross") == b"cross"
            failures = 0
            done = 0
            stop = asyncio.Event()

            async def local_load() -> None:
                nonlocal failures, done
                while not stop.is_set():
                    try:
                        ok = await round_trip(one, b"local") == b"local"
                    except RelayError:
                        ok = False
                    failures += not ok
                    done += 1

            load = asyncio.get_running_loop().create_task(local_load())
            redis_server.stop()
            # Both nodes notice (/readyz reads a store key) and keep serving local pairs.
            await until(lambda: asyncio.sleep(0, one.server.store.get("hc") is not None))
            assert await one.server._readiness() is not None
            assert await two.server._readiness() is not None
            before = done
            await until(lambda: asyncio.sleep(0, done >= before + 10), 20.0)

            redis_server.start()
            await until(lambda: _ready(one), 15.0)
            await until(lambda: _ready(two), 15.0)
            # Cross-node routing is back (registrations written again) without a restart.
            await until(lambda: _cross_ok(two), 15.0)
            stop.set()
            await load
        assert failures == 0, f"{failures} of {done} local round trips failed"
        assert two.server.store.get("hc") is not None  # the entity outlived the outage
        outage_lines = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert 1 <= len(outage_lines) <= 2, [r.getMessage() for r in outage_lines]  # per node
        # Logged once Redis has answered for OutageLog.QUIET seconds without a failure.
        await until(
            lambda: asyncio.sleep(
                0, any("reachable again" in r.getMessage() for r in caplog.records)
            )
        )


async def _ready(node: object) -> bool:
    from tests.conftest import Relay

    assert isinstance(node, Relay)
    return await node.server._readiness() is None


async def _cross_ok(node: object) -> bool:
    from tests.conftest import Relay

    assert isinstance(node, Relay)
    return await try_round_trip(node.base_url, b"again")


@pytest.mark.timeout(60)
async def test_a_draining_node_s_listener_moves_and_senders_keep_connecting(
    redis_server: RedisServer,
) -> None:
    """One step of a rolling restart: node 1 drains (SIGTERM's path); its listener is told
    1012, reconnects to node 2 (its next endpoint), and senders on node 2 keep connecting."""
    file_entity = {"entities": [{"name": "hc"}]}
    options = {0: file_entity, 1: file_entity}
    async with cluster_nodes(redis_server.url, 2, node_options=options) as (one, two):
        listener = HybridConnectionListener([one.base_url, two.base_url], "hc", root_provider())
        async with listener:
            echoing = asyncio.get_running_loop().create_task(echo(listener))
            await until(lambda: sees_listener(two, "hc"))
            assert await round_trip(two, b"before") == b"before"
            await one.server.drain(grace=1.0)
            await until(lambda: asyncio.sleep(0, two.server.broker.listener_count("hc") == 1))
            assert await round_trip(two, b"after") == b"after"
            echoing.cancel()


@pytest.mark.timeout(60)
async def test_a_sender_waits_for_a_listener_that_moves_to_another_node(
    redis_server: RedisServer,
) -> None:
    """Node 1 drains; its listener's next endpoint refuses, so it reaches node 2 only at its
    second attempt (~1 s later, the backoff). A sender arriving at node 2 meanwhile is held
    (LISTENER_RETURN_WAIT) until the listener is back, instead of being refused 404."""
    file_entity = {"entities": [{"name": "hc"}]}
    options = {0: file_entity, 1: file_entity}
    async with cluster_nodes(redis_server.url, 2, node_options=options) as (one, two):
        listener = HybridConnectionListener(
            [one.base_url, refused_endpoint(), two.base_url], "hc", root_provider()
        )
        offline = asyncio.Event()
        listener.on_status(lambda status, _: offline.set() if status == "offline" else None)
        async with listener:
            echoing = asyncio.get_running_loop().create_task(echo(listener))
            await until(lambda: sees_listener(two, "hc"))
            assert await round_trip(two, b"before") == b"before"
            draining = asyncio.get_running_loop().create_task(one.server.drain(grace=1.0))
            async with asyncio.timeout(10):
                await offline.wait()  # the 1012: the listener is on no node now
            assert two.server.broker.listener_count("hc") == 0
            assert await round_trip(two, b"held") == b"held"
            assert two.server.broker.listener_count("hc") == 1
            await draining
            echoing.cancel()
