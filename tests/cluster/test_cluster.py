"""Three relay nodes of one cluster on a real redis-server, in this process: a listener on node 1
reached by senders on node 3 over WebSocket, HTTP (inline-sized and large) and the relay's own
ingress; the bytes flow through node 3 only; the shared store; a deletion through node 2's
management API closing connections on nodes 1 and 3; a regenerated key refused everywhere."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from hybridrelay.auth.sas import Rights, create_token
from hybridrelay.client import HybridConnectionClient, HybridConnectionListener
from hybridrelay.client.http import RelayedHttpContext
from hybridrelay.exceptions import QuotaExceededError, RelayError, RelayHttpError
from hybridrelay.server.cluster_broker import (
    DEFAULT_LEASE,
    LISTENER_RETURN_WAIT,
    OFFER_ANSWER_TIMEOUT,
    ClusterBroker,
)
from hybridrelay.store.redis import RedisStore
from tests.client.helpers import root_provider
from tests.cluster.conftest import RedisServer, cluster_nodes, redis_binary
from tests.conftest import ROOT_KEY, ROOT_KEY_NAME, Relay, TlsFiles

KIB = 1024
#: A node option: "hc" in the file (an entity without the store).
HC = {"entities": [{"name": "hc"}]}


def in_an_hour() -> int:
    return int(time.time()) + 3600


def broker_of(relay: Relay) -> ClusterBroker:
    broker = relay.server.broker
    assert isinstance(broker, ClusterBroker)
    return broker


def store_of(relay: Relay) -> RedisStore:
    store = relay.server.store.store
    assert isinstance(store, RedisStore)
    return store


async def until(check: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    """Wait for cluster state that has no event to wait on (another node's view of Redis)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await check():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def sees_listener(relay: Relay, entity: str) -> bool:
    return bool(await broker_of(relay)._remote_routes(entity))


async def echo(listener: HybridConnectionListener) -> None:
    async for stream in listener:
        asyncio.get_running_loop().create_task(_echo_stream(stream))


async def _echo_stream(stream: object) -> None:
    from hybridrelay.client import HybridConnectionStream

    assert isinstance(stream, HybridConnectionStream)
    try:
        while data := await stream.read():
            await stream.write(data)
        await stream.write_eof()
    except RelayError:
        pass


async def reverse_body(ctx: RelayedHttpContext) -> None:
    body = await ctx.read()
    await ctx.respond(200, "Reversed", {"x-length": str(len(body))})
    await ctx.write(body[::-1])
    await ctx.finish()


@asynccontextmanager
async def listening(
    relay: Relay | str, entity: str = "hc"
) -> AsyncIterator[HybridConnectionListener]:
    """An echoing listener (and HTTP ``reverse_body``) on ``relay`` (or a base URL)."""
    base_url = relay if isinstance(relay, str) else relay.base_url
    listener = HybridConnectionListener(
        base_url, entity, root_provider(), request_handler=reverse_body
    )
    async with listener:
        task = asyncio.get_running_loop().create_task(echo(listener))
        try:
            yield listener
        finally:
            task.cancel()


@asynccontextmanager
async def listening_across(
    one: Relay, two: Relay, entity: str = "hc"
) -> AsyncIterator[HybridConnectionListener]:
    """``entity`` created through node ``one``'s store, a listener on ``one``, both seen by
    node ``two``."""
    await store_of(one).put_hybrid_connection(entity)
    await until(lambda: asyncio.sleep(0, two.server.store.get(entity) is not None))
    async with listening(one, entity) as listener:
        await until(lambda: sees_listener(two, entity))
        yield listener


async def echoed(client: HybridConnectionClient, payload: bytes) -> bytes:
    """What an echoing listener sends back of ``payload`` through a new connection."""
    stream = await client.create_connection()
    await stream.write(payload)
    await stream.write_eof()
    parts = []
    while data := await stream.read():
        parts.append(data)
    await stream.aclose()
    return b"".join(parts)


async def round_trip(relay: Relay, payload: bytes, entity: str = "hc") -> bytes:
    async with HybridConnectionClient(relay.base_url, entity, root_provider()) as client:
        return await echoed(client, payload)


def counting(counts: dict[str, int], name: str) -> Callable[[RelayedHttpContext], Awaitable[None]]:
    """A request handler that answers 200 and counts its requests in ``counts[name]``."""

    async def handler(ctx: RelayedHttpContext) -> None:
        counts[name] += 1
        await ctx.respond(200, "OK", {})
        await ctx.finish()

    return handler


def http_client(relay: Relay, entity: str = "hc") -> httpx.AsyncClient:
    token = create_token(
        f"http://127.0.0.1:{relay.server.port}/{entity}",
        ROOT_KEY_NAME,
        ROOT_KEY,
        expiry=in_an_hour(),
    )
    return httpx.AsyncClient(
        base_url=relay.http_url, timeout=20, headers={"ServiceBusAuthorization": token}
    )


@pytest.mark.timeout(60)
async def test_a_sender_on_node_3_reaches_a_listener_on_node_1(
    redis_server: RedisServer,
) -> None:
    # An ingress port names a hybrid connection of the file: every node's file has "hc".
    entity = {"entities": [{"name": "hc"}]}
    ingress = {"ingress": [{"listen": "127.0.0.1:0", "hybrid_connection": "hc"}]}
    options = {0: entity, 1: entity, 2: {**entity, **ingress}}
    async with cluster_nodes(redis_server.url, 3, node_options=options) as (one, _, three):
        async with listening(one):
            await until(lambda: sees_listener(three, "hc"))
            assert three.server.broker.listener_count("hc") == 0  # none of its own

            # WebSocket: the accept went out on node 1, the rendezvous is on node 3.
            payload = os.urandom(200 * KIB)
            assert await round_trip(three, payload) == payload

            # HTTP, small (inline-sized) and large (address-only): always a rendezvous on 3.
            async with http_client(three) as http:
                for size in (10, 300 * KIB):
                    body = os.urandom(size)
                    response = await http.post("/hc/x", content=body)
                    assert response.status_code == 200, response.text
                    assert response.headers["x-length"] == str(size)
                    assert response.content == body[::-1]

            # The relay's own ingress port on node 3.
            address = three.server.ingress[0].address
            assert address is not None
            reader, writer = await asyncio.open_connection(*address[:2])
            writer.write(b"through the ingress")
            await writer.drain()
            assert await reader.readexactly(19) == b"through the ingress"
            # The tunnel's legs are on node 3; node 1 carries none of its bytes.
            assert three.server._legs.connections()
            assert not one.server._legs.connections()
            writer.close()
            await writer.wait_closed()


@pytest.mark.timeout(60)
async def test_spread_counts(redis_server: RedisServer) -> None:
    """Of 40 senders on node 3, listeners on node 1 and on node 3 each get some."""
    async with cluster_nodes(redis_server.url, 3) as (one, _, three):
        await store_of(one).put_hybrid_connection("hc")
        await until(lambda: asyncio.sleep(0, three.server.store.get("hc") is not None))
        counts = {"one": 0, "three": 0}

        l1 = HybridConnectionListener(
            one.base_url, "hc", root_provider(), request_handler=counting(counts, "one")
        )
        l3 = HybridConnectionListener(
            three.base_url, "hc", root_provider(), request_handler=counting(counts, "three")
        )
        async with l1, l3:
            await until(lambda: sees_listener(three, "hc"))
            async with http_client(three) as http:
                for _ in range(40):
                    assert (await http.get("/hc/")).status_code == 200
        assert counts["one"] >= 5 and counts["three"] >= 5, counts


@pytest.mark.timeout(60)
async def test_http_requests_spread_with_no_connect_before_them(
    redis_server: RedisServer,
) -> None:
    """Node 3 has never read the routes (no WebSocket connect, no test helper reading them):
    its HTTP requests still reach node 1's listener as well as its own."""
    async with cluster_nodes(redis_server.url, 3) as (one, _, three):
        await store_of(one).put_hybrid_connection("hc")
        await until(lambda: asyncio.sleep(0, three.server.store.get("hc") is not None))
        counts = {"one": 0, "three": 0}

        raw = aioredis.from_url(redis_server.url)
        try:
            async with (
                HybridConnectionListener(
                    one.base_url, "hc", root_provider(), request_handler=counting(counts, "one")
                ),
                HybridConnectionListener(
                    three.base_url, "hc", root_provider(), request_handler=counting(counts, "three")
                ),
            ):
                await until(lambda: sees_count(raw, one, 1))
                await until(lambda: sees_count(raw, three, 1))
                async with http_client(three) as http:
                    for _ in range(40):
                        assert (await http.get("/hc/")).status_code == 200
        finally:
            await raw.aclose()
        # One draw per request, weighted 1:1 (the first ones, before the routes are read,
        # stay local): ~20 each; below 8 is about 1 in 10,000.
        assert counts["one"] >= 8 and counts["three"] >= 8, counts


@pytest.mark.timeout(60)
async def test_local_first_keeps_senders_on_the_node_while_it_has_a_listener(
    redis_server: RedisServer,
) -> None:
    """``store.spread: local-first`` on node 2: its requests go to its own listener while it
    has one, to node 1's once it has none."""
    local_first = {"spread": "local-first"}
    async with cluster_nodes(redis_server.url, 2, node_options={1: local_first}) as (one, two):
        await store_of(one).put_hybrid_connection("hc")
        await until(lambda: asyncio.sleep(0, two.server.store.get("hc") is not None))
        counts = {"one": 0, "two": 0}
        raw = aioredis.from_url(redis_server.url)
        try:
            async with HybridConnectionListener(
                one.base_url, "hc", root_provider(), request_handler=counting(counts, "one")
            ):
                own = HybridConnectionListener(
                    two.base_url, "hc", root_provider(), request_handler=counting(counts, "two")
                )
                async with own:
                    await until(lambda: sees_count(raw, one, 1))
                    await until(lambda: sees_listener(two, "hc"))  # the routes are known
                    async with http_client(two) as http:
                        for _ in range(20):
                            assert (await http.get("/hc/")).status_code == 200
                    assert counts == {"one": 0, "two": 20}, counts
                async with http_client(two) as http:  # no listener of its own any more
                    for _ in range(5):
                        assert (await http.get("/hc/")).status_code == 200
        finally:
            await raw.aclose()
        assert counts == {"one": 5, "two": 20}, counts


@pytest.mark.timeout(60)
async def test_a_deletion_on_node_2_closes_connections_on_nodes_1_and_3(
    redis_server: RedisServer,
) -> None:
    options = {1: {"management": True}}
    async with cluster_nodes(redis_server.url, 3, node_options=options) as (one, two, three):
        await store_of(one).put_hybrid_connection("doomed")
        await until(lambda: asyncio.sleep(0, three.server.store.get("doomed") is not None))
        closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_status(status: str, error: BaseException | None) -> None:
            if status == "offline" and not closed.done():
                closed.set_result(None)

        async with listening(one, "doomed") as listener:
            listener.on_status(on_status)
            await until(lambda: sees_listener(three, "doomed"))
            async with HybridConnectionClient(three.base_url, "doomed", root_provider()) as c:
                stream = await c.create_connection()
                await stream.write(b"ping")
                assert await stream.read() == b"ping"
                manage = create_token(
                    f"http://127.0.0.1:{two.server.port}/",
                    ROOT_KEY_NAME,
                    ROOT_KEY,
                    expiry=in_an_hour(),
                )
                async with httpx.AsyncClient(base_url=two.server.management_url or "") as http:
                    response = await http.delete(
                        "/subscriptions/s/resourceGroups/g/providers/Microsoft.Relay/"
                        "namespaces/hybridrelay/hybridConnections/doomed",
                        params={"api-version": "2021-11-01"},
                        headers={"Authorization": manage},
                    )
                assert response.status_code in (200, 204), response.text
                # Node 3 closes the sender's pair, node 1 the listener's control channel.
                async with asyncio.timeout(10):
                    assert await stream.read() == b""
                    await stream.aclose()  # answer the relay's close (it waits for it)
                    await closed
        assert one.server.store.get("doomed") is None
        assert three.server.store.get("doomed") is None


@pytest.mark.timeout(60)
async def test_a_regenerated_key_is_refused_on_every_node(redis_server: RedisServer) -> None:
    async with cluster_nodes(redis_server.url, 3) as nodes:
        store = store_of(nodes[0])
        await store.put_hybrid_connection("hc")
        rule, _ = await store.put_rule("site", Rights.SEND)
        old_key = rule.primary_key

        def allowed(node: Relay, key: str) -> bool:
            entity = node.server.store.get("hc")
            if entity is None:
                return False
            token = create_token(
                f"http://127.0.0.1:{node.server.port}/hc", "site", key, expiry=in_an_hour()
            )
            return node.server.access.authorize(token, entity, Rights.SEND).allowed

        # The rule reaches every node (its message), then its key's replacement does.
        await until(lambda: asyncio.sleep(0, all(allowed(node, old_key) for node in nodes)), 2.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await store.regenerate_key("site", "primary")
        await until(
            lambda: asyncio.sleep(0, not any(allowed(node, old_key) for node in nodes)), 2.0
        )
        # Well inside the stated bound (the message's delivery; RECONCILE_INTERVAL if lost).
        assert loop.time() - started < 2.0


@pytest.mark.timeout(60)
def test_without_cluster_no_redis_is_imported() -> None:
    code = (
        "import sys, asyncio\n"
        "from hybridrelay.server import RelayServer\n"
        "from hybridrelay.cli import main\n"
        "assert 'redis' not in sys.modules, 'redis imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.timeout(60)
async def test_dead_nodes_are_not_routed_to(redis_server: RedisServer) -> None:
    """A node whose lease ran out is removed (with its routes) by the next renewal of a live
    node; a node whose lease is current but that nobody hears (its process is gone) is skipped
    at once, without waiting for its answer: the sender waits only for the dead node's
    listeners to come back elsewhere (LISTENER_RETURN_WAIT), then is answered 404."""
    raw = aioredis.Redis.from_url(redis_server.url)
    prefix = "hybridrelay:hybridrelay:"
    try:
        async with cluster_nodes(redis_server.url, 1, node_options={0: HC}) as (node,):
            now = time.time()
            await raw.zadd(prefix + "nodes", {"expired": now - 1, "silent": now + 60})
            for ghost in ("expired", "silent"):
                await raw.hset(prefix + "routes:{hc}", ghost, "3")
                await raw.sadd(prefix + f"node:{{{ghost}}}:entities", "hc")

            async def expired_removed() -> bool:
                return not await raw.hexists(prefix + "routes:{hc}", "expired")

            await until(expired_removed, 2 * DEFAULT_LEASE / 3 + 1)
            assert await raw.zscore(prefix + "nodes", "expired") is None
            await until(lambda: asyncio.sleep(0, "silent" in broker_of(node).live_nodes))
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with HybridConnectionClient(node.base_url, "hc", root_provider()) as client:
                with pytest.raises(RelayHttpError) as refused:
                    await client.create_connection()
            assert refused.value.status == 404
            assert broker_of(node)._is_dead("silent")
            # Not OFFER_ANSWER_TIMEOUT waited out on top of the wait for a listener's return.
            assert loop.time() - started < LISTENER_RETURN_WAIT + OFFER_ANSWER_TIMEOUT / 2
    finally:
        await raw.aclose()


@pytest.mark.timeout(60)
async def test_a_cluster_over_rediss_with_a_password(
    tmp_path: Path, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """``rediss://:password@host/db?ssl_ca_certs=...`` (redis-py's URL form): the store and the
    routing work over TLS with a password, and the password is in no log line."""
    caplog.set_level(logging.DEBUG, logger="hybridrelay")
    directory = tmp_path / "redis-tls"
    directory.mkdir()
    server = RedisServer(redis_binary(), directory, tls=tls_files, password="s3cret-pw")
    server.start()
    try:
        async with cluster_nodes(server.url, 2, node_options={0: HC, 1: HC}) as (one, two):
            assert await one.server._readiness() is None
            assert "s3cret-pw" not in repr(store_of(one))
            async with listening(one):
                await until(lambda: sees_listener(two, "hc"))
                assert await round_trip(two, b"over tls") == b"over tls"
            await store_of(two).put_hybrid_connection("made-on-two")
            await until(lambda: asyncio.sleep(0, one.server.store.get("made-on-two") is not None))
    finally:
        server.stop()
    assert not [r for r in caplog.records if "s3cret-pw" in r.getMessage()]


@pytest.mark.timeout(60)
async def test_idle_listeners_cost_no_redis_operations(redis_server: RedisServer) -> None:
    """The lease is renewed per node: 20 idle listeners (the default limit is 25) add no Redis
    command (counted by Redis' own INFO commandstats over two seconds; a per-listener renewal
    would add at least 20)."""
    raw = aioredis.Redis.from_url(redis_server.url)

    async def calls() -> int:
        stats = await raw.info("commandstats")
        return sum(int(value["calls"]) for value in stats.values())

    try:
        async with cluster_nodes(redis_server.url, 1, node_options={0: HC}) as (node,):
            listeners = [
                HybridConnectionListener(node.base_url, "hc", root_provider()) for _ in range(20)
            ]
            for listener in listeners:
                await listener.open()
            try:
                await until(lambda: asyncio.sleep(0, node.server.broker.listener_count("hc") == 20))
                await until(lambda: sees_count(raw, node, 20))  # registrations written
                before = await calls()
                await asyncio.sleep(2.0)  # the idle period being measured
                spent = await calls() - before - 1  # our own INFO
            finally:
                for listener in listeners:
                    await listener.aclose()
        # One node: 2 commands per renewal (every lease / 3 s) and a version check every 5 s.
        assert spent <= 2 * (2.0 / (DEFAULT_LEASE / 3) + 1) + 2, spent
    finally:
        await raw.aclose()


async def sees_count(raw: aioredis.Redis, node: Relay, count: int) -> bool:
    value = await raw.hget("hybridrelay:hybridrelay:routes:{hc}", broker_of(node).node_id)
    return value is not None and int(value) == count


@pytest.mark.timeout(30)
async def test_a_node_does_not_offer_senders_to_itself_through_redis(
    redis_server: RedisServer,
) -> None:
    """Its own entry in the routes is its local listeners: offered locally, never published."""
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        async with cluster_nodes(redis_server.url, 1, node_options={0: HC}) as (node,):
            async with listening(node):
                broker = broker_of(node)

                async def registered() -> bool:
                    return bool(
                        await raw.hget("hybridrelay:hybridrelay:routes:{hc}", broker.node_id)
                    )

                await until(registered)
                broker._routes.clear()  # read the routes again, with this node's entry in
                assert await broker._remote_routes("hc") == []
                assert await round_trip(node, b"local") == b"local"
    finally:
        await raw.aclose()


@pytest.mark.timeout(60)
async def test_a_connect_is_watched_on_the_listeners_node_only_while_its_sender_may_wait(
    redis_server: RedisServer,
) -> None:
    """The offer of a connect asks the listener's node to watch that listener (and say
    ``gone``) for the sender's ``rendezvous_timeout`` and the answer's timeout, not the 120 s
    of an HTTP request: a listener dropped later cost a ``PUBLISH`` for each cross-node tunnel
    of the last two minutes (PERFORMANCE.md, the cluster scenario's idle row)."""
    raw = aioredis.Redis.from_url(redis_server.url)
    pubsub = raw.pubsub()
    await pubsub.psubscribe("hybridrelay:hybridrelay:node:*")
    try:
        confirmed = await pubsub.get_message(timeout=5)
        assert confirmed is not None and confirmed["type"] == "psubscribe", confirmed
        options: dict[int, dict[str, Any]] = {
            0: HC,
            1: {**HC, "limits": {"rendezvous_timeout": 7.0}},
        }
        async with cluster_nodes(redis_server.url, 2, node_options=options) as (one, two):
            async with listening(one):
                await until(lambda: sees_listener(two, "hc"))
                assert await round_trip(two, b"connect") == b"connect"
                async with http_client(two) as http:  # across nodes: address-only
                    response = await http.post("/hc/x", content=b"request")
                    assert response.status_code == 200, response.text
        # Both offers were published before their answers came: they are here, in order.
        ttls: list[float] = []
        while len(ttls) < 2:
            message = await pubsub.get_message(timeout=5)
            assert message is not None, f"offers seen: {ttls}"
            data = json.loads(message["data"])
            if data["op"] == "offer":
                ttls.append(data["ttl"])
        assert ttls == [7.0 + OFFER_ANSWER_TIMEOUT, 120.0]
    finally:
        await pubsub.aclose()
        await raw.aclose()


@pytest.mark.timeout(60)
async def test_listener_counts_and_the_listener_limit_are_cluster_wide(
    redis_server: RedisServer,
) -> None:
    """A listener on node 1: node 2's runtime information, ARM GET and dashboard count it (the
    dashboard lists node 2's own listeners only), and with
    ``max_listeners_per_connection: 1`` a second listener is refused on node 2 (429)."""
    options: dict[int, dict[str, Any]] = {
        index: {
            "entities": [{"name": "hc"}],
            "limits": {"max_listeners_per_connection": 1},
            "management": index == 1,
        }
        for index in (0, 1)
    }
    async with cluster_nodes(redis_server.url, 2, node_options=options) as (one, two):
        async with listening(one):
            await until(lambda: sees_listener(two, "hc"))
            token = create_token(
                f"http://127.0.0.1:{two.server.port}/hc",
                ROOT_KEY_NAME,
                ROOT_KEY,
                expiry=in_an_hour(),
            )
            manage = create_token(
                f"http://127.0.0.1:{two.server.port}/",
                ROOT_KEY_NAME,
                ROOT_KEY,
                expiry=in_an_hour(),
            )
            async with httpx.AsyncClient(timeout=10) as http:
                info = await http.get(
                    f"{two.http_url}/hc",
                    params={"api-version": "2016-07"},
                    headers={"Authorization": token, "X-PROCESS-AT": "ServiceBus"},
                )
                assert "<ListenerCount>1</ListenerCount>" in info.text, info.text
                arm = await http.get(
                    f"{two.server.management_url}/subscriptions/s/resourceGroups/g/providers/"
                    "Microsoft.Relay/namespaces/hybridrelay/hybridConnections/hc",
                    params={"api-version": "2021-11-01"},
                    headers={"Authorization": manage},
                )
                assert arm.json()["properties"]["listenerCount"] == 1, arm.text
            dashboard = two.server.dashboard
            assert dashboard is not None
            totals = await two.server.broker.listener_totals(["hc"])
            (row,) = dashboard.snapshot(totals)["hybridConnections"]
            assert row["listenerCount"] == 1 and row["listeners"] == []  # node 1's listener
            second = HybridConnectionListener(two.base_url, "hc", root_provider())
            with pytest.raises(QuotaExceededError):
                await second.open()
            await second.aclose()
