"""The reconnect storm of bench/reconnect_storm (docs/SCALING.md) at small scale: the real run
(3 ``serve --cluster`` nodes on a real redis-server, 45 listeners, node1 SIGKILLed) and the model
(the SDK's own backoff and endpoint choice): jitter spreads the storm, the next node is drawn
at random, and every listener is back within the stated bound."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from bench.reconnect_storm.__main__ import main
from bench.reconnect_storm.model import ModelParams, run_model
from bench.reconnect_storm.real import RealParams, run_real
from bench.reconnect_storm.storm import Attempt

from hybridrelay.client.backoff import FIRST_RETRY_SPREAD
from tests.cluster.conftest import RedisServer

#: What docs/SCALING.md states for a small cluster: every listener of the dead node is back
#: within this long (its first retry is within FIRST_RETRY_SPREAD, to a live node; a retry
#: that fails waits about a second more)
STORM_BOUND = 3.0


@pytest.mark.timeout(90)
async def test_a_dead_node_s_listeners_come_back_spread_over_the_others(
    redis_server: RedisServer,
) -> None:
    params = RealParams(nodes=3, listeners=45, redis_url=redis_server.url, calibrate=False)
    storm = (await run_real(params)).summary
    assert storm.moved == 15  # listener i started on node i mod 3
    assert storm.full_recovery is not None, f"{storm.recovered} of 15 back"
    assert storm.full_recovery < STORM_BOUND
    assert storm.attempts_per_listener_max <= 2
    # Not all onto the node after node1 in the list: both survivors took some (the chance
    # that 15 random draws all pick one of two nodes is 2 in 32,768).
    assert set(storm.landed) == {"node2", "node3"}, storm.landed


def test_the_model_shows_jitter_spreading_the_storm() -> None:
    small = ModelParams(nodes=3, listeners=3000, accept_ms=1.0)
    sdk = run_model(small).summary
    no_jitter = run_model(dataclasses.replace(small, jitter=0.0)).summary
    shared_list = run_model(dataclasses.replace(small, order="list")).summary
    assert sdk.full_recovery is not None
    assert sdk.full_recovery < FIRST_RETRY_SPREAD + 1.0
    # Without jitter all 1,000 arrive in the first 100 ms; the SDK spreads them.
    assert no_jitter.peak_per_bucket >= 450
    assert sdk.peak_per_bucket <= 0.5 * no_jitter.peak_per_bucket
    # The SDK's next node is drawn at random; one shared list sends them all to node2.
    assert shared_list.landed == {"node2": 1000}
    assert set(sdk.landed) == {"node2", "node3"}
    assert min(sdk.landed.values()) > 400


def test_the_model_prints_its_comparison(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "--nodes", "10", "--listeners", "10000", "--accept-limit", "50"]) == 0
    out = capsys.readouterr().out
    assert "1 node(s) lost = 1,000 listeners" in out
    assert out.count("\n| ") == 5  # the header and four policies


@pytest.mark.timeout(90)
async def test_a_listener_does_not_wait_a_backoff_step_for_each_dead_node(
    redis_server: RedisServer,
) -> None:
    # Two of four nodes die together (a machine's workers): a listener whose first try hits
    # the other dead node tries the next one at once, not a delay (~1 s) later.
    params = RealParams(nodes=4, listeners=40, kill=2, redis_url=redis_server.url, calibrate=False)
    result = await run_real(params)
    assert result.summary.full_recovery is not None, result.summary
    by_listener: dict[int, list[Attempt]] = {}
    for attempt in sorted(result.attempts, key=lambda a: a.start):
        by_listener.setdefault(attempt.listener, []).append(attempt)
    gaps = [
        later.start - earlier.end
        for tries in by_listener.values()
        for earlier, later in itertools.pairwise(tries)
    ]
    assert gaps, "no listener's first try hit a dead node (1 in 3 each, 20 listeners)"
    assert max(gaps) < 0.5, gaps  # the first backoff step is 0.8 s at least
    assert set(result.summary.landed) == {"node3", "node4"}
