"""Two relay nodes on a Redis Cluster of three masters (``redis+cluster://``): a sender on node 2
reaches a listener on node 1 (WebSocket and HTTP), a key regenerated through node 1 is refused on
node 2, the store's keys share one hash slot while the entities' routes spread over the shards,
and the node channels are sharded pub/sub."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from hybridrelay.auth.sas import Rights, create_token
from tests.cluster.conftest import cluster_nodes
from tests.cluster.redis_topologies import RedisClusterSet, redis_cluster
from tests.cluster.test_cluster import (
    broker_of,
    http_client,
    listening,
    listening_across,
    round_trip,
    sees_listener,
    store_of,
    until,
)

KIB = 1024


@pytest.mark.timeout(60)
async def test_two_nodes_on_a_redis_cluster(tmp_path: Path) -> None:
    async with redis_cluster(tmp_path) as shards:
        async with cluster_nodes(shards.url, 2) as (one, two):
            for name in ("hc", *(f"spread{i}" for i in range(8))):
                await store_of(one).put_hybrid_connection(name)
            await until(lambda: asyncio.sleep(0, two.server.store.get("spread7") is not None))
            async with listening(one), listening(one, "spread3"):
                await until(lambda: sees_listener(two, "hc"))
                payload = os.urandom(100 * KIB)
                assert await round_trip(two, payload) == payload
                async with http_client(two) as http:
                    response = await http.post("/hc/x", content=b"abc")
                    assert response.status_code == 200, response.text
                    assert response.content == b"cba"

                # Which shard holds what, as the Redis Cluster itself says.
                raw = RedisCluster(host="127.0.0.1", port=shards.masters[0].port)
                try:
                    store_slots = {
                        await raw.cluster_keyslot(f"hybridrelay:{{hybridrelay}}:{key}")
                        for key in ("store", "version", "store-changes")
                    }
                    assert len(store_slots) == 1  # one slot: the store's transactions
                    route_slots = {
                        await raw.cluster_keyslot(f"hybridrelay:hybridrelay:routes:{{{name}}}")
                        for name in ("hc", "spread3")
                    }
                    assert len(route_slots) == 2  # keyed by entity
                    assert await raw.exists("hybridrelay:hybridrelay:routes:{spread3}") == 1
                finally:
                    await raw.aclose()
                # Node 1's channel is sharded pub/sub, subscribed on the shard of its slot.
                assert await _shard_subscribers(shards, _channel_of(one)) == 1

                # A burst of commands waits for its turn: redis-py's cluster pool raises
                # (MaxConnectionsError) when all of a shard's connections are in use.
                link = broker_of(two)._link
                key = "hybridrelay:hybridrelay:routes:{hc}"
                burst = await asyncio.gather(*(link.client.hgetall(key) for _ in range(300)))
                assert all(broker_of(one).node_id.encode() in routes for routes in burst)

                # A key regenerated through node 1 is refused on node 2.
                await store_of(one).put_rule("sender", Rights.SEND)
                rule = next(r for r in store_of(one).state.namespace.rules if r.name == "sender")
                await until(lambda: asyncio.sleep(0, _has_key(two, rule.primary_key)))
                async with _sender(two, "sender", rule.primary_key) as http:
                    assert (await http.post("/hc/x", content=b"k")).status_code == 200
                fresh = await store_of(one).regenerate_key("sender", "primary")
                await until(lambda: asyncio.sleep(0, not _has_key(two, rule.primary_key)))
                async with _sender(two, "sender", rule.primary_key) as http:
                    assert (await http.post("/hc/x", content=b"k")).status_code == 401
                assert fresh.primary_key != rule.primary_key
        # The nodes left at once (aclose): their lease entries and their routes, over two
        # shards, are gone.
        raw = RedisCluster(host="127.0.0.1", port=shards.masters[0].port)
        try:
            assert await raw.zcard("hybridrelay:hybridrelay:nodes") == 0
            for name in ("hc", "spread3"):
                assert not await raw.exists(f"hybridrelay:hybridrelay:routes:{{{name}}}")
        finally:
            await raw.aclose()


def _has_key(node: object, key: str) -> bool:
    from tests.conftest import Relay

    assert isinstance(node, Relay)
    return any(r.primary_key == key for r in store_of(node).state.namespace.rules)


def _sender(node: object, name: str, key: str) -> httpx.AsyncClient:
    from tests.conftest import Relay

    assert isinstance(node, Relay)
    token = create_token(
        f"http://127.0.0.1:{node.server.port}/hc", name, key, expiry=int(time.time()) + 3600
    )
    return httpx.AsyncClient(
        base_url=node.http_url, timeout=20, headers={"ServiceBusAuthorization": token}
    )


@pytest.mark.soak
@pytest.mark.timeout(120)
async def test_a_redis_cluster_shard_down_and_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The shard that holds the store is killed (no replica: the Redis Cluster is down) and
    started again: the nodes serve their own listeners meanwhile, report not ready, log the
    outage once each (calls to the other shards keep succeeding for a while: no flapping), and
    recover without a restart. ``python3 -m pytest -m soak tests/cluster``."""
    from tests.cluster.test_cluster_failures import try_round_trip

    caplog.set_level(logging.INFO, logger="hybridrelay")

    async with redis_cluster(tmp_path) as shards:
        async with cluster_nodes(shards.url, 2) as (one, two):
            async with listening_across(one, two):
                assert await round_trip(two, b"before") == b"before"
                raw = RedisCluster(host="127.0.0.1", port=shards.masters[0].port)
                try:
                    await raw.initialize()
                    holder = raw.get_node_from_key("hybridrelay:{hybridrelay}:store")
                finally:
                    await raw.aclose()
                assert holder is not None
                shard = next(m for m in shards.masters if m.port == holder.port)
                shard.kill()
                await until(lambda: _not_ready(one), 20.0)
                await until(lambda: _not_ready(two), 20.0)
                assert await round_trip(one, b"local") == b"local"  # its own listener
                shard.start()
                await until(lambda: _ready(one), 30.0)
                await until(lambda: _ready(two), 30.0)
                await until(lambda: try_round_trip(two.base_url, b"again"), 30.0)
                await store_of(two).put_hybrid_connection("after")
                await until(lambda: asyncio.sleep(0, one.server.store.get("after") is not None))
                await until(lambda: asyncio.sleep(0, _recovery_lines(caplog) == 2))
    outage = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outage) == 2, outage  # one per node


def _recovery_lines(caplog: pytest.LogCaptureFixture) -> int:
    return sum("reachable again" in r.getMessage() for r in caplog.records)


async def _ready(node: object) -> bool:
    from tests.conftest import Relay

    assert isinstance(node, Relay)
    return await node.server._readiness() is None


async def _not_ready(node: object) -> bool:
    return not await _ready(node)


@pytest.mark.soak
@pytest.mark.timeout(120)
async def test_a_node_channel_s_slot_moved_to_another_shard(tmp_path: Path) -> None:
    """Node 1's channel's hash slot is migrated to another shard (as a resharding does): Redis
    drops the sharded subscription there, and node 1 subscribes again on the new owner, so
    cross-node connections keep reaching it. ``python3 -m pytest -m soak tests/cluster``."""
    from tests.cluster.test_cluster_failures import try_round_trip

    async with redis_cluster(tmp_path) as shards:
        async with cluster_nodes(shards.url, 2) as (one, two):
            async with listening_across(one, two):
                assert await round_trip(two, b"before") == b"before"
                await _move_slot_of(_channel_of(one), [m.port for m in shards.masters])
                await until(lambda: try_round_trip(two.base_url, b"moved"), 30.0)
                assert await _shard_subscribers(shards, _channel_of(one)) == 1


def _channel_of(node: object) -> str:
    from tests.conftest import Relay

    assert isinstance(node, Relay)
    return f"hybridrelay:hybridrelay:node:{{{broker_of(node).node_id}}}"


async def _shard_subscribers(shards: RedisClusterSet, channel: str) -> int:
    """How many clients have ``SSUBSCRIBE``d to ``channel`` on the shard owning its slot now."""
    raw = RedisCluster(host="127.0.0.1", port=shards.masters[0].port)
    try:
        await raw.initialize()
        counts = await raw.execute_command(
            "PUBSUB SHARDNUMSUB", channel, target_nodes=raw.get_node_from_key(channel)
        )
    finally:
        await raw.aclose()
    ((name, count),) = counts
    assert name == channel.encode()
    return int(count)


async def _move_slot_of(key: str, ports: list[int]) -> None:
    """Migrate ``key``'s slot (and its keys) from its shard to another, as ``redis-cli
    --cluster reshard`` does: IMPORTING / MIGRATING, MIGRATE, then SETSLOT NODE everywhere."""
    clients = {port: aioredis.Redis(host="127.0.0.1", port=port) for port in ports}
    try:
        any_client = clients[ports[0]]
        slot = int(await any_client.execute_command("CLUSTER", "KEYSLOT", key))  # type: ignore[no-untyped-call]
        ids = {
            port: (await client.execute_command("CLUSTER", "MYID")).decode()  # type: ignore[no-untyped-call]
            for port, client in clients.items()
        }
        owner = ports[0]
        for port, client in clients.items():
            if await _owns(client, slot):
                owner = port
        target = next(port for port in ports if port != owner)
        await clients[target].execute_command(  # type: ignore[no-untyped-call]
            "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[owner]
        )
        await clients[owner].execute_command(  # type: ignore[no-untyped-call]
            "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target]
        )
        keys = await clients[owner].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)  # type: ignore[no-untyped-call]
        if keys:
            await clients[owner].execute_command(  # type: ignore[no-untyped-call]
                "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys
            )
        for port in (target, owner, *(p for p in ports if p not in (target, owner))):
            await clients[port].execute_command(  # type: ignore[no-untyped-call]
                "CLUSTER", "SETSLOT", slot, "NODE", ids[target]
            )
    finally:
        for client in clients.values():
            await client.aclose()


async def _owns(client: aioredis.Redis, slot: int) -> bool:
    """Whether the shard behind ``client`` serves ``slot`` (CLUSTER SHARDS' view of itself)."""
    myself = (await client.execute_command("CLUSTER", "MYID")).decode()  # type: ignore[no-untyped-call]
    for start, end, *node in await client.execute_command("CLUSTER", "SLOTS"):  # type: ignore[no-untyped-call]
        if start <= slot <= end and node[0][2].decode() == myself:
            return True
    return False
