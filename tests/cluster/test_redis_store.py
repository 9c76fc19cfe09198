"""The cluster's management store (store/redis.py) on a real redis-server: the store contract
of the SQLite store, two nodes' stores seeing each other's changes, concurrent writes, a lost
change message made good by the reconciliation, and an unreachable Redis."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from hybridrelay.auth.sas import Rights
from hybridrelay.store.base import (
    MAX_RULES_PER_SCOPE,
    NotFoundError,
    StoreQuotaError,
    StoreUnavailableError,
)
from hybridrelay.store.records import NamespaceState
from hybridrelay.store.redis import RedisStore, redacted_url
from tests.cluster.conftest import RedisServer
from tests.cluster.test_cluster import until

pytestmark = pytest.mark.timeout(30)

ALL = Rights.LISTEN | Rights.SEND | Rights.MANAGE
ROOT = "RootManageSharedAccessKey"


async def open_store(url: str, **kw: object) -> RedisStore:
    return await RedisStore.open(
        url,
        namespace="contoso",
        initial_rules=[(ROOT, ALL)],
        **kw,  # type: ignore[arg-type]
    )


async def test_changes_are_published_and_kept(redis_server: RedisServer) -> None:
    store = await open_store(redis_server.url)
    seen: list[NamespaceState] = []
    store.subscribe(seen.append)
    try:
        (root,) = store.state.namespace.rules
        assert root.name == ROOT and root.rights == ALL and root.primary_key not in repr(store)
        record, created = await store.put_hybrid_connection("Plant/Line-1", user_metadata="m")
        assert created and record.requires_client_authorization
        updated, created = await store.put_hybrid_connection(
            "plant/line-1", requires_client_authorization=False
        )
        assert not created and updated.name == "Plant/Line-1" and updated.user_metadata == "m"
        rule, created = await store.put_rule("edge", Rights.LISTEN, entity="plant/line-1")
        assert created
        changed, created = await store.put_rule("EDGE", Rights.SEND, entity="Plant/line-1")
        assert not created and changed.primary_key == rule.primary_key
        given = await store.regenerate_key("edge", "primary", entity="plant/line-1", key="k" * 40)
        assert given.primary_key == "k" * 40 and given.secondary_key == rule.secondary_key
        await store.update_namespace(tags={"site": "a"})
        assert [state.version for state in seen] == list(range(1, 7))
        assert seen[-1] is store.state
        before = store.state
    finally:
        await store.aclose()
    reopened = await open_store(redis_server.url)  # its initial rules do not replace the root
    try:
        assert reopened.state.namespace == before.namespace
        assert dict(reopened.state.hybrid_connections) == dict(before.hybrid_connections)
    finally:
        await reopened.aclose()


async def test_deletes_and_bounds(redis_server: RedisServer) -> None:
    store = await open_store(redis_server.url, max_hybrid_connections=2)
    try:
        await store.put_hybrid_connection("hc")
        await store.put_rule("edge", Rights.SEND, entity="hc")
        assert await store.delete_rule("EDGE", entity="hc")
        assert not await store.delete_rule("edge", entity="hc")
        assert await store.delete_hybrid_connection("HC")
        assert store.state.get("hc") is None
        assert not await store.delete_hybrid_connection("hc")
        with pytest.raises(NotFoundError):
            await store.put_rule("edge", Rights.SEND, entity="missing")
        with pytest.raises(NotFoundError):
            await store.regenerate_key("nobody", "primary")
        for index in range(MAX_RULES_PER_SCOPE - 1):
            await store.put_rule(f"rule-{index}", Rights.SEND)
        with pytest.raises(StoreQuotaError):
            await store.put_rule("one-too-many", Rights.SEND)
        await store.put_hybrid_connection("a")
        await store.put_hybrid_connection("b")
        with pytest.raises(StoreQuotaError):
            await store.put_hybrid_connection("c")
    finally:
        await store.aclose()


async def test_two_nodes_see_each_other_and_lose_no_concurrent_write(
    redis_server: RedisServer,
) -> None:
    one, two = await open_store(redis_server.url), await open_store(redis_server.url)
    try:
        await one.put_hybrid_connection("hc")
        await until(lambda: asyncio.sleep(0, two.state.get("hc") is not None), 2.0)
        # Twenty rules on one entity, written by both nodes at once: none is lost.
        await asyncio.gather(
            *(
                (one if index % 2 else two).put_rule(f"r{index}", Rights.SEND, entity="hc")
                for index in range(MAX_RULES_PER_SCOPE)
            )
        )

        def names(store: RedisStore) -> set[str]:
            record = store.state.get("hc")
            return {rule.name for rule in record.rules} if record else set()

        expected = {f"r{index}" for index in range(MAX_RULES_PER_SCOPE)}
        await until(lambda: asyncio.sleep(0, names(one) == names(two) == expected), 2.0)
        assert await two.delete_hybrid_connection("hc")
        await until(lambda: asyncio.sleep(0, one.state.get("hc") is None), 2.0)
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_lost_change_message_is_made_good_by_the_reconciliation(
    redis_server: RedisServer,
) -> None:
    store = await open_store(redis_server.url, reconcile_interval=0.2)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        # Another writer that changes the hash and the version but never publishes.
        entity = {"name": "quiet", "auth": True, "created": 1.0, "updated": 1.0, "rules": []}
        await raw.hset("hybridrelay:{contoso}:store", "hc:quiet", json.dumps(entity))
        await raw.incr("hybridrelay:contoso:version")
        await until(lambda: asyncio.sleep(0, store.state.get("quiet") is not None), 3.0)
    finally:
        await raw.aclose()
        await store.aclose()


async def test_an_unreachable_redis_is_a_one_line_error(redis_server: RedisServer) -> None:
    url = f"redis://:sekret@127.0.0.1:{redis_server.port}/0"
    redis_server.stop()
    with pytest.raises(StoreUnavailableError) as caught:
        await open_store(url)
    assert "sekret" not in str(caught.value) and "\n" not in str(caught.value)
    assert redacted_url(url) == f"redis://***@127.0.0.1:{redis_server.port}/0"
