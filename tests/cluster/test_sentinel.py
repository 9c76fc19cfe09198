"""Two relay nodes on a Redis Sentinel set (``redis+sentinel://``): a master and a replica with a
password, three sentinels. A listener on node 1, a sender on node 2; the master is killed with
SIGKILL (or an operator's ``SENTINEL FAILOVER`` moves it); Sentinel promotes the replica and the
cluster works again, without a restart, within :data:`SENTINEL_FAILOVER_BOUND`: cross-node
connections, store writes on the new master seen by both nodes, ``/readyz``; the entity written
before the failover (and replicated) is kept."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from tests.cluster.redis_topologies import sentinel_set
from tests.cluster.test_cluster import listening_across, round_trip, store_of, until
from tests.cluster.test_cluster_failures import try_round_trip
from tests.conftest import TlsFiles

#: What docs/CLUSTER.md states: once Sentinel has promoted the replica, a cross-node connection
#: succeeds within this long: a node's next connection asks the sentinels again, its
#: subscriptions are re-made (backoff at most 2 s), the lease renewed (every 1 s) and the routes
#: read again (cached 1 s). Sentinel's own part is down-after (0.5 s here) + its vote and the
#: promotion, about 1-2 s, or 2 x failover-timeout more when a vote fails and is tried again
#: (SentinelSet.promote waits for that).
NODES_BOUND = 10.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "how", ["sigkill", pytest.param("sentinel-failover", marks=pytest.mark.soak)]
)
async def test_a_sentinel_failover_is_followed_without_a_restart(
    how: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``sigkill``: the master crashes. ``sentinel-failover``: an operator's ``SENTINEL
    FAILOVER`` (the old master is demoted to a replica and answers writes with READONLY);
    ``python3 -m pytest -m soak tests/cluster/test_sentinel.py``."""
    from tests.cluster.conftest import cluster_nodes

    caplog.set_level(logging.INFO, logger="hybridrelay")
    async with sentinel_set(tmp_path) as sentinels:
        async with cluster_nodes(sentinels.url, 2) as (one, two):
            async with listening_across(one, two):
                payload = os.urandom(1000)
                assert await round_trip(two, payload) == payload
                # What Redis kept: the replica has the entity before the master dies.
                master = sentinels.client(sentinels.master)
                try:
                    assert await master.wait(1, 5000) == 1
                finally:
                    await master.aclose()
                old_port = sentinels.master.port

                loop = asyncio.get_running_loop()
                started = loop.time()
                if how == "sigkill":
                    sentinels.master.kill()
                await sentinels.promote(command=how == "sentinel-failover")
                promoted = loop.time() - started
                while not await try_round_trip(two.base_url, payload):
                    assert loop.time() - started - promoted < NODES_BOUND, "not back in time"
                recovered = loop.time() - started
                assert await sentinels.master_port() == sentinels.replica.port != old_port

                # The store writes to the new master; the other node hears of it.
                await store_of(two).put_hybrid_connection("after")
                await until(lambda: asyncio.sleep(0, one.server.store.get("after") is not None))
                assert one.server.store.get("hc") is not None  # kept across the failover
                assert await one.server._readiness() is None
                assert await two.server._readiness() is None
                if how == "sigkill":  # a crash is an outage, reported once per node, and its end
                    await until(lambda: asyncio.sleep(0, _lines(caplog, "reachable again") >= 1))
        # The figures docs/CLUSTER.md quotes (pytest -s shows them).
        print(  # noqa: T201
            f"sentinel {how}: replica promoted after {promoted:.2f} s, cross-node connections "
            f"back after {recovered:.2f} s ({recovered - promoted:.2f} s after the promotion)"
        )
    assert _lines(caplog, "unreachable") <= 2  # one per node at most
    if how == "sigkill":
        assert _lines(caplog, "unreachable") >= 1


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(60)
async def test_tls_sentinels_and_master_with_a_password(
    tmp_path: Path, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """``rediss+sentinel://``: the sentinels, the master and the replica speak TLS only; the
    nodes route across and share the store, and the password is in no log line."""
    from tests.cluster.conftest import cluster_nodes

    caplog.set_level(logging.DEBUG, logger="hybridrelay")
    async with sentinel_set(tmp_path, tls=tls_files, settle=False) as sentinels:
        assert sentinels.url.startswith("rediss+sentinel://")
        async with cluster_nodes(sentinels.url, 2) as (one, two):
            async with listening_across(one, two):
                assert await round_trip(two, b"over tls") == b"over tls"
                await store_of(two).put_hybrid_connection("after")
                await until(lambda: asyncio.sleep(0, one.server.store.get("after") is not None))
    assert all(sentinels.password not in r.getMessage() for r in caplog.records)
