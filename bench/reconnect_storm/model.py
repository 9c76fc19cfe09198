"""A discrete-event model of the reconnect storm at internet scale (fast: no sockets).

``lost`` of ``nodes`` relay nodes die at once (one node, or a machine's ``--workers``); the
``listeners / nodes`` listeners each held reconnect. Each
runs the SDK's own policy, imported, not re-implemented: the delays of
:func:`hybridrelay.client.backoff.reconnect_delays` and, per attempt, the endpoints of
:func:`hybridrelay.client.backoff.endpoint_round` tried in turn until one answers (every
listener is given every node; a refused or timed-out try moves on at once, a 503 or a round
that found nobody waits the next delay). A
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
from hybridrelay.client.backoff import JITTER, endpoint_round, reconnect_delays
from hybridrelay.client.listener import CONNECT_TIMEOUT

__all__ = ["ModelParams", "ModelResult", "run_model"]

EndpointOrder = Literal["sdk", "list"]


@dataclass(frozen=True)
class ModelParams:
    nodes: int = 100
    listeners: int = 1_000_000
    #: nodes that die at once (node1 .. node{lost})
    lost: int = 1
    #: CPU-ms one node spends to accept one listener's control channel (see the real run)
    accept_ms: float = 4.0
    #: cores (worker processes) per node accepting in parallel
    cores: int = 1
    #: the SDK's jitter; 0 = none (the "no jitter" comparison)
    jitter: float = JITTER
    #: "sdk": the SDK's endpoint_round; "list": one try per attempt, at the next node in one
    #: list every listener shares (what the SDK did before, for comparison)
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
    if not 1 <= params.lost < params.nodes:
        raise ValueError("lost must be at least 1 and fewer than the nodes")
    rng = random.Random(params.seed)
    per_node = params.listeners // params.nodes
    moved = per_node * params.lost
    names = [f"node{i + 1}" for i in range(params.nodes)]
    nodes = [_Node(cores=[0.0] * params.cores) for _ in range(params.nodes)]
    accept_s, refuse_s = params.accept_ms / 1000.0, params.refuse_ms / 1000.0
    delays: list[Iterator[float]] = [
        reconnect_delays(rng, jitter=params.jitter) for _ in range(moved)
    ]
    at: list[int] = [i // per_node for i in range(moved)]  # the node each is on or last tried
    rounds: list[list[int]] = [[] for _ in range(moved)]  # the nodes left to try this attempt
    events: list[tuple[float, int]] = []  # (time of the next try, listener)
    for listener in range(moved):
        heapq.heappush(events, (next(delays[listener]), listener))
    attempts: list[Attempt] = []
    timed_out = refused = 0
    while events:
        now, listener = heapq.heappop(events)
        if not rounds[listener]:  # a new attempt
            if params.order == "sdk":
                rounds[listener] = endpoint_round(at[listener], params.nodes, rng)
            else:
                rounds[listener] = [(at[listener] + 1) % params.nodes]
        target = at[listener] = rounds[listener].pop(0)
        node = nodes[target]
        give_up = False  # a refusal the SDK does not try elsewhere (503): the round ends
        if target < params.lost:  # a dead node: connection refused
            end, ok = now + refuse_s, False
        else:
            while node.waiting and node.waiting[0] <= now:
                node.waiting.popleft()
            start = node.cores[0] if node.cores[0] > now else now
            if params.accept_limit is not None and len(node.waiting) >= params.accept_limit:
                end, ok, give_up = now + refuse_s, False, True
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
        if ok:
            continue
        if give_up:
            rounds[listener] = []
        if rounds[listener]:
            heapq.heappush(events, (end, listener))  # the next node of this attempt, at once
        else:
            heapq.heappush(events, (end + next(delays[listener]), listener))
    survivors = names[params.lost :]
    summary = summarize(attempts, moved, survivors)
    per_second: dict[int, int] = {}
    for attempt in attempts:
        if attempt.ok:
            second = int(attempt.end)
            per_second[second] = per_second.get(second, 0) + 1
    return ModelResult(
        params=params,
        summary=summary,
        busiest_cpu_s=max(n.cpu_s for n in nodes[params.lost :]),
        redis_peak_ops_s=max(per_second.values(), default=0) * params.redis_ops_per_accept,
        timed_out=timed_out,
        refused=refused,
    )
