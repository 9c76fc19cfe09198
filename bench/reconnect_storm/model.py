"""A discrete-event model of the reconnect storm at internet scale (fast: no sockets).

One of ``nodes`` relay nodes dies; the ``listeners / nodes`` listeners it held reconnect. Each
runs the SDK's own policy, imported, not re-implemented: the delays of
:func:`hybridrelay.client.backoff.reconnect_delays` and the endpoint choice of
:func:`hybridrelay.client.backoff.next_endpoint` (every listener is given every node). A
surviving node accepts control channels one at a time per core, each costing ``accept_ms`` of
CPU (measured by the real run: TLS handshake, WebSocket upgrade, token check, registration);
attempts queue (the listen backlog and the event loop) and one that waits longer than the SDK's
connect timeout fails, as does one at the dead node (refused), and the listener backs off.
Optionally a node refuses (503, cheap) an attempt that finds ``accept_limit`` already queued:
the server-side limit a relay could add.

What it leaves out: the listeners that stay (their nodes' keep-alive work), the network
between listeners and nodes, Redis (its load is counted from ``redis_ops_per_accept``).
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from bench.reconnect_storm.storm import Attempt, StormSummary, summarize
from hybridrelay.client.backoff import JITTER, next_endpoint, reconnect_delays
from hybridrelay.client.listener import CONNECT_TIMEOUT

__all__ = ["ModelParams", "ModelResult", "run_model"]

EndpointOrder = Literal["sdk", "list"]


@dataclass(frozen=True)
class ModelParams:
    nodes: int = 100
    listeners: int = 1_000_000
    #: CPU-ms one node spends to accept one listener's control channel (see the real run)
    accept_ms: float = 4.0
    #: cores (worker processes) per node accepting in parallel
    cores: int = 1
    #: the SDK's jitter; 0 = none (the "no jitter" comparison)
    jitter: float = JITTER
    #: "sdk": the SDK's next_endpoint; "list": the next in one list every listener shares
    #: (what the SDK did before, for comparison)
    order: EndpointOrder = "sdk"
    #: refuse (503) an attempt that finds this many queued on the node; None = no limit
    accept_limit: int | None = None
    #: CPU-ms of such a refusal, and the time an attempt at the dead node takes to fail
    refuse_ms: float = 0.2
    connect_timeout: float = CONNECT_TIMEOUT
    redis_ops_per_accept: float = 2.0
    seed: int = 1


@dataclass
class ModelResult:
    params: ModelParams
    summary: StormSummary
    #: CPU-seconds the busiest surviving node spent on the storm
    busiest_cpu_s: float
    #: Redis operations per second at the storm's peak second (all nodes)
    redis_peak_ops_s: float
    timed_out: int
    refused: int


@dataclass
class _Node:
    cores: list[float]  # when each core is next free (a heap)
    waiting: deque[float] = field(default_factory=deque)  # start times of queued attempts
    cpu_s: float = 0.0


def run_model(params: ModelParams) -> ModelResult:
    if params.nodes < 2:
        raise ValueError("a storm needs at least 2 nodes")
    rng = random.Random(params.seed)
    moved = params.listeners // params.nodes
    dead = 0
    names = [f"node{i + 1}" for i in range(params.nodes)]
    nodes = [_Node(cores=[0.0] * params.cores) for _ in range(params.nodes)]
    accept_s, refuse_s = params.accept_ms / 1000.0, params.refuse_ms / 1000.0
    delays: list[Iterator[float]] = [
        reconnect_delays(rng, jitter=params.jitter) for _ in range(moved)
    ]
    at: list[int] = [dead] * moved  # the endpoint each listener is on (or last tried)
    events: list[tuple[float, int]] = []  # (time of the next attempt, listener)
    for listener in range(moved):
        heapq.heappush(events, (next(delays[listener]), listener))
    attempts: list[Attempt] = []
    timed_out = refused = 0
    while events:
        now, listener = heapq.heappop(events)
        if params.order == "sdk":
            at[listener] = next_endpoint(at[listener], params.nodes, rng)
        else:
            at[listener] = (at[listener] + 1) % params.nodes
        target = at[listener]
        node = nodes[target]
        if target == dead:
            end, ok = now + refuse_s, False
        else:
            while node.waiting and node.waiting[0] <= now:
                node.waiting.popleft()
            start = max(now, node.cores[0])
            if params.accept_limit is not None and len(node.waiting) >= params.accept_limit:
                end, ok = now + refuse_s, False
                node.cpu_s += refuse_s
                refused += 1
            elif start - now > params.connect_timeout:
                # Still queued when the listener gives up; the node drops it unread.
                end, ok = now + params.connect_timeout, False
                timed_out += 1
            else:
                end, ok = start + accept_s, True
                heapq.heapreplace(node.cores, end)
                node.waiting.append(start)
                node.cpu_s += accept_s
        attempts.append(Attempt(listener, names[target], now, end, ok))
        if not ok:
            heapq.heappush(events, (end + next(delays[listener]), listener))
    survivors = [name for i, name in enumerate(names) if i != dead]
    summary = summarize(attempts, moved, survivors)
    per_second: dict[int, int] = {}
    for attempt in attempts:
        if attempt.ok:
            second = int(attempt.end)
            per_second[second] = per_second.get(second, 0) + 1
    return ModelResult(
        params=params,
        summary=summary,
        busiest_cpu_s=max(n.cpu_s for i, n in enumerate(nodes) if i != dead),
        redis_peak_ops_s=max(per_second.values(), default=0) * params.redis_ops_per_accept,
        timed_out=timed_out,
        refused=refused,
    )
