"""A rolling restart of three ``hybridrelay serve --cluster`` nodes under a steady load (issue 16).

Three node subprocesses on fixed ports; listeners given every node (two SDK listeners and a
bridge ``-R``, each starting on another node); a steady load of WebSocket round trips (SDK
senders with every endpoint, starting on varying nodes) and HTTP requests (to a random node,
the next one tried on a refused connection or a 503, as a load balancer or a client with
several addresses does; its pooled connection closed by a draining node, too), plus
long-lived connections through each node. Nodes 1, 2 and 3
are then restarted one at a time (SIGTERM, its drain, the process' exit, the same port
again, ready). Counted: failed new connections and requests by cause, established
connections broken on nodes that stayed up, and the longest time each hybrid connection had
no listener registered anywhere (sampled from Redis' ``routes`` hash, the cluster's own
view).

The default run keeps the load light and short; ``-m soak`` runs more of it, twice round::

    PYTHONPATH=$PWD/src python3 -m pytest -m soak -s tests/cluster/test_rolling_restart.py
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from hybridrelay.auth.sas import create_token
from hybridrelay.bridge.agent import BridgeAgent
from hybridrelay.bridge.config import merge_cli, parse_config
from hybridrelay.client import (
    HybridConnectionClient,
    HybridConnectionListener,
    HybridConnectionStream,
)
from hybridrelay.exceptions import RelayError, RelayHttpError
from hybridrelay.server.cluster_broker import routes_key
from hybridrelay.server.config import RelayConfig
from tests.bridge.helpers import FAST_RETRY, tcp_server
from tests.client.helpers import root_provider
from tests.cluster.conftest import RedisServer, _free_port
from tests.cluster.test_cluster import echo, in_an_hour, reverse_body
from tests.conftest import ROOT_KEY, ROOT_KEY_NAME
from tests.serve_process import ServeProcess, relay_document, serve, write_config

logger = logging.getLogger(__name__)

SDK_A, SDK_B, BRIDGE = "sdk-a", "sdk-b", "bridge"
ENTITIES = (SDK_A, SDK_B, BRIDGE)
#: What docs/CLUSTER.md states: a listener told 1012 by a draining node is registered again
#: (on its next endpoint, dialled at once) within this long, as the cluster sees it.
RECONNECT_BOUND = 1.0
#: The nodes' ``--shutdown-grace-period``: long-lived connections through a node that
#: restarts are cut when it runs out (expected; they are not on a node that stayed up).
GRACE = 1.0


@dataclass
class Node:
    """One node: a fixed port, and the process of the moment."""

    index: int
    port: int
    process: ServeProcess | None = None
    #: While a restart is under way: (SIGTERM sent at, the new process ready at or None).
    restarting: tuple[float, float | None] | None = None

    @property
    def base_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@dataclass
class Tally:
    """What the load saw."""

    round_trips: int = 0
    requests: int = 0
    #: Failed new connections / requests, by cause (after the SDK's or the client's retry).
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    #: First attempts of HTTP requests refused by a node and retried on the next, by cause.
    retried: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Long-lived connections broken while their node was not restarting.
    broken_on_up_nodes: list[str] = field(default_factory=list)
    #: Long-lived connections cut by their own node's restart (its grace ran out).
    cut_by_own_restart: int = 0
    long_lived: int = 0
    #: Per hybrid connection: the longest time no node had a listener of it registered.
    longest_gap: dict[str, float] = field(default_factory=dict)


def _without_tracking_id(text: str) -> str:
    return text.split(" TrackingId:")[0]


def _cause(exc: BaseException) -> str:
    if isinstance(exc, RelayHttpError):
        return _without_tracking_id(f"{exc.status} {exc.description}")
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__


class RollingRestart:
    """The nodes, the listeners and the load of one run."""

    def __init__(self, redis_url: str, config: Path, *, senders: int, http_senders: int) -> None:
        self.redis_url = redis_url
        self.config = config
        self.nodes = [Node(i + 1, _free_port()) for i in range(3)]
        self.tally = Tally()
        self.stop = asyncio.Event()
        #: Set once the load made its first round trips and requests.
        self.loaded = asyncio.Event()
        self._senders = senders
        self._http_senders = http_senders
        self._stack = AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self._echoes: list[asyncio.Task[None]] = []
        self._namespace = RelayConfig.load(config).namespace_name
        #: Every node process started, for the log of a failed run.
        self.processes: list[tuple[int, ServeProcess]] = []

    # -- nodes ------------------------------------------------------------------------------

    async def start_node(self, node: Node) -> None:
        node.process = await self._stack.enter_async_context(
            serve(
                self.config,
                "--cluster", self.redis_url,
                "--port", str(node.port),
                "--shutdown-grace-period", str(GRACE),
            )
        )  # fmt: skip
        self.processes.append((node.index, node.process))

    def node_logs(self) -> str:
        return "\n".join(
            f"node {index} [{n}]: {line}"
            for n, (index, process) in enumerate(self.processes)
            for line in process.lines
        )

    async def restart(self, node: Node) -> float:
        """SIGTERM, wait for the exit, start again on the same port; seconds until ready."""
        assert node.process is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        node.restarting = (started, None)
        node.process.signal(signal.SIGTERM)
        code = await node.process.wait(within=GRACE + 20)
        assert code == 0, node.process.text
        await self.start_node(node)
        node.restarting = (started, loop.time())
        self._spawn(self._long_lived(node, SDK_A))
        return loop.time() - started

    def _spawn(self, work: object) -> None:
        assert asyncio.iscoroutine(work)
        self._tasks.append(asyncio.get_running_loop().create_task(work))

    # -- listeners --------------------------------------------------------------------------

    def _endpoints(self, first: int) -> list[str]:
        order = self.nodes[first:] + self.nodes[:first]
        return [node.base_url for node in order]

    async def start_listeners(self) -> None:
        for first, entity in enumerate((SDK_A, SDK_B)):
            listener = HybridConnectionListener(
                self._endpoints(first), entity, root_provider(), request_handler=reverse_body
            )
            await self._stack.enter_async_context(listener)
            self._echoes.append(asyncio.get_running_loop().create_task(echo(listener)))
        server = await self._stack.enter_async_context(tcp_server())
        others = [arg for url in self._endpoints(2)[1:] for arg in ("--also-endpoint", url)]
        config = merge_cli(
            parse_config({"shutdown_grace_period": 2, "connect_timeout": 10}),
            [
                "-x",
                f"Endpoint={self.nodes[2].base_url}/;SharedAccessKeyName={ROOT_KEY_NAME};"
                f"SharedAccessKey={ROOT_KEY}",
                *others,
                "-R",
                f"{BRIDGE}:127.0.0.1:{server.port}",
            ],
        )
        await self._stack.enter_async_context(BridgeAgent(config, retry_schedule=FAST_RETRY))

    # -- measurements -----------------------------------------------------------------------

    async def watch_routes(self, started: asyncio.Event) -> None:
        """Sample, every 10 ms, whether each hybrid connection has a listener on some node
        (the routes hash the nodes route by); the longest run without one, per entity."""
        client = aioredis.Redis.from_url(self.redis_url)
        since: dict[str, float | None] = dict.fromkeys(ENTITIES)
        longest = self.tally.longest_gap
        try:
            while not self.stop.is_set():  # sampling Redis: there is no event to wait on
                now = time.monotonic()
                for entity in ENTITIES:
                    if await self._registered(client, entity):
                        gap_from = since[entity]
                        if gap_from is not None and started.is_set():
                            longest[entity] = max(longest.get(entity, 0.0), now - gap_from)
                        since[entity] = None
                    elif since[entity] is None:
                        since[entity] = now
                if not started.is_set() and all(since[e] is None for e in ENTITIES):
                    started.set()  # every listener registered once: gaps count from here
                await asyncio.sleep(0.01)
            for entity, gap_from in since.items():
                if gap_from is not None:  # still without a listener at the end
                    longest[entity] = max(longest.get(entity, 0.0), time.monotonic() - gap_from)
        finally:
            await client.aclose()

    async def _registered(self, client: aioredis.Redis, entity: str) -> bool:
        counts = await client.hvals(routes_key(self._namespace, entity))
        return any(int(count) > 0 for count in counts)

    # -- load -------------------------------------------------------------------------------

    async def websocket_load(self, seed: int) -> None:
        rng = random.Random(seed)
        clients = {
            (entity, first): HybridConnectionClient(
                self._endpoints(first), entity, root_provider(), connect_timeout=10
            )
            for entity in ENTITIES
            for first in range(3)
        }
        try:
            while not self.stop.is_set():
                client = clients[(rng.choice(ENTITIES), rng.randrange(3))]
                payload = rng.randbytes(64)
                try:
                    async with asyncio.timeout(15):
                        stream = await client.create_connection()
                        try:
                            await stream.write(payload)
                            echoed = await _read_exactly(stream, len(payload))
                        finally:
                            await stream.aclose()
                    if echoed != payload:
                        self.tally.failed["wrong echo"] += 1
                except (RelayError, TimeoutError, OSError) as exc:
                    self.tally.failed[f"ws: {_cause(exc)}"] += 1
                self.tally.round_trips += 1
                self._note_progress()
        finally:
            for client in clients.values():
                await client.aclose()

    async def http_load(self, seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(timeout=15) as http:
            while not self.stop.is_set():
                entity = rng.choice((SDK_A, SDK_B))
                first = rng.randrange(3)
                body = rng.randbytes(32)
                for attempt, node in enumerate(self.nodes[first:] + self.nodes[:first]):
                    token = create_token(
                        f"http://127.0.0.1:{node.port}/{entity}",
                        ROOT_KEY_NAME,
                        ROOT_KEY,
                        expiry=in_an_hour(),
                    )
                    cause: str | None = None
                    try:
                        response = await http.post(
                            f"http://127.0.0.1:{node.port}/{entity}",
                            content=body,
                            headers={"ServiceBusAuthorization": token},
                        )
                        if response.status_code == 200 and response.content == body[::-1]:
                            break
                        cause = _without_tracking_id(
                            f"{response.status_code} {response.reason_phrase}"
                        )
                        retry = response.status_code == 503  # a draining node's answer
                    except httpx.TransportError as exc:
                        cause, retry = type(exc).__name__, True
                    if not retry or attempt == 2:
                        self.tally.failed[f"http: {cause}"] += 1
                        break
                    self.tally.retried[f"http: {cause}"] += 1
                self.tally.requests += 1
                self._note_progress()

    def _note_progress(self) -> None:
        if self.tally.round_trips >= 20 and self.tally.requests >= 20:
            self.loaded.set()

    async def _long_lived(
        self, node: Node, entity: str, connected: asyncio.Future[None] | None = None
    ) -> None:
        """A connection through ``node`` alone, pinged every 50 ms until the end (or until it
        breaks: counted against the node unless the node was restarting)."""
        self.tally.long_lived += 1
        client = HybridConnectionClient(node.base_url, entity, root_provider(), connect_timeout=10)
        try:
            stream = await client.create_connection()
        except RelayError as exc:
            self.tally.failed[f"long-lived connect: {_cause(exc)}"] += 1
            await client.aclose()
            return
        finally:
            if connected is not None:
                connected.set_result(None)
        opened = time.monotonic()
        try:
            while not self.stop.is_set():
                try:
                    async with asyncio.timeout(10):
                        await stream.write(b"ping")
                        assert await _read_exactly(stream, 4) == b"ping"
                except (RelayError, TimeoutError, OSError, AssertionError) as exc:
                    if node.restarting is not None and node.restarting[1] is None:
                        self.tally.cut_by_own_restart += 1
                    else:
                        self.tally.broken_on_up_nodes.append(
                            f"node {node.index} ({entity}, up {time.monotonic() - opened:.1f}s):"
                            f" {_cause(exc)}"
                        )
                    return
                try:
                    async with asyncio.timeout(0.05):
                        await self.stop.wait()
                except TimeoutError:
                    pass
        finally:
            await stream.aclose()
            await client.aclose()

    # -- the run ----------------------------------------------------------------------------

    async def run(self, *, rounds: int, warm_up: float) -> list[float]:
        async with self._stack:
            await asyncio.gather(*(self.start_node(node) for node in self.nodes))
            await self.start_listeners()
            registered = asyncio.Event()
            self._spawn(self.watch_routes(registered))
            async with asyncio.timeout(20):
                await registered.wait()
            loop = asyncio.get_running_loop()
            connected = []
            for node in self.nodes:
                for entity in ENTITIES:
                    connected.append(loop.create_future())
                    self._spawn(self._long_lived(node, entity, connected[-1]))
            for seed in range(self._senders):
                self._spawn(self.websocket_load(seed))
            for seed in range(self._http_senders):
                self._spawn(self.http_load(100 + seed))
            async with asyncio.timeout(30):
                await asyncio.gather(*connected)
                await self.loaded.wait()  # the load is under way before the first restart
            await _steady(warm_up)
            restarts = []
            for _ in range(rounds):
                for node in self.nodes:
                    restarts.append(await self.restart(node))
                    await _steady(warm_up)
            self.stop.set()
            await asyncio.gather(*self._tasks)
            for task in self._echoes:
                task.cancel()
            await asyncio.gather(*self._echoes, return_exceptions=True)
        return restarts


async def _steady(seconds: float) -> None:
    """Let the load run for ``seconds`` (what the run measures is what happens meanwhile)."""
    await asyncio.sleep(seconds)


async def _read_exactly(stream: HybridConnectionStream, size: int) -> bytes:
    parts = bytearray()
    while len(parts) < size:
        data = await stream.read(size - len(parts))
        if not data:
            raise RelayError("the connection ended")
        parts += data
    return bytes(parts)


@asynccontextmanager
async def _rolling(
    redis_server: RedisServer, tmp_path: Path, *, senders: int, http_senders: int
) -> AsyncIterator[RollingRestart]:
    config = write_config(tmp_path / "relay.yaml", relay_document(entities=ENTITIES))
    yield RollingRestart(redis_server.url, config, senders=senders, http_senders=http_senders)


def _report(run: RollingRestart, restarts: list[float], seconds: float) -> str:
    tally = run.tally
    return (
        f"rolling restart: {len(restarts)} node restarts ({', '.join(f'{r:.1f}' for r in restarts)}"
        f" s each, SIGTERM to ready) in {seconds:.1f} s; {tally.round_trips} WebSocket round "
        f"trips, {tally.requests} HTTP requests; failed: {dict(tally.failed) or 0}; HTTP "
        f"retried on the next node: {dict(tally.retried) or 0}; long-lived connections: "
        f"{tally.long_lived}, cut by their own node's restart: {tally.cut_by_own_restart}, "
        f"broken on nodes that stayed up: {len(tally.broken_on_up_nodes)} "
        f"{tally.broken_on_up_nodes or ''}; longest time without a listener: "
        + ", ".join(f"{entity} {tally.longest_gap.get(entity, 0.0):.2f} s" for entity in ENTITIES)
    )


def _check(run: RollingRestart) -> None:
    tally = run.tally
    assert tally.round_trips > 0 and tally.requests > 0
    assert not tally.broken_on_up_nodes
    assert not tally.failed, dict(tally.failed)
    for entity in ENTITIES:
        assert tally.longest_gap.get(entity, 0.0) <= RECONNECT_BOUND, tally.longest_gap


async def _measured(
    redis_server: RedisServer,
    tmp_path: Path,
    *,
    senders: int,
    http_senders: int,
    rounds: int,
    warm_up: float,
    within: float,
) -> None:
    """One run, reported (a WARNING line) and checked; the nodes' logs in ``nodes.log``."""
    async with _rolling(redis_server, tmp_path, senders=senders, http_senders=http_senders) as run:
        started = time.monotonic()
        try:
            async with asyncio.timeout(within):
                restarts = await run.run(rounds=rounds, warm_up=warm_up)
        finally:
            (tmp_path / "nodes.log").write_text(run.node_logs())
        logger.warning(_report(run, restarts, time.monotonic() - started))
    _check(run)


@pytest.mark.timeout(120)
async def test_a_rolling_restart_of_three_nodes_under_load(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    await _measured(
        redis_server, tmp_path, senders=3, http_senders=2, rounds=1, warm_up=0.5, within=90
    )


@pytest.mark.soak
@pytest.mark.timeout(600)
async def test_a_rolling_restart_of_three_nodes_under_heavier_load_twice(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    await _measured(
        redis_server, tmp_path, senders=12, http_senders=6, rounds=2, warm_up=5.0, within=540
    )
